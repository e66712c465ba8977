"""The request log: one :class:`RequestRecord` per answered request, readable from any thread."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, List, Optional, Tuple

# A snapshot waits this long at most for responses still being written, so that a client
# that has just read the last byte sees its own request with its final ``bytes_sent``.
SETTLE_SECONDS = 0.5


def _canonical(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


class Headers(dict):
    """Request headers: a dict with canonical keys (``User-Agent``) and case-insensitive lookup."""

    def __init__(self, items: Iterable[Tuple[str, str]] = ()) -> None:
        super().__init__()
        for key, value in items:
            super().__setitem__(_canonical(key), value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(_canonical(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(_canonical(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(_canonical(key), default)


@dataclass(frozen=True)
class RequestRecord:
    """What one request asked for and what the server answered.

    ``bytes_sent`` counts body bytes actually written; ``authorized`` is True when the request
    carried an ``Authorization`` header; ``fault`` names the injected fault kind, if any.
    """

    method: str
    path: str
    query: str
    headers: Headers
    status: int
    bytes_sent: int
    range: Optional[str]
    authorized: bool
    fault: Optional[str] = None
    time: float = field(default=0.0, compare=False)


class LiveRecord:
    """The mutable record of a request while its response is being written."""

    __slots__ = ("method", "path", "query", "headers", "status", "bytes_sent", "fault",
                 "time", "busy")

    def __init__(self, method: str, path: str, query: str, headers: Headers) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.status = 0
        self.bytes_sent = 0
        self.fault: Optional[str] = None
        self.time = time.time()
        self.busy = True  # writing the body; False once done or while deliberately stalled

    def freeze(self) -> RequestRecord:
        return RequestRecord(
            method=self.method, path=self.path, query=self.query, headers=self.headers,
            status=self.status, bytes_sent=self.bytes_sent, range=self.headers.get("Range"),
            authorized="Authorization" in self.headers, fault=self.fault, time=self.time,
        )


class RequestLog:
    """Thread-safe list of records, in the order responses started."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._records: List[LiveRecord] = []

    def add(self, record: LiveRecord) -> None:
        """Publish ``record`` (call just before the response headers are written)."""
        with self._cond:
            self._records.append(record)

    def update(self, record: LiveRecord, sent: int = 0, busy: Optional[bool] = None) -> None:
        """Count ``sent`` more body bytes and/or change whether the record is still busy."""
        with self._cond:
            record.bytes_sent += sent
            if busy is not None:
                record.busy = busy
                self._cond.notify_all()

    def snapshot(self) -> List[RequestRecord]:
        """Frozen copies of all records (waits briefly for responses being written)."""
        deadline = time.monotonic() + SETTLE_SECONDS
        with self._cond:
            while any(r.busy for r in self._records):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return [r.freeze() for r in self._records]

    def clear(self) -> None:
        with self._cond:
            self._records.clear()
