"""The caller's side: one zygote, one persistent worker per key, calls with timeouts and crash reports.

:class:`WorkerManager` starts the zygote lazily (:mod:`flowhub.worker.host.launch`), forks one worker
per :class:`~flowhub.worker.host.handle.WorkerKey`, sends each call to it, and turns every way a call
ends into a value (rebuilt, or proxied: see :mod:`flowhub.worker.host.proxy`) or a flowhub error
(the hubconf's own exception, ``WorkerCrashedError``, ``WorkerTimeoutError``). Idle workers are
reaped after ``idle_timeout``, at most ``max_workers`` are kept (LRU), none while the caller holds
proxies of its objects, and everything is killed at exit.
"""
from __future__ import annotations

import atexit
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from flowhub import settings as settings_mod
from flowhub.context import CallSettings
from flowhub.errors import TransferError, WorkerCrashedError, WorkerError, WorkerTimeoutError
from flowhub.worker.host.handle import WorkerHandle, WorkerKey, describe_call, hubconf_stamp
from flowhub.worker.host.launch import ZygoteHandle, describe_status, worker_sys_path
from flowhub.worker.host import service
from flowhub.worker.wire import failures, messages, protocol

ISOLATED_MODES = ("rebuild", "proxy")
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_WORKERS = 8


class WorkerManager:
    """Runs hubconf operations in isolated workers, one persistent worker per key."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_workers: int = DEFAULT_MAX_WORKERS,
                 zygote_start: Optional[str] = None) -> None:
        """``zygote_start``: ``"shared"`` (the zygote service of this user and environment), or a zygote
        of this process's own started by ``"spawn"``, ``"fork"`` (from this process, cleaned) or ``"auto"``
        (fork while single-threaded); ``None``: ``FLOWHUB_ZYGOTE`` (``shared``; ``process`` = ``"auto"``)."""
        if zygote_start not in (None, "shared", "auto", "fork", "spawn"):
            raise ValueError(f"zygote_start must be 'shared', 'auto', 'fork' or 'spawn', not {zygote_start!r}")
        self.idle_timeout = idle_timeout
        self.max_workers = max_workers
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self.zygote_start = zygote_start
        self._zygote = service.make_zygote(zygote_start, process_factory=lambda: ZygoteHandle(zygote_start or "auto"))
        self._sandbox: Optional[Any] = None  # sandbox.SandboxHost, made by the first sandboxed call
        self._workers: Dict[WorkerKey, WorkerHandle] = {}
        self._reaper: Optional[threading.Thread] = None
        self._wake = threading.Condition(self._lock)
        self._last_activity = time.monotonic()

    # -- public -----------------------------------------------------------------------------------
    def call(self, *, repo_dir: str, key: str, op: str, model: Optional[str] = None, args: tuple = (),
             kwargs: Optional[dict] = None, mode: str = "rebuild", settings: Optional[CallSettings] = None,
             timeout: Optional[float] = None, label: str = "", mock_torch: bool = False, weights: Optional[list] = None,
             sandbox: bool = False, extra_sys_path: Sequence[str] = (), overlay: Optional[Any] = None) -> Any:
        """Run ``op`` (``list``, ``help`` or ``load``) in the worker of ``key`` and return its result.

        The weight files the call used (URL, size, SHA-256) are appended to ``weights`` if given.

        ``mode="proxy"``: the result stays in the worker; plain values, tensors and proxies come back
        (see :mod:`flowhub.worker.host.proxy`).

        ``settings``: the caller's (``None``: the environment's, read now). ``args``/``kwargs`` go by value
        (cloudpickle; tensors through a sealed memfd). ``timeout`` (seconds; default ``worker_timeout``, or
        ``FLOWHUB_SANDBOX_TIMEOUT`` sandboxed) bounds the call once its worker runs. A worker whose
        ``hubconf.py`` changed on disk is replaced (the reference re-imports it on every call).

        ``sandbox=True``: a sandboxed worker from a scrubbed zygote (:mod:`flowhub.worker.host.sandbox`).
        ``extra_sys_path``: folders after the repository on the worker's path (its requirement overlay;
        ``overlay``: that overlay's private importer, through which a rebuilt result imports its modules).
        """
        if op not in messages.OPS:
            raise ValueError(f"unknown hub operation {op!r}; expected one of {', '.join(messages.OPS)}")
        if mode not in ISOLATED_MODES:
            raise ValueError(f"WorkerManager runs isolated modes only ({', '.join(ISOLATED_MODES)}), not {mode!r}")
        call = settings if settings is not None else CallSettings(settings_mod.resolve({}))
        if timeout is None:
            timeout = call.settings.worker_timeout
        sandbox_hub = None
        if sandbox:
            sandbox_hub = os.path.realpath(call.settings.hub_dir)
            if timeout is None:  # a sandboxed call never waits for ever (FLOWHUB_SANDBOX_TIMEOUT)
                timeout = settings_mod.SandboxLimits.from_env().timeout
            self.sandbox_host().prewarm()
        else:
            self.prewarm()  # the zygote imports oneflow while this process does the same below
        from flowhub.worker.wire import byvalue

        label = label or key
        context = describe_call(op, model, label)
        try:
            request = byvalue.encode((call.to_wire(), tuple(args), dict(kwargs or {}), byvalue.rng_state()))
        except Exception as exc:
            raise TransferError(f"{context}: the arguments cannot be sent to the worker by value "
                                f"({type(exc).__name__}: {exc})") from None
        repo_dir = os.path.abspath(repo_dir)
        extra = tuple(os.path.abspath(p) for p in extra_sys_path)
        worker = self._acquire(WorkerKey(key, os.path.realpath(repo_dir), bool(mock_torch), sandbox_hub, extra),
                               repo_dir, mock_torch, label)
        worker.settings = call  # for the requests a sandboxed worker makes during the call
        try:
            roots = [call.settings.hub_dir]
            result, used = self._call(worker, op, model, request, timeout, context, mode, roots, overlay)
            if weights is not None:
                weights.extend(used)
            return result
        finally:
            worker.last_used = self._last_activity = time.monotonic()
            worker.lock.release()
            self._after_call(worker)

    def prewarm(self) -> None:
        """Start the zygote now (without waiting) so a first call finds oneflow already imported."""
        if os.getpid() != self._owner:
            return
        with self._zygote.lock:
            self._zygote.start()

    def sandbox_host(self) -> Any:
        """The :class:`~flowhub.worker.host.sandbox.SandboxHost` of this manager's sandboxed workers."""
        with self._lock:
            if self._sandbox is None:
                from flowhub.worker.host.sandbox import SandboxHost

                self._sandbox = SandboxHost(self.zygote_start)
            return self._sandbox

    def active_pids(self) -> List[int]:
        """Pids of the processes this manager keeps: its own zygotes (if running; never a shared zygote
        service, which outlives it) and every live worker."""
        with self._lock:
            pids = [w.pid for w in self._workers.values() if w.pid is not None and not w.dead]
        return [z.pid for z in self._zygotes() if z.how != "shared" and z.alive() and z.pid] + pids

    def _zygotes(self) -> list:
        return [self._zygote] + ([self._sandbox.zygote()] if self._sandbox and self._sandbox.zygote() else [])

    def worker_pid(self, key: str) -> Optional[int]:
        """The pid of the live worker serving ``key`` (any repo dir / mock flag), or ``None``."""
        with self._lock:
            for ikey, w in self._workers.items():
                if ikey.key == key and not w.dead:
                    return w.pid
        return None

    def service_workers(self) -> List[int]:
        """Pids the shared zygote services forked for this manager and have not reaped yet."""
        return service.forked_for_caller(self._zygotes())

    @property
    def zygote_pid(self) -> Optional[int]:
        """The zygote's pid while it runs."""
        return self._zygote.pid if self._zygote.alive() else None

    @property
    def zygote_started_by(self) -> str:
        """How the current (or last) zygote was started: ``"fork"``, ``"spawn"``, ``"shared"`` or ``""``."""
        return self._zygote.how

    def shutdown(self, wait: bool = True) -> None:
        """Kill every worker and the zygote (``wait``: until they are gone). Later calls start them again."""
        if os.getpid() != self._owner:
            return  # a forked copy of the caller must not kill the parent's workers
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
            self._wake.notify_all()
        for w in workers:
            if w.sock is not None:
                w.sock.close()
                w.sock = None
            if not w.dead:
                w.ended.setdefault(w.gen, "was shut down (WorkerManager.shutdown)")
            w.dead = True
        with self._zygote.lock:
            self._zygote.close(wait)  # it kills and reaps the workers before exiting
        if self._sandbox is not None:
            self._sandbox.shutdown(wait)

    # -- workers ------------------------------------------------------------------------------------
    def _acquire(self, ikey: WorkerKey, repo_dir: str, mock_torch: bool, label: str) -> WorkerHandle:
        """The live worker for ``ikey``, locked for this call (forked if needed)."""
        while True:
            with self._lock:
                worker = self._workers.get(ikey)
                fresh = worker is None
                if fresh:
                    worker = self._workers[ikey] = WorkerHandle(ikey, label)
            worker.lock.acquire()
            if worker.dead:  # retired while we waited for it
                worker.lock.release()
                continue
            stamp = hubconf_stamp(repo_dir)
            alive = fresh or worker.looks_alive()
            if fresh or worker.stamp != stamp or not alive:
                if not fresh:
                    status = self._reap(worker, kill=True, why="was replaced because its hubconf.py changed")
                    if not alive:
                        worker.ended[worker.gen] = f"died ({describe_status(status)})"
                    worker.dead = False
                try:
                    self._fork(worker, repo_dir, mock_torch)
                    worker.stamp = stamp
                except BaseException:
                    worker.dead = True
                    self._forget(worker)
                    worker.lock.release()
                    raise
                self._evict_lru(keep=worker)
                self._start_reaper()
            worker.label = label
            return worker

    def _fork(self, worker: WorkerHandle, repo_dir: str, mock_torch: bool) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = {"repo_dir": repo_dir, "mock_torch": bool(mock_torch), "env": settings_mod.worker_environ(os.environ),
                "cwd": os.getcwd(), "sys_path": list(worker.ikey.extra_path) + worker_sys_path()}
        try:
            if worker.ikey.sandbox_hub is not None:
                reply = {"pid": self.sandbox_host().fork(spec, worker.ikey.sandbox_hub, theirs.fileno(), worker.label)}
            else:
                with self._zygote.lock:
                    reply = self._zygote.request({"op": "fork", "spec": spec}, (theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        if "pid" not in reply:
            ours.close()
            raise WorkerCrashedError(f"{worker.label}: the zygote could not fork a worker: {reply.get('error')}")
        worker.pid, worker.sock, worker.dead = int(reply["pid"]), ours, False
        worker.gen += 1

    def _reap(self, worker: WorkerHandle, kill: bool, why: str = "was stopped") -> dict:
        """Make sure the worker is gone and return how it ended (caller holds ``worker.lock``);
        ``why`` is what its stale proxies will say happened to it."""
        if not worker.dead:
            worker.ended.setdefault(worker.gen, why)
        if worker.sock is not None:
            worker.sock.close()
            worker.sock = None
        pid, worker.pid, worker.dead = worker.pid, None, True
        if pid is None:
            return {"unknown": True}
        if self._sandbox is not None and self._sandbox.owns(pid):  # with its subprocesses and folders
            return self._sandbox.reap(pid, kill)
        with self._zygote.lock:
            if not self._zygote.ready or not self._zygote.alive():
                return {"unknown": True}
            try:
                return self._zygote.request({"op": "reap", "pid": pid, "kill": kill})
            except WorkerError:
                return {"unknown": True}

    def _forget(self, worker: WorkerHandle) -> None:
        with self._lock:
            if self._workers.get(worker.ikey) is worker:
                del self._workers[worker.ikey]

    def _retire(self, worker: WorkerHandle) -> None:
        self._reap(worker, kill=True, why="was stopped (idle, or over max_workers)")
        self._forget(worker)

    def _after_call(self, worker: WorkerHandle) -> None:
        if worker.dead:
            self._forget(worker)

    def _evict_lru(self, keep: WorkerHandle) -> None:
        with self._lock:
            extra = len(self._workers) - self.max_workers
            candidates = sorted((w for w in self._workers.values() if w is not keep and not w.pinned()),
                                key=lambda w: w.last_used)
        for w in candidates:
            if extra <= 0:
                break
            if w.lock.acquire(blocking=False):
                try:
                    self._retire(w)
                    extra -= 1
                finally:
                    w.lock.release()

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap_idle, name="flowhub-worker-reaper", daemon=True)
                self._reaper.start()
            self._wake.notify_all()

    def _reap_idle(self) -> None:
        """Background thread: retire workers idle for ``idle_timeout``; stop the zygote once it has
        had no worker for that long too."""
        while True:
            with self._lock:
                if os.getpid() != self._owner:
                    return
                now = time.monotonic()
                free = [w for w in self._workers.values() if not w.pinned()]
                idle = [w for w in free if now - w.last_used >= self.idle_timeout]
                if not idle:
                    if free:
                        wake_at = min(w.last_used for w in free) + self.idle_timeout
                    elif self._workers:  # only workers holding proxied objects: look again later
                        wake_at = now + self.idle_timeout
                    else:
                        wake_at = self._last_activity + self.idle_timeout
                        if now >= wake_at:
                            self._reaper = None
                            break
                    self._wake.wait(timeout=max(0.05, wake_at - now))
                    continue
            for w in idle:
                if w.lock.acquire(blocking=False):
                    try:
                        if time.monotonic() - w.last_used >= self.idle_timeout and not w.pinned():
                            self._retire(w)
                    finally:
                        w.lock.release()
        with self._zygote.lock:
            with self._lock:
                if self._workers:  # a call came in meanwhile
                    return
            self._zygote.close()
        if self._sandbox is not None:
            with self._lock:
                if self._workers:
                    return
            self._sandbox.close_zygote()

    # -- one call -------------------------------------------------------------------------------------
    def _call(self, worker: WorkerHandle, op: str, model: Optional[str], request: Any, timeout: Optional[float],
              context: str, mode: str = "rebuild", roots: Sequence[str] = (), overlay: Optional[Any] = None) -> Any:
        """One call; ``roots``: where the files a result may be mapped from lie (the hub cache)."""
        from flowhub.worker.wire import transfer

        packed = transfer.pack(request.arrays, name="flowhub-args")
        table = [dict(entry, **meta) for entry, meta in zip(packed.table, request.meta)]
        header = {"op": op, "model": model, "mode": mode, "size": packed.size, "table": table}
        conn = None
        if mode == "proxy":
            conn = self._connection(worker, timeout)
            releases = conn.take_releases()
            if releases:
                header["release"] = releases
        try:
            reply, body, fds = self._exchange(worker, header, request.blob, packed, timeout, context)
        finally:
            packed.close()
        if conn is None:
            if not reply.get("ok"):
                protocol.close_fds(fds)
                if reply.get("fatal"):
                    self._reap(worker, kill=True)  # the hubconf failed to import: start afresh next time
                raise failures.from_reply(reply, body, context, worker.label)
            return messages.decode_result(reply, body, fds, context, roots, overlay)
        # proxy mode: the body is never unpickled, only read as the raw bytes of small tensors
        result = self._proxy_reply(worker, conn, reply, fds, context, body=body)
        return result, messages.checked_weights(reply.get("weights"), context)

    def _exchange(self, worker: WorkerHandle, header: dict, body: bytes, packed: Any, timeout: Optional[float],
                  context: str) -> protocol.Message:
        """Send one request and wait for its reply; a timeout or a dead worker becomes a flowhub error
        (and the worker is reaped). The caller holds ``worker.lock`` and closes ``packed``."""
        deadline = time.monotonic() + timeout if timeout else None
        assert worker.sock is not None
        if self._sandbox is not None and self._sandbox.owns(worker.pid):
            self._sandbox.begin_call(worker.pid)
        try:
            protocol.send_message(worker.sock, header, body, [packed.fd] if packed.fd is not None else [])
            return self._receive(worker, deadline)
        except TimeoutError:
            pid = worker.pid
            self._reap(worker, kill=True, why=f"was killed after a call took longer than {timeout:g} s")
            raise WorkerTimeoutError(context=context, pid=pid, timeout=timeout) from None
        except (protocol.PeerClosed, protocol.ProtocolError, OSError) as exc:
            pid = worker.pid
            status = self._reap(worker, kill=True)
            how = describe_status(status) if isinstance(exc, (protocol.PeerClosed, BrokenPipeError,
                                                                  ConnectionError)) else f"{type(exc).__name__}: {exc}"
            worker.ended[worker.gen] = f"died ({how})"
            raise WorkerCrashedError(context=context, pid=pid, how=how) from None
        except BaseException:  # KeyboardInterrupt and the like: the worker's state is unknown
            self._reap(worker, kill=True, why="was killed when a call to it was interrupted")
            raise

    def _receive(self, worker: WorkerHandle, deadline: Optional[float]) -> protocol.Message:
        """The worker's reply to the current request. A sandboxed worker may first send requests of
        its own (weight downloads, see :mod:`flowhub.worker.host.sandbox`): each is answered, and the
        wait for the reply goes on, under the same deadline."""
        state: dict = {}
        while True:
            header, body, fds = protocol.recv_message(worker.sock, deadline)  # type: ignore[arg-type]
            if not protocol.is_request(header):
                return header, body, fds
            protocol.close_fds(fds)
            if self._sandbox is None or not self._sandbox.owns(worker.pid):
                raise protocol.ProtocolError(f"unexpected request {str(header.get('request'))!r:.40} from a worker")
            self._sandbox.answer(worker.sock, worker.pid, header, worker.settings, state)

    # -- proxy mode -----------------------------------------------------------------------------------
    def _connection(self, worker: WorkerHandle, timeout: Optional[float]) -> Any:
        """The proxy connection of the worker's current process (made on first use)."""
        from flowhub.worker.host.proxy import Connection

        if worker.conn is None or worker.conn.gen != worker.gen:
            worker.conn = Connection(self, worker, timeout)
        worker.conn.timeout = timeout
        return worker.conn

    def proxy_request(self, conn: Any, header: dict, arrays: Sequence[Any], context: str) -> Any:
        """One request from a proxy (see :mod:`flowhub.worker.proc.objects`), with its arguments' arrays."""

        worker = conn.worker
        packed, arena = conn.outbox.pack(arrays)  # large arguments: through the connection's reused arena
        header.update(mode="proxy", size=packed.size, table=packed.table, **arena)
        try:
            with worker.lock:
                conn.check(context)
                releases = conn.take_releases()
                if releases:
                    header["release"] = releases
                try:
                    reply, body, fds = self._exchange(worker, header, packed.inline, packed, conn.timeout, context)
                finally:
                    worker.last_used = self._last_activity = time.monotonic()
                    self._after_call(worker)
                return self._proxy_reply(worker, conn, reply, fds, context, header.get("op") == "next", body)
        finally:
            packed.close()

    def _proxy_reply(self, worker: WorkerHandle, conn: Any, reply: dict, fds: List[int], context: str,
                     may_stop: bool = False, body: bytes = b"") -> Any:
        """Decode a proxy-mode reply (JSON and validated tensors only) or raise the error it reports."""
        if reply.get("ok") is not True:
            from flowhub.worker.wire import failures

            protocol.close_fds(fds)
            info = reply.get("error") if isinstance(reply.get("error"), dict) else {}
            if reply.get("fatal"):
                self._reap(worker, kill=True, why="was stopped after an error outside hubconf code")
                self._after_call(worker)
            if reply.get("kind") == "transfer":
                message = info.get("message") if isinstance(info.get("message"), str) else "transfer failed"
                raise TransferError(f"{context}: {message[:1 << 16]}")
            raise failures.from_description(info, context, worker.label)
        if may_stop and reply.get("stop") is True:  # next() on an exhausted iterator
            protocol.close_fds(fds)
            raise StopIteration
        return conn.decode(reply, fds, context, body)

    def flush_releases(self, conn: Any) -> None:
        """Send a connection's queued releases now if its worker is idle; never waits (finalizers call this)."""
        worker = conn.worker
        if os.getpid() != conn.owner:
            conn.pending.clear()
            return
        if not worker.lock.acquire(blocking=False):
            return  # a call is in progress (maybe in this very thread): the releases ride on the next one
        try:
            if worker.dead or worker.gen != conn.gen or worker.sock is None:
                conn.pending.clear()
                return
            items = conn.take_releases()
            if items and not protocol.send_nowait(worker.sock, {"mode": "proxy", "op": "release", "release": items}):
                conn.pending.extend(items)
        except Exception:  # the stream may be broken mid-message: make the next call find the worker dead
            try:
                worker.sock.shutdown(socket.SHUT_RDWR)
            except Exception:
                pass
        finally:
            worker.lock.release()


_manager: Optional[WorkerManager] = None
_manager_lock = threading.Lock()


def get_manager() -> WorkerManager:
    """The process-wide manager, created on first use and shut down at exit."""
    global _manager
    with _manager_lock:
        if _manager is None or _manager._owner != os.getpid():
            _manager = WorkerManager()
            # At exit, do not wait for the processes to tear down (~0.1 s): the zygote kills its
            # workers itself, and PR_SET_PDEATHSIG covers the case where it misses the message.
            atexit.register(_manager.shutdown, wait=False)
        return _manager


def _forget_after_fork() -> None:
    global _manager, _manager_lock
    _manager, _manager_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
