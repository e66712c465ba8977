"""flowhub.worker.wire.protocol: framing, fd passing, deadlines, size caps (no oneflow, real sockets)."""
from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import threading
import time

import pytest

from flowhub.errors import PeerClosed, ProtocolError
from flowhub.worker.wire import protocol

PAGE = os.sysconf("SC_PAGE_SIZE")


# -- helpers -------------------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def open_fds() -> set:
    """This process's open descriptors of the memfds these tests make (other threads of a full run,
    a watchdog reading /proc for instance, open and close descriptors of their own meanwhile)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fcntl.fcntl(int(name), fcntl.F_GETFD)
            if not os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:wire-test"):
                continue
        except OSError:
            continue
        out.add(name)
    return out


def frame(header, body: bytes = b"") -> bytes:
    """The bytes of one message, built by hand from the documented layout."""
    head = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("!IQ", len(head), len(body)) + head + body


def send_raw(sock: socket.socket, data: bytes, fds=()) -> None:
    """Send ``data`` with ``fds`` on its first segment, as a peer (hostile or not) could."""
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        data = data[sent:]
    sock.sendall(data)


def memfd_with(content: bytes) -> int:
    fd = os.memfd_create("wire-test", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def read_fd(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


class Peer(threading.Thread):
    """Runs ``fn`` in a thread and re-raises its exception in ``join``."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.error = fn, None

    def run(self):
        try:
            self.fn()
        except BaseException as exc:  # pragma: no cover - reported by join()
            self.error = exc

    def join(self, timeout=10):
        super().join(timeout)
        assert not self.is_alive(), "peer thread hung"
        if self.error is not None:
            raise self.error


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield a, b
    a.close()
    b.close()


def soon(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


# -- round trips ---------------------------------------------------------------------------------------
def test_round_trip_header_and_body(pair):
    a, b = pair
    header = {"op": "call", "args": [1, 2.5, None, True, "ünïcödé ✓"], "nested": {"k": [{"x": -3}]}}
    protocol.send_message(a, header, b"\x00\x01body\xff")
    got, body, fds = protocol.recv_message(b, soon())
    assert got == header
    assert body == b"\x00\x01body\xff"
    assert fds == []


def test_empty_header_and_no_body(pair):
    a, b = pair
    protocol.send_message(a, {})
    assert protocol.recv_message(b, soon()) == ({}, b"", [])


def test_wire_layout_is_prefix_compact_json_body(pair):
    """The documented layout, byte for byte: !IQ (header length, body length), compact JSON, body."""
    a, b = pair
    protocol.send_message(a, {"a": 1, "b": [1, 2]}, b"xyz")
    raw = b.recv(1 << 16)
    head = b'{"a":1,"b":[1,2]}'
    assert raw == struct.pack("!IQ", len(head), 3) + head + b"xyz"


def test_hand_built_message_is_understood(pair):
    a, b = pair
    a.sendall(frame({"reply": "x"}, b"payload"))
    assert protocol.recv_message(b, soon()) == ({"reply": "x"}, b"payload", [])


def test_fds_arrive_with_the_message_duplicated_and_cloexec(pair):
    a, b = pair
    mine = [memfd_with(b"first"), memfd_with(b"second")]
    try:
        protocol.send_message(a, {"fds": 2}, b"b", fds=mine)
        header, body, fds = protocol.recv_message(b, soon())
        try:
            assert header == {"fds": 2} and body == b"b"
            assert len(fds) == 2
            assert not set(fds) & set(mine), "the receiver gets its own descriptors"
            for theirs, ours in zip(fds, mine):
                assert os.fstat(theirs).st_ino == os.fstat(ours).st_ino
                assert fcntl.fcntl(theirs, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert [read_fd(fd) for fd in fds] == [b"first", b"second"]
            for fd in mine:  # the sender keeps its own
                os.fstat(fd)
        finally:
            protocol.close_fds(fds)
    finally:
        protocol.close_fds(mine)


def test_max_fds_is_accepted(pair):
    a, b = pair
    mine = [memfd_with(str(i).encode()) for i in range(protocol.MAX_FDS)]
    try:
        protocol.send_message(a, {}, fds=mine)
        _, _, fds = protocol.recv_message(b, soon())
        try:
            assert [read_fd(fd) for fd in fds] == [str(i).encode() for i in range(protocol.MAX_FDS)]
        finally:
            protocol.close_fds(fds)
    finally:
        protocol.close_fds(mine)


def test_large_header_and_body_with_an_fd(pair):
    """Several MiB each way: the sender blocks until the receiver drains, so it runs in a thread."""
    a, b = pair
    body = os.urandom(5 << 20) + b"end"
    header = {"text": "x" * (3 << 20), "n": 7}
    fd = memfd_with(b"big")
    peer = Peer(lambda: protocol.send_message(a, header, body, fds=[fd]))
    peer.start()
    try:
        got, got_body, fds = protocol.recv_message(b, soon())
        peer.join()
        assert got == header
        assert got_body == body
        assert [read_fd(f) for f in fds] == [b"big"]
        protocol.close_fds(fds)
    finally:
        os.close(fd)


def test_several_messages_back_to_back_keep_their_own_fds(pair):
    a, b = pair
    fd1, fd3 = memfd_with(b"one"), memfd_with(b"three")
    try:
        protocol.send_message(a, {"i": 1}, b"1", fds=[fd1])
        protocol.send_message(a, {"i": 2}, b"22")
        protocol.send_message(a, {"i": 3}, b"", fds=[fd3])
        protocol.send_message(a, {"i": 4})
        got = []
        for _ in range(4):
            header, body, fds = protocol.recv_message(b, soon())
            got.append((header["i"], body, [read_fd(f) for f in fds]))
            protocol.close_fds(fds)
        assert got == [(1, b"1", [b"one"]), (2, b"22", []), (3, b"", [b"three"]), (4, b"", [])]
    finally:
        protocol.close_fds([fd1, fd3])


def test_peer_writing_byte_by_byte(pair):
    """A peer whose bytes come one at a time (fds on the first byte): the prefix, the header and the body
    are each put together from partial reads, and the next message still starts at the right byte."""
    a, b = pair
    first = frame({"request": "fetch", "url": "https://example.invalid/w.bin"}, b"BODY" * 20)
    second = frame({"reply": "fetch", "ok": True}, b"tail")
    fd = memfd_with(b"dribbled")

    def dribble():
        for data, fds in ((first, [fd]), (second, [])):
            for i in range(len(data)):
                if i == 0 and fds:
                    send_raw(a, data[:1], fds)
                else:
                    a.send(data[i:i + 1])
                if i % 8 == 0:
                    time.sleep(0.0005)

    peer = Peer(dribble)
    peer.start()
    try:
        header, body, fds = protocol.recv_message(b, soon())
        assert header == {"request": "fetch", "url": "https://example.invalid/w.bin"}
        assert body == b"BODY" * 20
        assert [read_fd(f) for f in fds] == [b"dribbled"]
        protocol.close_fds(fds)
        assert protocol.recv_message(b, soon()) == ({"reply": "fetch", "ok": True}, b"tail", [])
        peer.join()
    finally:
        os.close(fd)


def test_fds_not_on_the_prefix_are_dropped_not_leaked(pair):
    """Descriptors a peer attaches to the middle of a message are not handed out (only the prefix's
    segment carries them) and do not stay open in the receiver."""
    a, b = pair
    head = b'{"a":"' + b"x" * 40 + b'"}'
    data = frame(head, b"body")
    fd = memfd_with(b"x")
    before = open_fds()
    a.sendall(data[:20])
    send_raw(a, data[20:], [fd, fd])
    os.close(fd)
    assert protocol.recv_message(b, soon()) == ({"a": "x" * 40}, b"body", [])
    assert open_fds() <= before - {str(fd)}


def test_deadline_none_waits_for_a_late_peer(pair):
    a, b = pair
    timer = threading.Timer(0.1, lambda: protocol.send_message(a, {"late": True}))
    timer.start()
    try:
        assert protocol.recv_message(b, None) == ({"late": True}, b"", [])
    finally:
        timer.join()


# -- deadlines -----------------------------------------------------------------------------------------
def test_passed_deadline_raises_and_consumes_nothing(pair):
    a, b = pair
    protocol.send_message(a, {"kept": 1}, b"body")
    with pytest.raises(TimeoutError, match="deadline passed"):
        protocol.recv_message(b, time.monotonic() - 1)
    assert protocol.recv_message(b, soon()) == ({"kept": 1}, b"body", [])


def test_deadline_with_nothing_sent(pair):
    _, b = pair
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        protocol.recv_message(b, start + 0.1)
    assert 0.08 <= time.monotonic() - start < 3


@pytest.mark.parametrize("cut", [5, 12, 14, "body"], ids=["mid-prefix", "after-prefix", "mid-header", "mid-body"])
def test_deadline_passing_mid_message(pair, cut):
    a, b = pair
    data = frame({"x": "y" * 50}, b"z" * 100)
    cut = len(data) - 50 if cut == "body" else cut
    fd = memfd_with(b"closed?")
    before = open_fds()
    send_raw(a, data[:cut], [fd])
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        protocol.recv_message(b, start + 0.05)
    assert time.monotonic() - start < 3
    os.close(fd)
    assert open_fds() <= before, "descriptors received with a timed-out message are closed"


# -- a peer that closes --------------------------------------------------------------------------------
def test_peer_closed_before_a_message(pair):
    a, b = pair
    a.close()
    with pytest.raises(PeerClosed, match="peer closed the connection") as info:
        protocol.recv_message(b, soon())
    assert isinstance(info.value, EOFError)


def test_peer_closed_after_a_whole_message(pair):
    a, b = pair
    protocol.send_message(a, {"last": True})
    a.close()
    assert protocol.recv_message(b, soon()) == ({"last": True}, b"", [])
    with pytest.raises(PeerClosed):
        protocol.recv_message(b, soon())


@pytest.mark.parametrize("cut", [1, 11, 12, 15, "body"], ids=["1-byte", "11-bytes", "prefix", "mid-header", "mid-body"])
def test_peer_closed_mid_message(pair, cut):
    a, b = pair
    data = frame({"x": "y" * 50}, b"z" * 100)
    cut = len(data) - 1 if cut == "body" else cut
    fd = memfd_with(b"x")
    before = open_fds()
    send_raw(a, data[:cut], [fd])
    os.close(fd)
    a.close()
    with pytest.raises(PeerClosed, match="in the middle of a message"):
        protocol.recv_message(b, soon())
    assert open_fds() <= before - {str(fd)}, "descriptors of a cut message are closed"


# -- size caps -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_len,body_len", [
    (protocol.MAX_HEADER + 1, 0),
    (2, protocol.MAX_BODY + 1),
    (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF),
], ids=["header", "body", "both-huge"])
def test_forged_prefix_announcing_too_much(pair, head_len, body_len):
    """Refused from the prefix alone: nothing after it is read, nothing of that size is allocated."""
    a, b = pair
    a.sendall(struct.pack("!IQ", head_len, body_len) + b"{}rest")
    before = rss()
    with pytest.raises(ProtocolError, match="message too large") as info:
        protocol.recv_message(b, soon())
    assert rss() - before < (4 << 20)
    assert f"header {head_len} B, body {body_len} B" in str(info.value)
    b.setblocking(False)
    assert b.recv(100) == b"{}rest", "not one byte after the prefix was read"


def test_receiver_caps(pair):
    """A receiver's own caps: a part exactly at its cap is accepted, one byte over is refused."""
    a, b = pair
    head = b'{"k":"0123456789"}'
    a.sendall(frame(head, b"B" * 10))
    assert protocol.recv_message(b, soon(), max_header=len(head), max_body=10) == ({"k": "0123456789"}, b"B" * 10, [])
    a.sendall(frame(head, b"B" * 10))
    with pytest.raises(ProtocolError, match=f"the limits are {len(head) - 1} and 10 B"):
        protocol.recv_message(b, soon(), max_header=len(head) - 1, max_body=10)
    assert drain(b) == head + b"B" * 10
    a.sendall(frame(head, b"B" * 10))
    with pytest.raises(ProtocolError, match=f"the limits are {len(head)} and 9 B"):
        protocol.recv_message(b, soon(), max_header=len(head), max_body=9)


@pytest.mark.parametrize("ending", ["close", "deadline"])
def test_announced_but_unsent_bytes_cost_nothing(pair, ending):
    """A prefix within the caps (1 GiB body, 16 MiB header) followed by a few bytes: memory is only
    taken for the bytes that really arrive."""
    a, b = pair
    a.sendall(struct.pack("!IQ", 2, protocol.MAX_BODY) + b"{}" + b"z" * 4096)
    if ending == "close":
        a.close()
    before = rss()
    with pytest.raises(PeerClosed if ending == "close" else TimeoutError):
        protocol.recv_message(b, time.monotonic() + 0.1)
    assert rss() - before < (16 << 20)


def test_announced_header_within_cap_but_unsent(pair):
    a, b = pair
    a.sendall(struct.pack("!IQ", protocol.MAX_HEADER, 0) + b'{"a":')
    a.close()
    before = rss()
    with pytest.raises(PeerClosed):
        protocol.recv_message(b, soon())
    assert rss() - before < (8 << 20)


def test_too_many_fds_refused_and_all_closed(pair):
    a, b = pair
    mine = [memfd_with(b"x") for _ in range(protocol.MAX_FDS + 2)]
    before = open_fds()
    try:
        send_raw(a, frame({"x": 1}), mine)
        with pytest.raises(ProtocolError, match=f"truncated \\(more than {protocol.MAX_FDS} sent\\)"):
            protocol.recv_message(b, soon())
        assert open_fds() <= before
    finally:
        protocol.close_fds(mine)


def test_fds_of_a_refused_prefix_are_closed(pair):
    a, b = pair
    fd = memfd_with(b"x")
    before = open_fds()
    send_raw(a, struct.pack("!IQ", protocol.MAX_HEADER + 1, 0), [fd])
    os.close(fd)
    with pytest.raises(ProtocolError):
        protocol.recv_message(b, soon())
    assert open_fds() <= before - {str(fd)}


# -- malformed headers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("head,message", [
    (b"not json", "bad message header: JSONDecodeError"),
    (b"", "bad message header: JSONDecodeError"),
    (b'{"a": "\xff\xfe"}', "bad message header: UnicodeDecodeError"),
    (b"[" * 100_000 + b"]" * 100_000, "bad message header: RecursionError"),
    (b"[1, 2]", "message header is not a JSON object"),
    (b'"text"', "message header is not a JSON object"),
    (b"null", "message header is not a JSON object"),
], ids=["garbage", "empty", "bad-utf8", "deep", "list", "string", "null"])
def test_bad_header_refused_and_stream_stays_in_step(pair, head, message):
    """The whole bad message is consumed: the next one is read from its first byte."""
    a, b = pair
    fd = memfd_with(b"x")
    before = open_fds()
    peer = Peer(lambda: (send_raw(a, frame(head, b"body"), [fd]), a.sendall(frame({"next": 1}))))
    peer.start()
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(")):
        protocol.recv_message(b, soon())
    peer.join()
    os.close(fd)
    assert open_fds() <= before - {str(fd)}
    assert protocol.recv_message(b, soon()) == ({"next": 1}, b"", [])


# -- send_nowait ---------------------------------------------------------------------------------------
def fill(sock: socket.socket) -> int:
    """Fill ``sock``'s send buffer; the number of bytes that went in."""
    sock.settimeout(None)
    n = 0
    chunk = b"f" * 4096
    while True:
        try:
            n += sock.send(chunk, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
    while True:  # top up with single bytes
        try:
            n += sock.send(b"f", socket.MSG_DONTWAIT)
        except BlockingIOError:
            return n


def drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = []
    try:
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            out.append(data)
    except BlockingIOError:
        pass
    sock.setblocking(True)
    return b"".join(out)


def test_send_nowait_sends_a_message(pair):
    a, b = pair
    assert protocol.send_nowait(a, {"mode": "proxy", "op": "release", "release": [1, 2]}) is True
    assert protocol.recv_message(b, soon()) == ({"mode": "proxy", "op": "release", "release": [1, 2]}, b"", [])


def test_send_nowait_on_a_full_socket_sends_nothing(pair):
    a, b = pair
    filled = fill(a)
    start = time.monotonic()
    assert protocol.send_nowait(a, {"op": "release"}) is False
    assert time.monotonic() - start < 0.5
    assert drain(b) == b"f" * filled, "not one byte of the message went out"


def test_send_nowait_after_recv_with_deadline_does_not_block(pair):
    a, b = pair
    filled = fill(a)
    protocol.send_message(b, {"reply": "call"})
    assert protocol.recv_message(a, time.monotonic() + 0.15)[0] == {"reply": "call"}  # as pool.call() does
    start = time.monotonic()
    try:
        assert protocol.send_nowait(a, {"op": "release"}) is False
        assert time.monotonic() - start < 0.05
    finally:
        assert len(drain(b)) == filled


# -- small helpers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("header,expected", [
    ({"request": "fetch", "kind": "weights", "url": "u"}, True),
    ({"request": None}, True),
    ({"reply": "fetch", "ok": True}, False),
    ({"ok": True, "value": {"request": "nested"}}, False),
    ({}, False),
])
def test_is_request(header, expected):
    assert protocol.is_request(header) is expected


def test_close_fds_ignores_closed_descriptors():
    r, w = os.pipe()
    os.close(r)
    protocol.close_fds([r, w, w])
    with pytest.raises(OSError):
        os.fstat(w)
