"""The caller's handle on its zygote: start it (fork or spawn), talk to it, stop it.

The zygote is started lazily, once per caller process:

* **fork** (``"auto"`` in a small single-threaded process, i.e. before oneflow is imported there):
  a copy of the caller cleans itself up (:func:`flowhub.worker.proc.zygote.main_forked`) and imports
  oneflow in parallel with the caller's own import, which saves starting Python and importing
  flowhub again (~0.15 s of a first load);
* **spawn** otherwise: a fresh interpreter running :data:`ZYGOTE_MODULE`'s ``main`` (:func:`zygote_command`)
  started from a thread that lives as long as the zygote, because ``PR_SET_PDEATHSIG`` fires when
  the *thread* that forked a child exits.

Either way the zygote is this process's child and dies with it (``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from flowhub.errors import WorkerCrashedError
from flowhub.settings import JOB_VARIABLES, worker_environ
from flowhub.worker.wire import protocol

#: The zygote's entry point, named as a string: the caller's side never imports the process side.
ZYGOTE_MODULE = "flowhub.worker.proc.zygote"
#: The folder holding the ``flowhub`` package (put on a spawned zygote's path).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
ZYGOTE_START_TIMEOUT = 180.0
_ZYGOTE_CALL_TIMEOUT = 30.0


class _ForkedChild:
    """The subset of ``subprocess.Popen`` used here, for a zygote forked from this process."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (os.wait(), SIGCHLD ignored): is it there?
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    self.returncode = -1
            else:
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"zygote {self.pid}", timeout or 0)
            time.sleep(0.002)
        return self.returncode  # type: ignore[return-value]

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)


_FORK_MAX_RSS = 512 << 20  # above this, copy-on-write after the fork would cost the caller too much


def _can_fork_zygote() -> bool:
    """True on the main thread of a small single-threaded process (so oneflow is not imported yet)."""
    try:
        if threading.current_thread() is not threading.main_thread() or threading.active_count() != 1:
            return False
        if len(os.listdir("/proc/self/task")) != 1:
            return False
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") < _FORK_MAX_RSS
    except (OSError, ValueError, IndexError):
        return False


class ZygoteHandle:
    """Handle on the zygote process (caller side). All methods are called under ``self.lock``."""

    def __init__(self, start_method: str = "auto", *, env: Optional[Dict[str, str]] = None, flavour: str = "",
                 cwd: Optional[str] = None) -> None:
        """``env``/``cwd``: of a spawned zygote (default: this process's); ``flavour``: ``"sandbox"`` for
        the zygote of sandboxed workers (always spawned, with a scrubbed ``env``)."""
        self.lock = threading.Lock()
        self.start_method = start_method
        self.env, self.flavour, self.cwd = env, flavour, cwd
        self.proc: Optional[Any] = None  # subprocess.Popen or _ForkedChild
        self.sock: Optional[socket.socket] = None
        self.pid: Optional[int] = None
        self.ready = False
        self.how = ""  # "fork" or "spawn", for tests and diagnostics

    def start(self) -> None:
        """Start the zygote without waiting for it to be ready (no-op if it runs)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.start_method == "fork" or (self.start_method == "auto" and _can_fork_zygote()):
                self.proc, self.how = self._fork(ours, theirs), "fork"
            else:
                self.proc, self.how = self._spawn(theirs), "spawn"
        finally:
            theirs.close()
        self.sock, self.ready, self.pid = ours, False, self.proc.pid

    def _spawn(self, theirs: socket.socket) -> subprocess.Popen:
        env = worker_environ(os.environ if self.env is None else self.env)  # never a rank of a job
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        return spawn_from_long_lived_thread(zygote_command(theirs.fileno(), self.flavour), pass_fds=(theirs.fileno(),),
                                            env=env, cwd=self.cwd, stdin=subprocess.DEVNULL, close_fds=True)

    @staticmethod
    def _fork(ours: socket.socket, theirs: socket.socket) -> _ForkedChild:
        caller = os.getpid()
        for stream in (sys.stdout, sys.stderr):  # or the child would print pending output again
            try:
                stream.flush()
            except Exception:
                pass
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                for name in JOB_VARIABLES:  # the zygote is no rank of a job (its oneflow must not join it)
                    os.environ.pop(name, None)
                importlib.import_module(ZYGOTE_MODULE).main_forked(theirs, caller)
            finally:
                os._exit(70)
        return _ForkedChild(pid)

    def wait_ready(self) -> None:
        assert self.sock is not None and self.proc is not None
        if self.ready:
            return
        try:
            header, _, fds = protocol.recv_message(self.sock, time.monotonic() + ZYGOTE_START_TIMEOUT)
        except (protocol.PeerClosed, OSError, TimeoutError) as exc:
            self.close()
            raise WorkerCrashedError(
                f"the flowhub zygote process failed to start ({type(exc).__name__}: {exc})") from None
        protocol.close_fds(fds)
        if not header.get("ready"):
            self.close()
            raise WorkerCrashedError(
                "the flowhub zygote process failed to import oneflow:\n" + str(header.get("error", "")))
        self.ready = True

    def request(self, header: dict, fds: Tuple[int, ...] = ()) -> dict:
        self.start()
        self.wait_ready()
        assert self.sock is not None
        try:
            protocol.send_message(self.sock, header, fds=fds)
            reply, _, extra = protocol.recv_message(self.sock, time.monotonic() + _ZYGOTE_CALL_TIMEOUT)
        except (protocol.PeerClosed, OSError, TimeoutError) as exc:
            self.close()
            raise WorkerCrashedError(
                f"the flowhub zygote process stopped answering ({type(exc).__name__}: {exc})") from None
        protocol.close_fds(extra)
        return reply

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self, wait: bool = True) -> None:
        """Stop the zygote (it kills its workers first) and forget it; ``wait`` for it to be gone."""
        if self.sock is not None:
            try:
                if self.ready:
                    protocol.send_message(self.sock, {"op": "exit"})
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        if self.proc is not None and not wait:
            self.proc = None  # it exits on its own; the thread that spawned it reaps it
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        self.ready, self.pid = False, None


def spawn_from_long_lived_thread(args: List[str], **kwargs: Any) -> subprocess.Popen:
    """Popen from a thread that lives exactly as long as the child.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, so spawning from a
    short-lived caller thread would kill the zygote with it.
    """
    box: Dict[str, Any] = {}
    started = threading.Event()

    def run() -> None:
        try:
            box["proc"] = subprocess.Popen(args, **kwargs)
        except BaseException as exc:  # reported to the spawning caller below
            box["error"] = exc
            return
        finally:
            started.set()
        box["proc"].wait()

    threading.Thread(target=run, name="flowhub-zygote-parent", daemon=True).start()
    started.wait()
    if "error" in box:
        raise box["error"]
    return box["proc"]


def zygote_command(fd: int, flavour: str = "") -> List[str]:
    """The command line of a spawned zygote serving socket ``fd`` for this process."""
    return [sys.executable, "-c", f"import importlib; importlib.import_module({ZYGOTE_MODULE!r}).main()",
            str(fd), str(os.getpid())] + ([flavour] if flavour else [])


_FAULTHANDLER_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


def describe_status(status: dict) -> str:
    """How a worker ended, in words, from the zygote's status (``exitcode`` / ``signal`` / ``cause``)."""
    if status.get("cause"):  # a sandboxed worker ended by one of its limits (see sandbox_host)
        return f"{describe_status(dict(status, cause=None))}: {status['cause']}"
    if "signal" in status:
        try:
            sig = signal.Signals(status["signal"])
        except ValueError:
            return f"it was killed by signal {status['signal']}"
        hint = " (its Python stack was printed on stderr)" if sig in _FAULTHANDLER_SIGNALS else ""
        return f"it was killed by {sig.name}{hint}"
    if "exitcode" in status:
        return f"it exited with code {status['exitcode']}"
    return "its exit status is unknown (the zygote that forked it is gone)"


def worker_sys_path() -> List[str]:
    """This process's import path without its working folder and main script's folder, whose
    modules (a caller's own ``models.py``) would otherwise shadow the repository's (pytorch#65881)."""
    own = {os.path.realpath(os.getcwd())}
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        own.add(os.path.realpath(os.path.dirname(os.path.abspath(main_file))))
    return [p for p in sys.path if isinstance(p, str) and p and os.path.realpath(p) not in own]
