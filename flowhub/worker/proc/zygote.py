"""The zygote: a clean process that has imported oneflow once and forks workers on request.

The caller spawns it (``python -c 'from flowhub.worker.proc.zygote import main; main()' FD CALLER_PID``)
with one end of a socketpair, or, when the caller is a single-threaded process that has not
imported oneflow yet, forks it (:func:`main_forked`), which saves starting Python again. It
imports flowhub, oneflow, numpy and cloudpickle (never repository code), says
``{"ready": true}``, then serves, one at a time::

    {"op": "fork", "spec": {repo_dir, mock_torch, env, cwd, sys_path}} + the worker's socket fd
        [+ the write ends of its stdout and stderr pipes] -> {"pid": N}; the child sets itself up
        and runs flowhub.worker.proc.child.main
    {"op": "reap", "pid": N, "kill": bool} -> {"exitcode": C} | {"signal": S} | {"unknown": true}
    {"op": "exit"} -> kills every worker and exits

Forking after ``import oneflow`` is safe for CPU work (the child runs single-threaded) and takes
~10 ms, instead of ~0.7 s to start Python and import oneflow again. Workers are this process's
children, so only it can reap them: a worker's pid is never reused before the caller asked for its
status. Lifetime is chained with ``PR_SET_PDEATHSIG``: caller dies -> zygote gets SIGKILL -> every
worker gets SIGKILL. The zygote also exits (killing its workers) when the caller's socket closes.
"""
from __future__ import annotations

import ctypes
import importlib
import os
import signal
import socket
import sys
import time
from typing import Callable, Optional, Sequence, Set

#: What every worker needs, imported once here (module names, as CPython's forkserver preloads them).
PRELOAD = ("cloudpickle", "numpy", "oneflow", "oneflow.hub", "flowhub.context", "flowhub.worker.proc.child")
PR_SET_NAME = 15
PR_SET_PDEATHSIG = 1
_REAP_GRACE = 2.0


def set_parent_death_signal(expected_parent: int, name: Optional[bytes] = None) -> None:
    """Get SIGKILL when our parent dies; exit now if it already has (the race before prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if name:
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    if os.getppid() != expected_parent:
        os._exit(0)


def _status(raw: int) -> dict:
    if os.WIFSIGNALED(raw):
        return {"signal": os.WTERMSIG(raw)}
    return {"exitcode": os.WEXITSTATUS(raw)}


class Zygote:
    """The zygote's request loop (runs in the zygote process)."""

    def __init__(self, sock: socket.socket, close_in_child: Optional[Callable[[], None]] = None) -> None:
        """``close_in_child``: closes every descriptor of this process a worker must not keep (default:
        ``sock``); a zygote service passes one that closes its listener and every client's socket."""
        self.sock = sock
        self.close_in_child = close_in_child or sock.close
        self.children: Set[int] = set()  # forked and not reaped yet

    def fork(self, spec: dict, sock_fd: int, output: Sequence[int] = ()) -> int:
        """Fork a worker serving ``sock_fd``; ``output`` (optional): the write ends of the pipes that
        become its stdout and stderr (sandboxed workers never get the caller's own descriptors)."""
        pid = os.fork()
        if pid == 0:  # --- the worker ---
            try:
                self.close_in_child()
                set_parent_death_signal(_zygote_pid, b"flowhub-worker")
                become_worker(spec, sock_fd, output)
            finally:
                os._exit(70)
        for fd in (sock_fd, *output):
            os.close(fd)
        self.children.add(pid)
        return pid

    def reap(self, pid: int, kill: bool) -> dict:
        if pid not in self.children:
            return {"unknown": True}
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = self._wait(pid)
        self.children.discard(pid)
        return status

    @staticmethod
    def _wait(pid: int) -> dict:
        deadline = time.monotonic() + _REAP_GRACE
        while True:
            try:
                done, raw = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return {"unknown": True}
            if done:
                return _status(raw)
            if time.monotonic() > deadline:  # closed its socket but lingers: finish it
                os.kill(pid, signal.SIGKILL)
                _, raw = os.waitpid(pid, 0)
                return _status(raw)
            time.sleep(0.002)

    def kill_all(self) -> None:
        for pid in self.children:
            try:
                os.killpg(pid, signal.SIGKILL)  # a sandboxed worker leads a group with its subprocesses
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children.clear()

    def answer(self, header: dict, fds: list) -> Optional[dict]:
        """The reply to one ``fork``/``reap`` request (``None`` for ``exit``); takes ``fds``."""
        from flowhub.worker.wire import protocol

        op = header.get("op")
        if op == "fork" and len(fds) in (1, 3):
            return {"pid": self.fork(header.get("spec") or {}, fds[0], fds[1:])}
        protocol.close_fds(fds)
        if op == "reap":
            return self.reap(int(header["pid"]), bool(header.get("kill")))
        if op == "exit":
            return None
        return {"error": f"bad zygote request {op!r}"}

    def serve(self) -> None:
        from flowhub.worker.wire import protocol

        while True:
            try:
                header, _, fds = protocol.recv_message(self.sock)
            except (protocol.PeerClosed, ConnectionError):
                return
            reply = self.answer(header, fds)
            if reply is None:
                return
            protocol.send_message(self.sock, reply)


def become_worker(spec: dict, sock_fd: int, output: Sequence[int] = ()) -> None:
    """In a fresh fork of a zygote (already detached from its sockets): take ``output`` as stdout and
    stderr, the caller's environment, folder and path, then serve ``sock_fd``; never returns."""
    for target, fd in zip((1, 2), output):
        os.dup2(fd, target)
        os.close(fd)
    _prepare_worker(spec)
    from flowhub.worker.proc import child

    child.main(sock_fd, spec)


def parent_death_signal(name: bytes = b"flowhub-worker") -> None:
    """Get SIGKILL when this zygote (our parent) dies: for a process the zygote just forked."""
    set_parent_death_signal(_zygote_pid, name)


def _prepare_worker(spec: dict) -> None:
    """Give the fresh worker the caller's environment, folder and import path (as of the fork)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    env = spec.get("env")
    if isinstance(env, dict):
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
    cwd = spec.get("cwd")
    if cwd:
        try:
            os.chdir(cwd)
        except OSError:
            pass
    path = spec.get("sys_path")
    if isinstance(path, list):
        sys.path[:] = [str(p) for p in path]
    if spec.get("sandbox"):  # locked down now: single-threaded, before any repository code
        from flowhub.worker.proc import sandbox_child

        sandbox_child.enter(spec)
    _reseed()
    import faulthandler

    faulthandler.enable()  # a segfault in repo code leaves a Python traceback on stderr


def _reseed() -> None:
    """Forked workers would otherwise all share the zygote's random state."""
    import numpy as np
    import oneflow as flow

    np.random.seed(int.from_bytes(os.urandom(4), "little"))
    flow.seed()


def _warm() -> Optional[str]:
    """Run a typical load once (:mod:`flowhub.worker.proc.warmup`); a failure there is reported like an
    import failure (captured output), since workers would fail the same way."""
    try:
        from flowhub.worker.proc import warmup

        warmup.exercise()
    except Exception:
        import traceback

        return traceback.format_exc()
    return None


def import_quietly() -> Optional[str]:
    """Import what every worker needs with fds 1/2 captured (oneflow's import chatter is noise the
    caller already printed once). Returns the captured text if an import failed, else ``None``."""
    capture = os.memfd_create("zygote-import", os.MFD_CLOEXEC)
    saved = os.dup(1), os.dup(2)
    failure = None
    try:
        os.dup2(capture, 1)
        os.dup2(capture, 2)
        try:
            for name in PRELOAD:
                importlib.import_module(name)
        except BaseException:
            import traceback

            traceback.print_exc()
            failure = ""
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
    if failure is not None:
        failure = os.pread(capture, 1 << 20, 0).decode(errors="replace")
    os.close(capture)
    return failure


_zygote_pid = 0


def warm_up(sandboxed: bool) -> Optional[str]:
    """Become a zygote: import what workers need (a ``sandboxed`` zygote, whose workers sandbox
    themselves, also warms the sandbox). Returns the captured output if an import failed."""
    global _zygote_pid
    _zygote_pid = os.getpid()
    failure = import_quietly()
    if failure is None:
        failure = _warm()
    if failure is None and sandboxed:
        from flowhub.worker.proc import sandbox_child

        sandbox_child.prepare()
    return failure


def _serve_forever(sock: socket.socket, sandboxed: bool = False) -> None:
    """Import what workers need, say ready (or why not), serve; never returns."""
    failure = warm_up(sandboxed)
    from flowhub.worker.wire import protocol

    if failure is not None:
        protocol.send_message(sock, {"ready": False, "error": failure[-20000:]})
        os._exit(1)
    protocol.send_message(sock, {"ready": True, "pid": _zygote_pid})
    zygote = Zygote(sock)
    try:
        zygote.serve()
    finally:
        zygote.kill_all()
        os._exit(0)


def main(argv: Optional[list] = None) -> None:
    """Entry point of a spawned zygote process: ``argv[1]`` is its socket, ``argv[2]`` the caller's pid,
    ``argv[3]`` (optional) ``sandbox`` for the zygote of sandboxed workers."""
    argv = sys.argv if argv is None else argv
    fd, caller = int(argv[1]), int(argv[2])
    set_parent_death_signal(caller, b"flowhub-zygote")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve_forever(socket.socket(fileno=fd), sandboxed=argv[3:4] == ["sandbox"])


def main_forked(sock: socket.socket, caller: int) -> None:
    """Entry point of a zygote forked from a single-threaded caller that has not imported oneflow.

    This skips starting Python and importing flowhub again (~0.15 s of a first load), at the price
    of starting from the caller's state, which is cleaned first: inherited descriptors are pointed
    at /dev/null (so stale file objects can never close a descriptor reused later), the caller's
    Python signal handlers are reset, and the caller's own modules (anything not from the standard
    library, site-packages or flowhub) are dropped from ``sys.modules``, so a repository's
    ``import models`` finds the repository's package and not the caller's.
    """
    set_parent_death_signal(caller, b"flowhub-zygote")
    _detach_inherited_fds(keep=(1, 2, sock.fileno()))
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD, signal.SIGALRM):
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _forget_caller_modules()
    _serve_forever(sock)


def _detach_inherited_fds(keep: tuple) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd == devnull:
            continue
        try:
            os.dup2(devnull, fd, inheritable=fd <= 2)
        except OSError:
            pass  # the descriptor listdir used, already closed
    os.close(devnull)


def _library_roots() -> tuple:
    import site
    import sysconfig

    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    roots.add(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # flowhub itself
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


def _forget_caller_modules() -> None:
    roots = _library_roots()
    for name, module in list(sys.modules.items()):
        if name == "__main__" or module is None:
            continue
        files = [getattr(module, "__file__", None)] if getattr(module, "__file__", None) else \
            list(getattr(module, "__path__", None) or [])
        if files and not all(os.path.realpath(str(f)).startswith(roots) for f in files):
            del sys.modules[name]
