"""The zygote service: one warm zygote per user and environment, shared by every caller process.

Started by the first caller that needs one (:mod:`flowhub.worker.host.service`, under a file lock)::

    python -c '...service.main()' SOCKET_PATH DIGEST READY_FD IDLE_SECONDS [sandbox]

it detaches (a second fork: it is never a caller's child), imports what workers need once
(:func:`flowhub.worker.proc.zygote.warm_up`), listens on ``SOCKET_PATH`` (created under a temporary
name with mode 0600 in the caller's 0700 folder, then renamed into place), says ``{"ready": ...}`` on
``READY_FD`` and serves. Each connection is one caller process:

* the peer's uid (``SO_PEERCRED``) must be this service's, and its first message must be
  ``{"op": "hello", "identity": DIGEST}`` with this service's digest
  (:func:`flowhub.worker.wire.identity.identity`); anything else is refused and the connection closed;
* then the requests of :class:`flowhub.worker.proc.zygote.Zygote` (``fork`` / ``reap`` / ``exit``), plus
  ``status`` (for ``flowhub doctor``) and ``shutdown``; each worker gets the caller's environment,
  folder, import path and stdout/stderr in its fork request, never the service's;
* the caller's death (its connection closing, or its pidfd, for a caller whose socket a forked child
  inherited) kills every worker it had; workers die with the service (``PR_SET_PDEATHSIG``).

The service exits after ``IDLE_SECONDS`` with no caller and no worker, and as soon as it has no caller
once its socket path has been taken over by another service (a replaced, stale or mismatched one).
"""
from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Dict, List, Optional

from flowhub.worker.proc import zygote as zygote_mod
from flowhub.worker.wire import identity, protocol

_REQUEST_TIMEOUT = 10.0  # a caller that starts a message finishes it within this
_TICK = 1.0


class _Caller:
    """One connected caller process and the workers forked for it."""

    def __init__(self, service: "Service", sock: socket.socket, pid: int) -> None:
        self.sock, self.pid = sock, pid
        self.greeted = False
        self.zygote = zygote_mod.Zygote(sock, close_in_child=service.close_in_child)
        try:
            self.pidfd: Optional[int] = os.pidfd_open(pid)
        except (OSError, AttributeError):
            self.pidfd = None


class _Spare:
    """A worker forked ahead of time, waiting for its first caller: a fork request is then answered at
    once, and the next spare is forked after the reply, while the caller waits for its worker anyway."""

    def __init__(self, service: "Service") -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # --- the spare ---
            try:
                ours.close()
                service.close_in_child()
                zygote_mod.parent_death_signal()
                header, _, fds = protocol.recv_message(theirs)
                theirs.close()
                if header.get("op") == "become" and len(fds) in (1, 3):
                    zygote_mod.become_worker(header.get("spec") or {}, fds[0], fds[1:])
            except BaseException:
                pass
            finally:
                os._exit(0)
        theirs.close()
        self.pid, self.sock = pid, ours

    def assign(self, spec: dict, fds: list) -> Optional[int]:
        """Hand the spare its worker's spec and descriptors (then closed here); ``None`` if the spare is
        gone (the descriptors are left to the caller, for an ordinary fork)."""
        try:
            protocol.send_message(self.sock, {"op": "become", "spec": spec}, fds=fds)
        except OSError:
            self.discard()
            return None
        protocol.close_fds(fds)
        self.sock.close()
        return self.pid

    def discard(self) -> None:
        self.sock.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


class Service:
    """The accept-and-serve loop (runs in the service process)."""

    def __init__(self, listener: socket.socket, path: str, digest: str, idle_timeout: float, flavour: str) -> None:
        self.listener: Optional[socket.socket] = listener
        self.path, self.digest, self.idle_timeout, self.flavour = path, digest, idle_timeout, flavour
        self.inode = os.stat(path).st_ino
        self.callers: Dict[int, _Caller] = {}  # by socket fd
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, "accept")
        self.started = time.time()
        self.last_active = time.monotonic()
        self.served = 0
        self.spare: Optional[_Spare] = None

    def close_in_child(self) -> None:
        """In a freshly forked worker: drop the selector (a shared epoll instance a worker could edit),
        the spare's control socket (a worker must never instruct the spare), the listener and every
        caller's connection."""
        self.selector.close()
        if self.spare is not None:
            self.spare.sock.close()
        if self.listener is not None:
            self.listener.close()
        for caller in self.callers.values():
            caller.sock.close()
            if caller.pidfd is not None:
                os.close(caller.pidfd)

    # -- callers --------------------------------------------------------------------------------------
    def accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        pid, uid, _ = protocol.peer_credentials(sock)
        if uid != os.getuid():  # only the user who started the service may use it
            print(f"flowhub zygote service: refused a connection from uid {uid} (pid {pid})", file=sys.stderr)
            sock.close()
            return
        caller = _Caller(self, sock, pid)
        self.callers[sock.fileno()] = caller
        self.selector.register(sock, selectors.EVENT_READ, caller)
        if caller.pidfd is not None:
            self.selector.register(caller.pidfd, selectors.EVENT_READ, ("gone", caller))

    def drop(self, caller: _Caller) -> None:
        """The caller is gone (or said ``exit``): kill its workers, forget it."""
        caller.zygote.kill_all()
        self.callers.pop(caller.sock.fileno(), None)
        for target in (caller.sock, caller.pidfd):
            if target is not None:
                try:
                    self.selector.unregister(target)
                except (KeyError, ValueError):
                    pass
        caller.sock.close()
        if caller.pidfd is not None:
            os.close(caller.pidfd)
        self.last_active = time.monotonic()

    def handle(self, caller: _Caller) -> bool:
        """Answer one request of ``caller``; False once the service should exit (``shutdown``)."""
        try:
            header, _, fds = protocol.recv_message(caller.sock, time.monotonic() + _REQUEST_TIMEOUT)
        except (protocol.PeerClosed, ConnectionError, OSError, TimeoutError, ValueError):
            self.drop(caller)
            return True
        op = header.get("op")
        self.last_active = time.monotonic()
        if not caller.greeted:
            protocol.close_fds(fds)
            if op == "hello" and header.get("identity") == self.digest:
                caller.greeted = True
                self._send(caller, {"ready": True, "pid": os.getpid(), "identity": self.digest})
            else:
                self._send(caller, {"ready": False, "identity": self.digest,
                                    "error": "this zygote service serves another environment"})
                self.drop(caller)
            return True
        if op == "status":
            protocol.close_fds(fds)
            self._send(caller, dict(self.status(), mine=sorted(caller.zygote.children)))
            return True
        if op == "shutdown":
            protocol.close_fds(fds)
            self._send(caller, {"ok": True})
            return False
        if op == "fork":
            self.served += 1
            if self.spare is not None and len(fds) in (1, 3):
                spare, self.spare = self.spare, None
                pid = spare.assign(header.get("spec") or {}, list(fds))
                if pid is not None:
                    caller.zygote.children.add(pid)
                    self._send(caller, {"pid": pid})
                    self.spare = _Spare(self)  # the next one, while this caller's worker starts
                    return True
        reply = caller.zygote.answer(header, list(fds))  # (and for a spare that was gone: the ordinary way)
        if reply is None:  # exit: this caller is done with its workers
            self.drop(caller)
        else:
            self._send(caller, reply)
        if op == "fork" and self.spare is None:  # only now: the worker's descriptors are closed here
            self.spare = _Spare(self)
        return True

    def _send(self, caller: _Caller, reply: dict) -> None:
        try:
            protocol.send_message(caller.sock, reply)
        except OSError:
            self.drop(caller)

    def status(self) -> dict:
        return {"pid": os.getpid(), "identity": self.digest, "flavour": self.flavour, "path": self.path,
                "started": self.started, "callers": len(self.callers), "forked": self.served,
                "workers": sum(len(c.zygote.children) for c in self.callers.values()),
                "idle_timeout": self.idle_timeout, "accepting": self.listener is not None,
                "spare": self.spare.pid if self.spare is not None else None}

    # -- the loop -------------------------------------------------------------------------------------
    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def _stop_accepting(self) -> None:
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select(_TICK):
                if key.data == "accept":
                    self.accept()
                elif isinstance(key.data, tuple):  # a caller's pidfd: it died
                    if key.data[1].sock.fileno() in self.callers:
                        self.drop(key.data[1])
                elif key.data.sock.fileno() in self.callers and not self.handle(key.data):
                    return
            if self.listener is not None and not self._still_ours():
                self._stop_accepting()  # replaced: finish with the callers we have, take no new one
            if not self.callers:
                if self.listener is None:
                    return
                if time.monotonic() - self.last_active >= self.idle_timeout:
                    return

    def close(self) -> None:
        if self.spare is not None:
            self.spare.discard()
        for caller in list(self.callers.values()):
            self.drop(caller)
        if self.listener is not None:
            if self._still_ours():
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
            self.listener.close()


def _listen(path: str) -> socket.socket:
    """A listening socket at ``path``, published by rename (never a half-made file at that name)."""
    temp = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(temp)
    finally:
        os.umask(old)
    sock.listen(64)
    os.rename(temp, path)
    return sock


def _detach() -> None:
    """Leave the caller that spawned us: a second fork (the first child exits at once and is reaped by
    the caller), so the service is nobody's child and no caller's exit or signal reaches it."""
    if os.fork() > 0:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point (see the module docstring); never returns."""
    argv = sys.argv if argv is None else argv
    path, digest, ready_fd, idle = argv[1], argv[2], int(argv[3]), float(argv[4])
    flavour = argv[5] if len(argv) > 5 else ""
    _detach()
    mine, _ = identity.identity(flavour, os.environ)  # before any import can change the environment

    def say(message: dict) -> None:
        os.write(ready_fd, (json.dumps(message) + "\n").encode())
        os.close(ready_fd)

    if mine != digest:
        say({"ready": False, "identity": mine, "error": "the service's environment differs from its caller's "
                                                       f"(identity {mine} != {digest}); check PYTHONPATH and sys.path"})
        os._exit(1)
    failure = zygote_mod.warm_up(sandboxed=flavour == "sandbox")
    if failure is not None:
        say({"ready": False, "error": failure[-20000:]})
        os._exit(1)
    try:
        listener = _listen(path)
    except OSError as exc:
        say({"ready": False, "error": f"cannot listen on {path}: {exc}"})
        os._exit(1)
    service = Service(listener, path, digest, idle, flavour)
    service.spare = _Spare(service)
    say({"ready": True, "pid": os.getpid()})
    try:
        service.serve()
    finally:
        service.close()
        os._exit(0)
