"""The caller's side of the shared zygote service: find it, start it once, fork workers from it.

``FLOWHUB_ZYGOTE=shared`` (the default): every process of one user and environment forks its workers
from one warm zygote service (:mod:`flowhub.worker.proc.service`), so only the first process ever pays
for starting Python and importing oneflow a second time. The service's socket lives in the runtime
folder (:func:`flowhub.settings.runtime_dir`, mode 0700, owned by this user, checked before use) and
is named after the environment's identity digest (:mod:`flowhub.worker.wire.identity`): a process of
another environment (interpreter, packages, flowhub sources, import-shaping variables, flavour) looks
for another socket and never uses this one. Connecting checks the service's uid (``SO_PEERCRED``) and
digest; a socket nobody answers on (a killed service) or whose service serves something else is
replaced under the folder's file lock, so sixteen processes starting at once start one service.

:class:`SharedZygoteHandle` has the interface of :class:`flowhub.worker.host.launch.ZygoteHandle`, so
the worker pool and the sandbox host use either.
"""
from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from flowhub import settings as settings_mod
from flowhub.errors import WorkerCrashedError
from flowhub.worker.host.launch import PACKAGE_ROOT, ZYGOTE_START_TIMEOUT
from flowhub.worker.wire import identity, protocol

#: The service's entry point, named as a string: the caller's side never imports the process side.
SERVICE_MODULE = "flowhub.worker.proc.service"
_HELLO_TIMEOUT = 30.0
_CALL_TIMEOUT = 30.0
_LOG_KEEP = 1 << 20


class UnsafeRuntimeDir(WorkerCrashedError):
    """The runtime folder exists but another user could enter it or owns it: never used."""


def secure_runtime_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if missing; raise :class:`UnsafeRuntimeDir` unless it is a real folder
    owned by this user that nobody else may enter."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise UnsafeRuntimeDir(f"cannot create the flowhub runtime folder {path}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UnsafeRuntimeDir(
            f"the flowhub runtime folder {path} is not a folder of uid {os.getuid()} with mode 0700 "
            f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)}); remove it, or point "
            f"{settings_mod.ENV_RUNTIME_DIR} elsewhere")
    return path


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Refused(Exception):
    """A socket that exists but whose service must not be used (dead, another environment or user)."""


class ServiceMismatch(WorkerCrashedError):
    """No zygote service can match this process: a fresh interpreter finds other packages than its
    ``sys.path`` does."""


class _IdentityChanged(Exception):
    """A service started for this environment found other files than this process saw (an upgrade or
    an edit in between)."""


class SharedZygoteHandle:
    """A connection to the zygote service of this environment. Methods are called under ``self.lock``."""


    def __init__(self, flavour: str = "", *, env: Optional[Dict[str, str]] = None,
                 zygote: Optional[settings_mod.ZygoteSettings] = None, fallback: Optional[Any] = None) -> None:
        """``flavour``: ``"sandbox"`` for the service of sandboxed workers; ``env``: the environment it
        starts with (default: the import-shaping variables of this one, see ``ZygoteSettings``);
        ``fallback``: makes the per-process zygote used instead when no service can match this process
        (its ``sys.path`` finds other packages than a fresh interpreter does)."""
        self._fallback_factory = fallback
        self.fallback: Optional[Any] = None
        self.lock = threading.Lock()
        self.flavour = flavour
        self.zygote = zygote or settings_mod.ZygoteSettings.from_env()
        self.runtime_dir = self.zygote.runtime_dir
        base = dict(self.zygote.service_environ() if env is None else env)
        base["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, base.get("PYTHONPATH")) if p)
        self.env = base
        self._identify()
        self.sock: Optional[socket.socket] = None
        self._pid: Optional[int] = None
        self._ready = False
        self.started_service = False  # this handle launched the service it uses (for tests, diagnostics)
        self._starter: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _identify(self) -> None:
        """(Re)compute this environment's identity and the file names that follow from it."""
        self.digest, self.material = identity.identity(self.flavour, self.env)
        name = f"zygote-{self.flavour + '-' if self.flavour else ''}{self.digest}"
        self.path = os.path.join(self.runtime_dir, name + ".sock")
        self.lock_path = os.path.join(self.runtime_dir, name + ".lock")
        self.log_path = os.path.join(self.runtime_dir, name + ".log")

    # -- the ZygoteHandle interface ---------------------------------------------------------------------
    @property
    def how(self) -> str:
        return self.fallback.how if self.fallback is not None else "shared"

    @property
    def pid(self) -> Optional[int]:
        return self.fallback.pid if self.fallback is not None else self._pid

    @property
    def ready(self) -> bool:
        return self.fallback.ready if self.fallback is not None else self._ready

    def start(self) -> None:
        """Connect to the service, or begin starting it in the background (no-op when connected)."""
        if self.fallback is not None:
            return self.fallback.start()
        if self._starter is not None and self._starter.is_alive():
            return
        if self.sock is not None:
            if _alive(self._pid):
                return
            self.close()  # the service died: find or start its successor
        self._error = None
        try:
            if self._connect():
                return
        except _Refused:
            pass  # replaced below, under the lock
        except BaseException as exc:
            self._error = exc
            return
        self._starter = threading.Thread(target=self._start_in_background, name="flowhub-zygote-service",
                                         daemon=True)
        self._starter.start()

    def wait_ready(self) -> None:
        if self.fallback is not None:
            return self.fallback.wait_ready()
        if self._starter is not None:
            self._starter.join()
            self._starter = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, ServiceMismatch) and self._fallback_factory is not None:
                from flowhub.notices import notice

                notice(f"flowhub: using a zygote of this process's own: {error}")
                self.fallback = self._fallback_factory()
                self.fallback.start()
                return self.fallback.wait_ready()
            raise error
        if not self._ready:
            raise WorkerCrashedError("the flowhub zygote service could not be reached")

    def request(self, header: dict, fds: Tuple[int, ...] = ()) -> dict:
        self.start()
        self.wait_ready()
        if self.fallback is not None:
            return self.fallback.request(header, fds)
        assert self.sock is not None
        opened: list = []
        if header.get("op") == "fork" and len(fds) == 1:  # the worker writes to this process's stdout/stderr
            fds = tuple(fds) + _own_output(opened)
        pid = self._pid
        try:
            protocol.send_message(self.sock, header, fds=fds)
            reply, _, extra = protocol.recv_message(self.sock, time.monotonic() + _CALL_TIMEOUT)
        except (protocol.PeerClosed, OSError, TimeoutError) as exc:
            self.close()
            raise WorkerCrashedError(
                f"the flowhub zygote service (pid {pid}) stopped answering ({type(exc).__name__}: {exc}); "
                "the next call starts a new one") from None
        finally:
            protocol.close_fds(opened)
        protocol.close_fds(extra)
        return reply

    def alive(self) -> bool:
        if self.fallback is not None:
            return self.fallback.alive()
        return self.sock is not None and self._ready and _alive(self._pid)

    def close(self, wait: bool = True) -> None:
        """Say goodbye: the service kills this process's workers (the service itself stays up)."""
        if self.fallback is not None:
            return self.fallback.close(wait)
        if self._starter is not None:
            self._starter.join()
            self._starter = None
        if self.sock is not None:
            try:
                if self._ready:
                    protocol.send_message(self.sock, {"op": "exit"})
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        self._ready, self._pid = False, None

    # -- finding and starting the service ---------------------------------------------------------------
    def _connect(self) -> bool:
        """Use a running service: True if connected, False if none listens; :class:`_Refused` if the
        socket's service must not be used."""
        secure_runtime_dir(self.runtime_dir)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return False
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise _Refused(str(exc)) from None
            raise
        try:
            if protocol.peer_credentials(sock)[1] != os.getuid():
                raise _Refused(f"{self.path} is served by another user")
            protocol.send_message(sock, {"op": "hello", "identity": self.digest})
            reply, _, fds = protocol.recv_message(sock, time.monotonic() + _HELLO_TIMEOUT)
            protocol.close_fds(fds)
        except (protocol.PeerClosed, OSError, TimeoutError, ValueError) as exc:
            sock.close()
            raise _Refused(f"the service at {self.path} did not answer ({type(exc).__name__}: {exc})") from None
        except BaseException:
            sock.close()
            raise
        if not reply.get("ready") or reply.get("identity") != self.digest:
            sock.close()
            raise _Refused(f"the service at {self.path} serves another environment")
        self.sock, self._pid, self._ready = sock, int(reply["pid"]), True
        return True

    def _start_in_background(self) -> None:
        try:
            self._connect_or_launch()
        except BaseException as exc:  # raised by wait_ready in the calling thread
            self._error = exc

    def _connect_or_launch(self) -> None:
        try:
            self._connect_or_launch_once()
        except _IdentityChanged:  # packages or flowhub sources changed since this process looked: look again
            self._identify()
            try:
                self._connect_or_launch_once()
            except _IdentityChanged as exc:  # no: this process imports other files than a fresh one would
                raise ServiceMismatch(str(exc)) from None

    def _connect_or_launch_once(self) -> None:
        from filelock import FileLock, Timeout

        try:
            with FileLock(self.lock_path, timeout=ZYGOTE_START_TIMEOUT):
                try:
                    if self._connect():
                        return
                except _Refused:
                    pass
                try:
                    os.unlink(self.path)  # nobody (usable) answers there
                except FileNotFoundError:
                    pass
                self._launch()
                if not self._connect():
                    raise WorkerCrashedError(f"the flowhub zygote service started but {self.path} is missing")
                self.started_service = True
        except Timeout:
            raise WorkerCrashedError(
                f"waited {ZYGOTE_START_TIMEOUT:g} s for another process to start the flowhub zygote service "
                f"(lock {self.lock_path}); if no flowhub process is running, remove that file") from None

    def _launch(self) -> None:
        """Start the service and wait until it listens (or says why it cannot)."""
        read_end, write_end = os.pipe()
        command = [sys.executable, "-c", f"import importlib; importlib.import_module({SERVICE_MODULE!r}).main()",
                   self.path, self.digest, str(write_end), repr(self.zygote.idle_timeout)] + \
            ([self.flavour] if self.flavour else [])
        cwd = self.runtime_dir
        if self.flavour == "sandbox":
            cwd = self.env.get("HOME") or cwd
            os.makedirs(cwd, mode=0o700, exist_ok=True)
        try:
            try:  # the log keeps the last service's start-up chatter, not every one's
                keep = os.path.getsize(self.log_path) < _LOG_KEEP
            except OSError:
                keep = False
            with open(self.log_path, "ab" if keep else "wb") as log:
                proc = subprocess.Popen(command, env=self.env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=log, pass_fds=(write_end,), close_fds=True, start_new_session=True)
        finally:
            os.close(write_end)
        try:
            proc.wait(timeout=ZYGOTE_START_TIMEOUT)  # the launcher's first child exits once it has detached
            message = _read_line(read_end, ZYGOTE_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            message = {}
        finally:
            os.close(read_end)
        if not message.get("ready") and message.get("identity") not in (None, self.digest):
            raise _IdentityChanged(str(message.get("error")))
        if not message.get("ready"):
            raise WorkerCrashedError("the flowhub zygote service failed to start:\n" +
                                     str(message.get("error") or f"no word from it; see {self.log_path}"))


def _read_line(fd: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return {}
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    try:
        message = json.loads(data.decode(errors="replace") or "{}")
    except ValueError:
        return {}
    return message if isinstance(message, dict) else {}


def _own_output(opened: list) -> Tuple[int, int]:
    """This process's stdout and stderr descriptors, for a worker to write to (``/dev/null`` for a closed
    one, appended to ``opened`` for the caller to close)."""
    out = []
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            fd = os.open(os.devnull, os.O_WRONLY)
            opened.append(fd)
        out.append(fd)
    return out[0], out[1]


def sandbox_service_environ(runtime_dir: str) -> Dict[str, str]:
    """The environment the sandbox-flavour service starts with: what a sandboxed worker would get, with
    ``HOME`` and ``TMPDIR`` in a folder of the runtime folder."""
    from flowhub.sandbox import SandboxPolicy, environment

    return environment.scrubbed_environ(SandboxPolicy(scratch=os.path.join(runtime_dir, "sandbox-home")))


def make_zygote(start: Optional[str] = None, *, flavour: str = "", env: Optional[Dict[str, str]] = None,
                process_factory: Optional[Any] = None) -> Any:
    """The zygote a worker pool forks from: a :class:`SharedZygoteHandle` when ``start`` is ``"shared"``
    (``None``: ``FLOWHUB_ZYGOTE``, default shared), else ``process_factory()`` (a per-process zygote).
    An unsafe runtime folder is never used: the per-process zygote is, with a notice saying why."""
    from flowhub.notices import notice

    zygote = settings_mod.ZygoteSettings.from_env()
    if start == "shared" or (start is None and zygote.kind == "shared"):
        try:
            secure_runtime_dir(zygote.runtime_dir)
            return SharedZygoteHandle(flavour, env=env, zygote=zygote, fallback=process_factory)
        except UnsafeRuntimeDir as exc:
            notice(f"flowhub: not using a shared zygote service: {exc}")
    assert process_factory is not None
    return process_factory()


def forked_for_caller(zygotes: list) -> List[int]:
    """Pids the shared services among ``zygotes`` have forked for this process and not reaped yet."""
    pids: List[int] = []
    for zygote in zygotes:
        if zygote is None or zygote.how != "shared":
            continue
        with zygote.lock:
            if zygote.alive():
                try:
                    pids.extend(zygote.request({"op": "status"}).get("mine", []))
                except WorkerCrashedError:
                    pass
    return pids


def service_status(flavour: str = "", zygote: Optional[settings_mod.ZygoteSettings] = None) -> Dict[str, Any]:
    """The service of this environment (``running``, pid, callers, workers, ...), without starting one."""
    return _status_of(SharedZygoteHandle(flavour, zygote=zygote))


def stop_services(runtime_dir: str) -> int:
    """Shut down every zygote service of this user in ``runtime_dir`` (their workers die with them);
    returns how many were stopped."""
    stopped = 0
    try:
        names = sorted(os.listdir(runtime_dir))
    except FileNotFoundError:
        return 0
    for name in names:
        if not (name.startswith("zygote-") and name.endswith(".sock")):
            continue
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.path.join(runtime_dir, name))
            if protocol.peer_credentials(sock)[1] != os.getuid():
                continue
            digest = name[:-len(".sock")].rsplit("-", 1)[-1]
            protocol.send_message(sock, {"op": "hello", "identity": digest})
            reply, _, fds = protocol.recv_message(sock, time.monotonic() + _HELLO_TIMEOUT)
            protocol.close_fds(fds)
            if reply.get("ready"):
                protocol.send_message(sock, {"op": "shutdown"})
                protocol.recv_message(sock, time.monotonic() + _CALL_TIMEOUT)
                stopped += 1
        except (OSError, protocol.PeerClosed, TimeoutError, ValueError):
            pass
        finally:
            sock.close()
    return stopped


def zygote_report() -> Dict[str, Any]:
    """Where workers come from, for ``flowhub doctor``: the setting, the runtime folder and each
    flavour's service (running or not, pid, callers, workers, idle exit), never starting one."""
    zygote = settings_mod.ZygoteSettings.from_env()
    report: Dict[str, Any] = {"kind": zygote.kind, "runtime_dir": zygote.runtime_dir,
                              "idle_timeout": zygote.idle_timeout}
    if zygote.kind == "shared":
        try:
            secure_runtime_dir(zygote.runtime_dir)
        except UnsafeRuntimeDir as exc:
            report["problem"] = f"{exc} (falling back to a zygote per process)"
            return report
        sandbox = SharedZygoteHandle("sandbox", env=sandbox_service_environ(zygote.runtime_dir), zygote=zygote)
        report["services"] = {"plain": service_status("", zygote), "sandbox": _status_of(sandbox)}
    return report


def _status_of(handle: SharedZygoteHandle) -> Dict[str, Any]:
    info: Dict[str, Any] = {"socket": handle.path, "identity": handle.digest, "running": False}
    try:
        if handle._connect():
            info.update(handle.request({"op": "status"}), running=True)
    except (_Refused, WorkerCrashedError) as exc:
        info["problem"] = str(exc)
    finally:
        handle.close()
    info.pop("mine", None)
    return info


def describe_report(report: Dict[str, Any]) -> str:
    """``zygote_report()`` in lines of text."""
    import time as _time

    lines = [f"zygote:           {report['kind']} ({settings_mod.ENV_ZYGOTE}; 'process' for a zygote per process)"]
    if report["kind"] != "shared":
        return "\n".join(lines)
    lines.append(f"  runtime folder: {report['runtime_dir']} ({settings_mod.ENV_RUNTIME_DIR})")
    if report.get("problem"):
        lines.append(f"  !! {report['problem']}")
        return "\n".join(lines)
    for flavour, info in report.get("services", {}).items():
        if info.get("running"):
            age = max(0.0, _time.time() - float(info.get("started", _time.time())))
            lines.append(f"  {flavour + ' service:':<16} pid {info['pid']}, up {age:.0f} s, {info['callers'] - 1} other "
                         f"caller(s), {info['workers']} worker(s), {info['forked']} forked; exits after "
                         f"{info['idle_timeout']:g} s unused ({settings_mod.ENV_ZYGOTE_IDLE_TIMEOUT})")
        else:
            lines.append(f"  {flavour + ' service:':<16} not running (the first load starts it)"
                         + (f"; {info['problem']}" if info.get("problem") else ""))
        lines.append(f"  {'':<16} socket {info['socket']}")
    return "\n".join(lines)
