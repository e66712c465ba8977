"""``GitHubServer``: the loopback GitHub look-alike, run in a background thread."""
from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Union

from flowhub.server.faults import Fault
from flowhub.server.git import ArchiveCache
from flowhub.server.handler import QUIET_ERRORS, Handler, ServerState
from flowhub.server.log import RequestRecord
from flowhub.server.site import Site

STOP_JOIN_SECONDS = 2.0


class _HTTPServer(ThreadingHTTPServer):
    """A threading server that tracks its connections so ``stop()`` can cut them."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple, state: ServerState, family: int) -> None:
        self.address_family = family
        self.state = state
        self._conn_lock = threading.Lock()
        self._conns: Dict[threading.Thread, socket.socket] = {}
        super().__init__(address, Handler)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        thread = threading.Thread(target=self._run, args=(request, client_address),
                                  name="flowhub-server-conn", daemon=True)
        with self._conn_lock:
            self._conns[thread] = request
        thread.start()

    def _run(self, request: socket.socket, client_address: tuple) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._conn_lock:
                self._conns.pop(threading.current_thread(), None)

    def handle_error(self, request: object, client_address: tuple) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, QUIET_ERRORS) or self.state.stop.is_set():
            return
        self.state.error(f"connection from {client_address[0]}: {type(exc).__name__}: {exc}")

    def cut_connections(self) -> List[threading.Thread]:
        """Shut every open connection down (wakes blocked reads/writes); return their threads."""
        with self._conn_lock:
            conns = list(self._conns.items())
        for _, sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return [thread for thread, _ in conns]


class GitHubServer:
    """Serves git repositories and files under ``root`` the way github.com, api.github.com
    and codeload.github.com do, on ``http://host:port`` (``port=0`` picks a free port).

    ``reject_tokens=True`` answers 401 to any request carrying ``Authorization``. Use as a
    context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, root: Union[str, Path], host: str = "127.0.0.1", port: int = 0,
                 reject_tokens: bool = False, *, quiet: bool = True) -> None:
        self.root = Path(root).resolve()
        self.host = host
        self._requested_port = port
        self._archives = ArchiveCache()
        self._state = ServerState(Site(self.root, self._archives), url="",
                                  reject_tokens=reject_tokens, quiet=quiet)
        self._httpd: Optional[_HTTPServer] = None
        self._port = 0
        self._thread: Optional[threading.Thread] = None

    # lifecycle -------------------------------------------------------------------------

    def start(self) -> "GitHubServer":
        """Bind and start serving in a background thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("server already started")
        if not self.root.is_dir():
            raise FileNotFoundError(f"not a directory: {self.root}")
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._state.stop.clear()
        self._httpd = _HTTPServer((self.host, self._requested_port), self._state, family)
        self._port = self._httpd.server_address[1]
        self._state.url = self.url
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="flowhub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly: cut stalled and idle connections, join threads, drop archives."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._state.stop.set()
        httpd.shutdown()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in httpd.cut_connections():
            thread.join(max(0.0, deadline - time.monotonic()))
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            self._thread = None
        self._archives.close()

    def __enter__(self) -> "GitHubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (valid once :meth:`start` has run, also after :meth:`stop`)."""
        if not self._port:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """Web base, e.g. ``http://127.0.0.1:8123`` (also serves ``/_codeload``)."""
        host = self.host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        """API base: ``url + "/api"``."""
        return self.url + "/api"

    # behaviour switches ----------------------------------------------------------------

    @property
    def reject_tokens(self) -> bool:
        return self._state.reject_tokens

    @reject_tokens.setter
    def reject_tokens(self, value: bool) -> None:
        self._state.reject_tokens = bool(value)

    def add_fault(self, fault: Fault) -> Fault:
        """Add a fault rule (checked in insertion order); returns it for later inspection."""
        return self._state.faults.add(fault)

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        self._state.faults.clear()

    @property
    def faults(self) -> List[Fault]:
        """The current fault rules (live objects: ``times`` and ``hits`` update)."""
        return self._state.faults.snapshot()

    # request log -----------------------------------------------------------------------

    @property
    def requests(self) -> List[RequestRecord]:
        """A snapshot of the request log, oldest first."""
        return self._state.log.snapshot()

    def count(self, path_contains: str = "", method: Optional[str] = "GET",
              status: Optional[int] = None) -> int:
        """How many logged requests match (``None`` means any method / any status)."""
        return sum(
            1 for r in self.requests
            if path_contains in r.path
            and (method is None or r.method == method.upper())
            and (status is None or r.status == status)
        )

    def clear_log(self) -> None:
        """Forget all logged requests."""
        self._state.log.clear()
