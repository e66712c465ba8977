"""The caller's view of one worker process: its key, socket, generation and state."""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from typing import Any, Dict, NamedTuple, Optional, Tuple


class WorkerKey(NamedTuple):
    """What makes two calls share a worker: the repository (and its folder), the torch mock, the
    sandbox's hub folder (``None`` unsandboxed) and the folders put after the repository on its import
    path (a requirement overlay)."""

    key: str
    repo_dir: str
    mock_torch: bool
    sandbox_hub: Optional[str]
    extra_path: Tuple[str, ...] = ()


class WorkerHandle:
    """One worker process as the caller sees it. Used only while holding ``self.lock``."""

    def __init__(self, ikey: WorkerKey, label: str) -> None:
        self.ikey, self.label = ikey, label
        self.lock = threading.Lock()
        self.pid: Optional[int] = None
        self.sock: Optional[socket.socket] = None
        self.last_used = time.monotonic()
        self.dead = False
        self.stamp: Optional[tuple] = None
        self.gen = 0  # +1 per process forked for this worker; a proxy belongs to one generation
        self.ended: Dict[int, str] = {}  # generation -> how its process ended (for stale proxies)
        self.conn: Any = None  # proxy.Connection of the current generation, once a proxy-mode call made one
        self.settings: Any = None  # the last call's settings: a sandboxed worker's downloads use them

    def pinned(self) -> bool:
        """The caller holds proxies of objects in this process: do not reap or evict it."""
        conn = self.conn
        return conn is not None and conn.gen == self.gen and not self.dead and conn.live()

    def looks_alive(self) -> bool:
        """An idle worker never writes: a readable or hung-up socket means it has died."""
        if self.sock is None or self.dead:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)


def hubconf_stamp(repo_dir: str) -> Optional[tuple]:
    """What changes when ``hubconf.py`` is rewritten (the reference re-imports it on every call)."""
    try:
        st = os.stat(os.path.join(repo_dir, "hubconf.py"))
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def describe_call(op: str, model: Optional[str], label: str) -> str:
    """The call, in words, for error messages."""
    if op == "list":
        return f"listing the entrypoints of {label}"
    if op == "help":
        return f"help for entrypoint {model!r} of {label}"
    return f"entrypoint {model!r} of {label}"
