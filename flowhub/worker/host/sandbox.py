"""The caller's side of sandboxed workers: their own zygote, a scratch folder each, a watchdog, and
answers to the requests they make.

What :mod:`flowhub.sandbox` asks of a caller, done here for :class:`~flowhub.worker.host.pool.WorkerManager`:

* **a separate zygote, spawned with a scrubbed environment** (never forked from the caller, so it
  holds no token, no caller module and no caller memory), whose forks lock themselves down before
  they import anything of the repository (:func:`flowhub.worker.proc.sandbox_child.enter`);
* **a scratch folder per worker** (``HOME``, ``TMPDIR`` and the working folder; the only place it
  may write) and an *inbox* folder it may only read, both created before the fork and removed when
  the worker has been reaped;
* a :class:`~flowhub.sandbox.limits.Watchdog` per limit set, for memory and process count (the only
  process cap when running as root), and :func:`~flowhub.sandbox.limits.kill_tree` to end a worker
  with every process it started; a crash report names the limit that was hit;
* **downloads on the workers' behalf**: a sandboxed hubconf's ``load_state_dict_from_url`` /
  ``download_url_to_file`` arrive as ``fetch`` requests during a call (:meth:`SandboxHost.answer`).
  They are made here, through the caller's settings (without the GitHub token), locks, progress bars
  and lockfile expectations, only for http(s) URLs on the configured endpoints' hosts (and those in
  ``FLOWHUB_SANDBOX_ALLOWED_HOSTS``), so a hubconf cannot use the caller to reach internal hosts. A weight file already in ``<hub>/checkpoints``
  is shared (read-only); a new one is cached in ``<hub>/checkpoints/.sandboxed/``, never where a
  trusted load looks (weights are cached by file name, so an untrusted hubconf could otherwise plant
  a pickle that a later trusted load runs); ``download_url_to_file`` lands in the worker's inbox;
* one-shot workers for weights-only loads (:meth:`SandboxHost.run_once`).

Limits (:class:`Limits`; ``flowhub doctor`` shows each with how it is enforced) are read from the
environment when a worker is started, except the call time and the download quotas, read at each call:

=================================== ============================================== ==================
``FLOWHUB_SANDBOX_MAX_MEMORY``       memory of a worker and its subprocesses          4 GiB
``FLOWHUB_SANDBOX_MAX_PROCESSES``    processes of a worker, itself included           64
``FLOWHUB_SANDBOX_MAX_CPU``          CPU seconds over a worker's life                 3600
``FLOWHUB_SANDBOX_TIMEOUT``          seconds one call may take (unless                600
                                     ``FLOWHUB_WORKER_TIMEOUT`` is set)
``FLOWHUB_SANDBOX_MAX_SCRATCH``      size of the scratch tmpfs                        1 GiB
``FLOWHUB_SANDBOX_MAX_DOWNLOADS``    files fetched for one call                       32
``FLOWHUB_SANDBOX_MAX_DOWNLOAD_BYTES`` bytes fetched (and extracted) for one call    16 GiB
``FLOWHUB_SANDBOX_MAX_OUTPUT``       stdout + stderr relayed per call                 1 MiB
``FLOWHUB_SANDBOX_MIN_STRENGTH``     the weakest acceptable sandbox                   ``strong``
``FLOWHUB_SANDBOX_ALLOWED_HOSTS``    hosts besides the GitHub endpoints that a        none (``*``: any)
                                     sandboxed hubconf may have fetched
=================================== ============================================== ==================

A worker's stdout and stderr are pipes the caller relays (:mod:`flowhub.worker.host.output`), never the
caller's own descriptors.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from flowhub import units
from flowhub.errors import WorkerCrashedError, WorkerTimeoutError
from flowhub.settings import (ENV_SANDBOX_MAX_MEMORY, ENV_SANDBOX_MAX_PROCESSES, ENV_SANDBOX_MIN_STRENGTH,
                              SandboxLimits as Limits)
from flowhub.worker.host import fetch_service, output
from flowhub.worker.host.launch import ZygoteHandle, describe_status, worker_sys_path
from flowhub.worker.host.service import make_zygote, sandbox_service_environ
from flowhub.worker.wire import protocol
from flowhub.worker.wire.messages import EXIT_SANDBOX_WEAK

_WATCH_INTERVAL = 0.1


def _sandbox_zygote(home: str, start: Optional[str]) -> Any:
    """The zygote of sandboxed workers: the sandbox-flavour zygote service (``start`` ``"shared"``, or
    ``None`` with ``FLOWHUB_ZYGOTE`` shared), else one of this process's own, always *spawned*. Either
    starts with the environment a sandboxed worker would get (``HOME`` and ``TMPDIR`` in a folder of its
    own) and warms the sandbox before it says ready."""
    from flowhub.sandbox import SandboxPolicy, environment
    from flowhub.settings import ZygoteSettings

    def own() -> ZygoteHandle:
        os.makedirs(home, mode=0o700, exist_ok=True)
        return ZygoteHandle("spawn", env=environment.scrubbed_environ(SandboxPolicy(scratch=home)),
                            flavour="sandbox", cwd=home)

    return make_zygote(start, flavour="sandbox", process_factory=own,
                       env=sandbox_service_environ(ZygoteSettings.from_env().runtime_dir))


@dataclasses.dataclass
class _Slot:
    """The folders and limits of one sandboxed worker."""

    scratch: str
    inbox: str
    limits: Limits

    def remove(self) -> None:
        for path in (self.scratch, self.inbox):
            shutil.rmtree(path, ignore_errors=True)


def _state(pid: int) -> Optional[str]:
    """The one-letter state of ``pid`` (``"Z"`` for a zombie), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:].split()[0].decode()
    except (OSError, ValueError, IndexError):
        return None


def _let_shim_finish(pid: int, grace: float = 0.5) -> None:
    """A sandboxed worker runs under a shim (its pid here) that ends the way the worker ended: once the
    worker itself is gone, give the shim a moment to say how, before it is killed with the rest."""
    from flowhub.sandbox.limits import tree

    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _state(pid) not in (None, "Z") and tree(pid) == [pid]:
        time.sleep(0.005)


class SandboxHost:
    """Sandboxed workers of one :class:`~flowhub.worker.host.pool.WorkerManager` (see the module docstring)."""

    def __init__(self, zygote_start: Optional[str] = None) -> None:
        """``zygote_start``: as for :class:`~flowhub.worker.host.pool.WorkerManager` (``"shared"`` or
        ``None`` with ``FLOWHUB_ZYGOTE`` shared: the sandbox-flavour zygote service)."""
        self._zygote_start = zygote_start
        self._lock = threading.Lock()
        self._base: Optional[str] = None
        self._zygote: Optional[Any] = None  # ZygoteHandle or service.SharedZygoteHandle
        self._slots: Dict[int, _Slot] = {}
        self._watchdogs: Dict[Tuple[int, int], Any] = {}
        self._kills: Dict[int, Any] = {}
        self._count = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    def _ensure(self) -> Any:
        with self._lock:
            if self._base is None or not os.path.isdir(self._base):
                self._base = tempfile.mkdtemp(prefix="flowhub-sandbox-")
            if self._zygote is None:
                self._zygote = _sandbox_zygote(os.path.join(self._base, "zygote"), self._zygote_start)
            return self._zygote

    def prewarm(self) -> None:
        """Start the sandbox zygote now (without waiting), so it imports oneflow meanwhile."""
        zygote = self._ensure()
        with zygote.lock:
            zygote.start()

    def owns(self, pid: Optional[int]) -> bool:
        with self._lock:
            return pid in self._slots

    def zygote(self) -> Any:
        """The zygote handle of the sandboxed workers, if one was made."""
        return self._zygote

    def zygote_pid(self) -> Optional[int]:
        zygote = self._zygote
        return zygote.pid if zygote is not None and zygote.alive() else None

    def close_zygote(self, wait: bool = True) -> None:
        """Stop the sandbox zygote (it kills its workers); the next sandboxed call starts it again."""
        zygote = self._zygote
        if zygote is not None:
            with zygote.lock:
                zygote.close(wait)

    def shutdown(self, wait: bool = True) -> None:
        """Kill every sandboxed worker (with their subprocesses) and the zygote, remove every folder."""
        from flowhub.sandbox.limits import kill_tree

        with self._lock:
            slots, self._slots = dict(self._slots), {}
            watchdogs, self._watchdogs = list(self._watchdogs.values()), {}
        for pid in slots:
            kill_tree(pid)
        self.close_zygote(wait)
        for dog in watchdogs:
            dog.stop()
        for slot in slots.values():
            slot.remove()
        with self._lock:
            base, self._base, self._zygote = self._base, None, None
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)

    # -- workers --------------------------------------------------------------------------------------
    def fork(self, spec: dict, hub_dir: Optional[str], sock_fd: int, label: str) -> int:
        """Fork a sandboxed worker from the sandbox zygote; ``spec`` as for the zygote's ``fork``
        (its ``env`` is never sent). Returns its pid; it is watched until :meth:`reap`."""
        limits = Limits.from_env()
        zygote = self._ensure()
        with self._lock:
            self._count += 1
            name = os.path.join(self._base or tempfile.gettempdir(), f"w{self._count}")
        slot = _Slot(name + "-scratch", name + "-inbox", limits)
        os.makedirs(slot.scratch, mode=0o700)
        os.makedirs(slot.inbox, mode=0o700)
        if hub_dir:
            os.makedirs(hub_dir, exist_ok=True)  # Landlock grants only paths that exist
        spec = {k: v for k, v in spec.items() if k != "env"}
        spec.update(cwd=slot.scratch, sandbox=dict(
            limits.policy_options(), scratch=slot.scratch, hub_dir=hub_dir, read_paths=[slot.inbox],
            min_strength=limits.min_strength))
        relay, key = output.relay(), -self._count  # keyed by pid once the worker has one
        out_w, err_w = relay.pipes(key, label, limits.max_output)
        try:
            with zygote.lock:
                reply = zygote.request({"op": "fork", "spec": spec}, (sock_fd, out_w, err_w))
        except BaseException:
            relay.forget(key)
            slot.remove()
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
        if "pid" not in reply:
            relay.forget(key)
            slot.remove()
            raise WorkerCrashedError(f"{label}: the sandbox zygote could not fork a worker: {reply.get('error')}")
        pid = int(reply["pid"])
        relay.rekey(key, pid)
        with self._lock:
            self._slots[pid] = slot
        self._watchdog(limits).watch(pid)
        return pid

    def _watchdog(self, limits: Limits) -> Any:
        from flowhub.sandbox.limits import Watchdog

        key = (limits.max_memory, limits.max_processes)
        with self._lock:
            dog = self._watchdogs.get(key)
            if dog is None:
                dog = self._watchdogs[key] = Watchdog(max_rss=limits.max_memory, max_processes=limits.max_processes,
                                                      interval=_WATCH_INTERVAL, on_kill=self._on_kill).start()
            return dog

    def _on_kill(self, kill: Any) -> None:
        with self._lock:
            self._kills[kill.pid] = kill

    def reap(self, pid: int, kill: bool = True) -> dict:
        """End a sandboxed worker with every process it started, reap it, remove its folders, and
        return how it ended: the zygote's status plus a ``cause`` when a limit ended it."""
        from flowhub.sandbox.limits import kill_tree

        with self._lock:
            slot = self._slots.pop(pid, None)
        _let_shim_finish(pid)
        died_alone = _state(pid) in (None, "Z")
        kill_tree(pid)  # always: a worker's subprocesses must never outlive it
        status: dict = {"unknown": True}
        zygote = self._zygote
        if zygote is not None:
            with zygote.lock:
                if zygote.ready and zygote.alive():
                    try:
                        status = zygote.request({"op": "reap", "pid": pid, "kill": True})
                    except WorkerCrashedError:
                        status = {"unknown": True}
        with self._lock:
            dogs = list(self._watchdogs.values())
        for dog in dogs:
            dog.unwatch(pid)
        if slot is not None:
            slot.remove()
            cause = self._cause(pid, status, died_alone, slot.limits)
            if cause:
                status = dict(status, cause=cause)
        with self._lock:
            self._kills.pop(pid, None)
        output.relay().forget(pid)
        return status

    def begin_call(self, pid: Optional[int]) -> Limits:
        """A call to sandboxed worker ``pid`` starts: reset its output budget; returns its limits."""
        output.relay().begin_call(pid or 0)
        with self._lock:
            slot = self._slots.get(pid) if pid is not None else None
        return slot.limits if slot is not None else Limits.from_env()

    def _cause(self, pid: int, status: dict, died_alone: bool, limits: Limits) -> Optional[str]:
        kill = None
        deadline = time.monotonic() + (1.0 if died_alone and status.get("signal") == signal.SIGKILL else 0)
        while True:  # the watchdog records a kill just after making it: give it that moment
            with self._lock:
                kill = self._kills.get(pid)
            if kill is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if kill is not None and kill.reason == "memory":
            return (f"the sandbox watchdog killed it because it used {units.human_size(kill.rss)} of memory, over its limit "
                    f"of {units.human_size(limits.max_memory)} ({ENV_SANDBOX_MAX_MEMORY})")
        if kill is not None:
            return (f"the sandbox watchdog killed it because it ran {kill.processes} processes, over its limit "
                    f"of {limits.max_processes} ({ENV_SANDBOX_MAX_PROCESSES})")
        if status.get("exitcode") == EXIT_SANDBOX_WEAK:
            return (f"its sandbox could not be set up as required on this machine (see stderr, or run "
                    f"'flowhub doctor'; {ENV_SANDBOX_MIN_STRENGTH}={limits.min_strength})")
        if status.get("signal") == signal.SIGXCPU:
            return "it used up its CPU time limit"
        return None

    # -- requests from a worker -----------------------------------------------------------------------
    def answer(self, sock: socket.socket, pid: Optional[int], header: dict, settings: Any,
               state: dict) -> None:
        """Answer one request a sandboxed worker sent during a call (``state`` lives as long as the call).

        A request this host does not know raises :class:`~flowhub.worker.wire.protocol.ProtocolError` (the
        worker is then treated as crashed); a download that fails is reported to the worker, whose
        hubconf sees the exception.
        """
        with self._lock:
            slot = self._slots.get(pid) if pid is not None else None
        if slot is None or header.get("request") != "fetch" or header.get("kind") not in ("weights", "file"):
            raise protocol.ProtocolError(f"unexpected request {str(header.get('request'))!r:.40} "
                                         f"({str(header.get('kind'))!r:.40}) from a worker")
        try:
            reply = fetch_service.fetch(header, settings, state, slot.inbox, Limits.from_env())  # read per call
            reply["ok"] = True
        except Exception as exc:
            cls = type(exc)
            reply = {"ok": False, "error": {"type": f"{cls.__module__}.{cls.__qualname__}", "message": str(exc)[:1 << 16],
                                            "status": getattr(exc, "status", None)}}
        reply["reply"] = "fetch"
        protocol.send_message(sock, reply)

    # -- one-shot workers -----------------------------------------------------------------------------
    def run_once(self, spec: dict, read_path: str, header: dict, timeout: Optional[float],
                 what: str) -> Tuple[dict, List[int]]:
        """Fork a sandboxed worker that may read only ``read_path``, send it ``header``, and return its
        reply and descriptors (the caller owns them); the worker is reaped in every case."""

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            spec = dict(spec, repo_dir=read_path, mock_torch=False, sys_path=worker_sys_path())
            pid = self.fork(spec, None, theirs.fileno(), what)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reaped: Optional[dict] = None
        try:
            deadline = time.monotonic() + timeout if timeout else None
            try:
                protocol.send_message(ours, header)
                reply, _, fds = protocol.recv_message(ours, deadline)
            except TimeoutError:
                reaped = self.reap(pid)
                raise WorkerTimeoutError(context=what, pid=pid, timeout=timeout, what="sandboxed worker") from None
            except (protocol.PeerClosed, protocol.ProtocolError, OSError) as exc:
                reaped = self.reap(pid)
                how = describe_status(reaped) if isinstance(exc, (protocol.PeerClosed, ConnectionError)) \
                    else f"{type(exc).__name__}: {exc}"
                raise WorkerCrashedError(f"{what}: its sandboxed worker (pid {pid}) died: {how}") from None
            return reply, fds
        finally:
            ours.close()
            if reaped is None:
                self.reap(pid)
