"""Write a :class:`Response` to the client socket, applying an injected fault if any.

Normal file bodies go out with ``os.sendfile`` (zero copy); only faults that must alter or
pace the bytes read the file in Python.
"""
from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from typing import Callable, Iterator, Optional

from flowhub.server.faults import Fault
from flowhub.server.responses import DOCS_URL, HTML_TYPE, JSON_TYPE, Response

CHUNK = 1 << 20
SLOW_PIECES = 20
_PORTAL = (
    "<!DOCTYPE html>\n<html><head><title>Network login required</title></head><body>"
    "<h1>Access to this site is blocked</h1><p>Please sign in to the network to continue."
    "</p></body></html>\n"
)


def replacement(fault: Fault, client_ip: str) -> Response:
    """The response a replacing fault (``status``, ``ratelimit``, ``html``) sends instead."""
    extra = list((fault.headers or {}).items())
    if fault.kind == "html":
        return Response(200, [("Content-Type", HTML_TYPE), *extra], _PORTAL.encode())
    if fault.kind == "ratelimit":
        reset = str(int(time.time()) + 60)
        headers = [("Content-Type", JSON_TYPE), ("X-RateLimit-Limit", "60"),
                   ("X-RateLimit-Remaining", "0"), ("X-RateLimit-Reset", reset),
                   ("X-RateLimit-Used", "60"), ("X-RateLimit-Resource", "core"), *extra]
        body = {"message": f"API rate limit exceeded for {client_ip}.",
                "documentation_url": DOCS_URL}
        return Response(403, headers, json.dumps(body).encode() + b"\n")
    if fault.status in (204, 304) or fault.status < 200:
        return Response(fault.status, extra, no_body=True)
    body = {"message": f"Injected fault: HTTP {fault.status}"}
    return Response(fault.status, [("Content-Type", JSON_TYPE), *extra],
                    json.dumps(body).encode() + b"\n")


def _wait_writable(sock: socket.socket) -> None:
    timeout = sock.gettimeout()
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    if not poller.poll(None if timeout is None else int(timeout * 1000)):
        raise TimeoutError("client stopped reading")


def _sendfile(sock: socket.socket, path: str, offset: int, length: int,
              count: Callable[[int], None]) -> None:
    """Send ``length`` bytes of ``path`` from ``offset`` with ``os.sendfile``."""
    with open(path, "rb") as f:
        fd, out = f.fileno(), sock.fileno()
        while length > 0:
            try:
                sent = os.sendfile(out, fd, offset, min(length, 1 << 30))
            except BlockingIOError:
                _wait_writable(sock)
                continue
            if sent == 0:
                raise ConnectionAbortedError(f"{path} shrank while being sent")
            offset += sent
            length -= sent
            count(sent)


def _chunks(resp: Response, limit: Optional[int] = None, size: int = CHUNK) -> Iterator[bytes]:
    """The body (or its first ``limit`` bytes) in pieces of at most ``size`` bytes."""
    total = resp.length if limit is None else min(limit, resp.length)
    if resp.file is None:
        for start in range(0, total, size):
            yield resp.body[start:min(start + size, total)]
        return
    with open(resp.file.path, "rb") as f:
        done = 0
        while done < total:
            data = os.pread(f.fileno(), min(size, total - done), resp.file.offset + done)
            if not data:
                raise ConnectionAbortedError(f"{resp.file.path} shrank while being sent")
            done += len(data)
            yield data


def _corrupted(resp: Response) -> Iterator[bytes]:
    """The body with a few bytes inverted (same length), away from both ends."""
    n = resp.length
    flips = {n // 3, n // 2, (2 * n) // 3} if n else set()
    pos = 0
    for data in _chunks(resp):
        hit = [p - pos for p in flips if pos <= p < pos + len(data)]
        if hit:
            buf = bytearray(data)
            for i in hit:
                buf[i] ^= 0xFF
            data = bytes(buf)
        pos += len(data)
        yield data


class Writer:
    """Sends one response on ``sock``; ``count`` is told every body byte written."""

    def __init__(self, sock: socket.socket, stop: threading.Event,
                 count: Callable[[int], None], idle: Callable[[], None]) -> None:
        self.sock = sock
        self.stop = stop
        self.count = count
        self.idle = idle  # called before a deliberate stall, so the log does not wait for it

    def _send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.count(len(data))

    def body(self, resp: Response, fault: Optional[Fault]) -> bool:
        """Write the body; returns False if the connection must be closed afterwards."""
        kind = fault.kind if fault is not None else None
        if kind in ("drop", "stall"):
            for data in _chunks(resp, fault.after_bytes):
                self._send(data)
            if kind == "stall":
                self.idle()
                self._stall(fault.seconds)
            return False
        if kind == "corrupt":
            for data in _corrupted(resp):
                self._send(data)
            return True
        if kind == "slow":
            piece = max(1, -(-resp.length // SLOW_PIECES))
            pieces = max(1, -(-resp.length // piece))
            for data in _chunks(resp, size=piece):
                if self.stop.wait(fault.seconds / pieces):
                    return False
                self._send(data)
            return True
        if resp.file is not None:
            _sendfile(self.sock, resp.file.path, resp.file.offset, resp.file.length, self.count)
        elif resp.body:
            self._send(resp.body)
        return True

    def stall(self, seconds: float) -> None:
        """Public alias of the stall loop (used for HEAD requests, which have no body)."""
        self.idle()
        self._stall(seconds)

    def _stall(self, seconds: float) -> None:
        """Send nothing for ``seconds``; end early on ``stop`` or when the client hangs up."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        while not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if poller.poll(int(min(left, 0.1) * 1000) + 1):
                try:
                    if not self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                        return  # client closed its end
                except BlockingIOError:
                    continue
                except OSError:
                    return
                self.stop.wait(min(left, 0.1))  # pipelined request bytes: keep stalling
