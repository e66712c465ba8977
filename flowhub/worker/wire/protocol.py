"""Message framing between the caller, the zygote and the workers.

One message on a connected ``AF_UNIX`` stream socket is::

    !IQ prefix (JSON header length, body length) | JSON header | body bytes

File descriptors (a sealed memfd of tensors, a worker's socket) travel as ``SCM_RIGHTS`` ancillary
data on the first ``sendmsg`` of a message; the kernel never merges such a segment with the data of
another message, so they always arrive with the prefix. Received descriptors are close-on-exec.

Both ends use the same two functions. Deadlines are absolute ``time.monotonic()`` values (``None``
waits for ever); a deadline that passes raises :class:`TimeoutError`, a closed peer raises
:class:`PeerClosed`.

A request from the caller is answered by exactly one reply, but while a call runs a worker may first
make requests of its own, which the caller answers before it goes on waiting (a sandboxed worker has
no network, so the caller downloads weights for it)::

    worker -> caller   {"request": "fetch", "kind": "weights"|"file", "url", ...}
    caller -> worker   {"reply": "fetch", "ok": true, "path", "fingerprint"} | {"reply": "fetch", "ok": false, "error"}

:func:`is_request` tells such a request from the call's reply.
"""
from __future__ import annotations

import array
import json
import os
import socket
import struct
import time
from typing import List, Optional, Sequence, Tuple
from flowhub.errors import PeerClosed, ProtocolError  # noqa: F401  (re-exported: defined in errors.py)

_PREFIX = struct.Struct("!IQ")
MAX_FDS = 4
#: Caps on what one message may announce (a receiver may pass smaller ones). Nothing is allocated for
#: a part before its bytes arrive, so a peer that announces more than it sends costs nothing.
MAX_HEADER = 16 << 20  # a JSON header (tensor table, traceback text) never gets near this
MAX_BODY = 1 << 30  # a pickled skeleton or exception; tensors travel in a memfd, not in the body
_CHUNK = 1 << 20
_JOIN_BODY = 1 << 17  # bodies up to this size go in the same write as the header
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * 4)
_CMSG_CLOEXEC, _CTRUNC = int(socket.MSG_CMSG_CLOEXEC), int(socket.MSG_CTRUNC)  # plain ints: no IntFlag per call

Message = Tuple[dict, bytes, List[int]]


def _timeout(sock: socket.socket, seconds: Optional[float]) -> None:
    """``sock.settimeout(seconds)`` unless it is set so already (each call is a system call)."""
    if seconds is not None or sock.gettimeout() is not None:
        sock.settimeout(seconds)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def send_message(sock: socket.socket, header: dict, body: bytes = b"", fds: Sequence[int] = ()) -> None:
    """Send one message; ``fds`` are duplicated into the receiver (the sender keeps its own)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    first = _PREFIX.pack(len(head), len(body)) + head
    if body and len(body) <= _JOIN_BODY:  # one write: the receiver wakes once, with the whole message
        first, body = first + body, b""
    _timeout(sock, None)
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        sent = sock.sendmsg([first], ancillary)
        if sent < len(first):
            sock.sendall(first[sent:])
    else:
        sock.sendall(first)
    if body:
        sock.sendall(body)


def send_nowait(sock: socket.socket, header: dict) -> bool:
    """Send one small body-less message only if the socket takes it at once (``False``: nothing was
    sent). For code that must not block (a finalizer releasing proxies). If the socket takes only part
    of it, the rest gets one second; after a :class:`TimeoutError` then, the stream is broken."""
    head = json.dumps(header, separators=(",", ":")).encode()
    data = _PREFIX.pack(len(head), 0) + head
    sock.settimeout(0.0)  # a timeout left by the last call would make send() wait for writability first
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    finally:
        sock.settimeout(None)
    if sent < len(data):
        sock.settimeout(1.0)
        try:
            sock.sendall(data[sent:])
        finally:
            sock.settimeout(None)
    return True


def _recv_exact(sock: socket.socket, n: int, deadline: Optional[float]) -> bytes:
    """``n`` bytes, allocated as they arrive (at most one chunk ahead of what the peer really sent)."""
    chunks: List[bytes] = []
    got = 0
    while got < n:
        _timeout(sock, _remaining(deadline))
        chunk = sock.recv(min(n - got, _CHUNK))
        if not chunk:
            raise PeerClosed("peer closed the connection in the middle of a message")
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def recv_message(sock: socket.socket, deadline: Optional[float] = None, max_header: int = MAX_HEADER,
                 max_body: int = MAX_BODY) -> Message:
    """Receive one message: ``(header, body, fds)``. The caller owns (and must close) ``fds``.

    A message announcing a header over ``max_header`` or a body over ``max_body`` bytes raises
    :class:`ProtocolError` before anything of it is read.
    """
    fds: List[int] = []
    try:
        _timeout(sock, _remaining(deadline))
        data, ancdata, flags, _ = sock.recvmsg(_PREFIX.size, _ANCILLARY_SPACE, _CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
        if not data:
            raise PeerClosed("peer closed the connection")
        if flags & _CTRUNC:
            raise ProtocolError("file descriptors were truncated (more than %d sent)" % MAX_FDS)
        if len(data) < _PREFIX.size:
            data = bytes(data) + _recv_exact(sock, _PREFIX.size - len(data), deadline)
        head_len, body_len = _PREFIX.unpack(data)
        if head_len > max_header or body_len > max_body:
            raise ProtocolError(f"message too large (header {head_len} B, body {body_len} B; the limits are "
                                f"{max_header} and {max_body} B)")
        head = _recv_exact(sock, head_len, deadline)
        body = _recv_exact(sock, body_len, deadline) if body_len else b""
        try:
            header = json.loads(head)
        except (ValueError, RecursionError) as exc:
            raise ProtocolError(f"bad message header: {type(exc).__name__}: {exc}") from None
        if not isinstance(header, dict):
            raise ProtocolError("message header is not a JSON object")
        return header, body, fds
    except BaseException:
        close_fds(fds)
        raise


def is_request(header: dict) -> bool:
    """True for a request a worker makes of the caller during a call (rather than the call's reply)."""
    return "request" in header


def peer_credentials(sock: socket.socket) -> Tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket, as of its ``connect``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


def close_fds(fds: Sequence[int]) -> None:
    """Close descriptors, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

