"""Fault injection rules: make chosen requests fail the way real networks and servers do."""
from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

KINDS = ("status", "ratelimit", "drop", "stall", "corrupt", "html", "slow")
REPLACING = ("status", "ratelimit", "html")  # kinds that answer instead of the real response


@dataclass
class Fault:
    """One rule. ``match`` is an fnmatch pattern on the request path (query excluded).

    ``times`` is how many matching requests it still affects (None = every one); each
    affected request decrements it and increments ``hits``. Kinds:

    - ``status``: answer ``status`` with a small body and the extra ``headers``.
    - ``ratelimit``: 403 with ``X-RateLimit-Remaining: 0`` and GitHub's message.
    - ``drop``: real headers, the first ``after_bytes`` body bytes, then close.
    - ``stall``: real headers and ``after_bytes`` bytes, then silence for ``seconds``, then close.
    - ``corrupt``: the full-length body with a few bytes changed.
    - ``html``: 200 ``text/html`` error page instead of the real body.
    - ``slow``: the real body in small pieces, about ``seconds`` of extra delay in total.
    """

    match: str
    kind: str
    times: Optional[int] = 1
    status: int = 503
    after_bytes: int = 0
    seconds: float = 30.0
    headers: Optional[Dict[str, str]] = None
    methods: Tuple[str, ...] = ("GET",)
    hits: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {KINDS}")
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        self.methods = tuple(m.upper() for m in self.methods)
        if self.after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")

    def matches(self, method: str, path: str) -> bool:
        """True if this rule applies to a ``method`` request for ``path`` (ignoring ``times``)."""
        return method.upper() in self.methods and fnmatch.fnmatchcase(path, self.match)


class FaultSet:
    """Thread-safe ordered list of faults; the first live matching rule wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: List[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def snapshot(self) -> List[Fault]:
        with self._lock:
            return list(self._faults)

    def take(self, method: str, path: str) -> Optional[Fault]:
        """The fault for this request, with its counters updated, or None."""
        with self._lock:
            for fault in self._faults:
                if fault.times is not None and fault.times <= 0:
                    continue
                if fault.matches(method, path):
                    if fault.times is not None:
                        fault.times -= 1
                    fault.hits += 1
                    return fault
        return None
