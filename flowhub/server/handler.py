"""The HTTP/1.1 request handler: parse, route, apply faults, log, write."""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from flowhub.server.faults import REPLACING, FaultSet
from flowhub.server.log import Headers, LiveRecord, RequestLog
from flowhub.server.responses import Response, api_error
from flowhub.server.routes import route
from flowhub.server.site import Site
from flowhub.server.transport import Writer, replacement

QUIET_ERRORS = (ConnectionError, TimeoutError, BrokenPipeError)
MAX_DISCARD = 1 << 20


@dataclass
class ServerState:
    """Everything handlers share with the :class:`GitHubServer` that owns them."""

    site: Site
    url: str
    reject_tokens: bool = False
    quiet: bool = True
    faults: FaultSet = field(default_factory=FaultSet)
    log: RequestLog = field(default_factory=RequestLog)
    stop: threading.Event = field(default_factory=threading.Event)

    def error(self, message: str) -> None:
        """One terse line on stderr (always shown: these are server bugs or I/O trouble)."""
        print(f"flowhub.server: {message}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    """Serves GET and HEAD; every response carries an exact ``Content-Length``."""

    protocol_version = "HTTP/1.1"
    server_version = "flowhub-server"
    timeout = 60.0  # idle keep-alive connections and stuck clients give up after this

    @property
    def state(self) -> ServerState:
        return self.server.state  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._serve()

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if not self.state.quiet:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    def _route(self, path: str, query: str, req: Headers) -> Response:
        state = self.state
        host = req.get("Host")
        base = f"http://{host}" if host else state.url
        try:
            return route(state.site, path, query, req, base, state.reject_tokens)
        except Exception as exc:  # a bug or a git failure must not take the server down
            state.error(f"{self.command} {path}: {type(exc).__name__}: {exc}")
            return api_error(500, "Internal server error")

    def _discard_body(self, req: Headers) -> None:
        """Read and drop a request body, so the next request on the connection parses."""
        try:
            length = int(req.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if 0 < length <= MAX_DISCARD:
            self.rfile.read(length)
        elif length != 0:
            self.close_connection = True

    def _serve(self) -> None:
        state = self.state
        raw = self.path
        if raw.startswith(("http://", "https://")):  # absolute-form, as sent to a proxy
            parts = urlsplit(raw)
            raw = parts.path + ("?" + parts.query if parts.query else "")
        path, _, query = raw.partition("?")
        path = path or "/"
        req = Headers(self.headers.items())
        self._discard_body(req)
        record = LiveRecord(self.command, path, query, req)
        resp = self._route(path, query, req)
        fault = state.faults.take(self.command, path)
        if fault is not None:
            record.fault = fault.kind
            if fault.kind in REPLACING:
                resp = replacement(fault, self.client_address[0])
        record.status = resp.status

        def count(n: int) -> None:
            record.bytes_sent += n

        writer = Writer(self.connection, state.stop, count,
                        lambda: state.log.update(record, busy=False))
        keep = True
        try:
            self.send_response(resp.status)
            for name, value in resp.headers:
                self.send_header(name, value)
            if not resp.no_body:
                self.send_header("Content-Length", str(resp.length))
            state.log.add(record)
            self.end_headers()
            if self.command == "HEAD" or resp.no_body:
                if fault is not None and fault.kind in ("drop", "stall"):
                    if fault.kind == "stall":
                        writer.stall(fault.seconds)
                    keep = False
            else:
                keep = writer.body(resp, fault)
        except QUIET_ERRORS:
            keep = False
        except OSError as exc:
            if not state.stop.is_set():
                state.error(f"{self.command} {path}: {type(exc).__name__}: {exc}")
            keep = False
        except Exception as exc:
            state.error(f"{self.command} {path}: {type(exc).__name__}: {exc}")
            keep = False
        finally:
            state.log.update(record, busy=False)
        if not keep:
            self.close_connection = True
