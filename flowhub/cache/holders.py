"""Who is fetching a cache entry: a holder file next to its lock (host, pid, rank, time), kept fresh by a
heartbeat, so a waiter can name the holder and tell a live one from one that died, even on another host.

``flock`` locks on NFS, Lustre or GPFS may lock nothing, or outlive a dead host; the holder file needs
neither. Its mtime is touched every :data:`HEARTBEAT` seconds while the entry is being fetched. A
waiter never compares that mtime with its own clock (hosts' clocks differ): it notes when it last
*saw the mtime change*, and a holder unchanged for :data:`STALE_AFTER` seconds of the waiter's own time
is dead. A holder on this host whose pid is gone is dead at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Iterator, Optional

from flowhub.settings import job_variables

HEARTBEAT = 1.0
STALE_AFTER = 10.0
SUFFIX = ".holder"


def holder_path(lock_path: str) -> str:
    return lock_path + SUFFIX


def _this_holder(what: str, rank: Optional[int]) -> Dict[str, Any]:
    if rank is None:
        raw = job_variables().get("RANK", "")
        rank = int(raw) if raw.isdigit() else None
    return {"host": socket.gethostname(), "pid": os.getpid(), "rank": rank, "what": what, "since": time.time(),
            "id": uuid.uuid4().hex}


def read(lock_path: str) -> Optional[Dict[str, Any]]:
    """The holder info of ``lock_path`` (plus its ``mtime_ns``), or None."""
    path = holder_path(lock_path)
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        info["mtime_ns"] = os.stat(path).st_mtime_ns
    except (OSError, ValueError, TypeError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: Optional[Dict[str, Any]]) -> str:
    """``pid 123 on host n1 (rank 4), since 12 s`` for error messages."""
    if not info:
        return "an unknown process (no holder file)"
    rank = f" (rank {info['rank']})" if info.get("rank") is not None else ""
    since = info.get("since")
    age = f", started {max(0.0, time.time() - since):.0f} s ago by its clock" if isinstance(since, (int, float)) else ""
    return f"pid {info.get('pid')} on host {info.get('host')}{rank}{age}"


def dead_here(info: Dict[str, Any]) -> bool:
    """True if the holder ran on this host and its process is gone."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class Watch:
    """Tracks one holder file from a waiter's side: is its holder alive?"""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = lock_path
        self.info: Optional[Dict[str, Any]] = None
        self._seen: Optional[tuple] = None
        self._changed_at = time.monotonic()

    def poll(self) -> Optional[Dict[str, Any]]:
        info = read(self.lock_path)
        key = (info.get("id"), info.get("mtime_ns")) if info else None
        if key != self._seen:
            self._seen, self._changed_at = key, time.monotonic()
        self.info = info
        return info

    def stale(self, after: float = STALE_AFTER) -> bool:
        """True if the holder is known dead, or its heartbeat stopped for ``after`` seconds."""
        if self.info is None:
            return False
        return dead_here(self.info) or time.monotonic() - self._changed_at > after


@contextlib.contextmanager
def holding(lock_path: str, what: str, rank: Optional[int] = None) -> Iterator[None]:
    """Write our holder info next to ``lock_path`` and keep it fresh until the block ends (best effort)."""
    path = holder_path(lock_path)
    info = _this_holder(what, rank)
    tmp = f"{path}.{info['id'][:12]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(path)

    thread = threading.Thread(target=beat, name="flowhub-holder-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        current = read(lock_path)
        if current and current.get("id") == info["id"]:  # never remove a newer holder's file
            with contextlib.suppress(OSError):
                os.remove(path)
