"""The caller's side: one zygote, one persistent worker per key, calls with timeouts and crash reports.

:class:`WorkerManager` starts the zygote lazily (``prewarm`` starts it early without waiting; see
:mod:`flowhub.worker.launcher`), asks it to fork one worker per key, sends each call to that key's
worker, and turns every way a call can end into a value or a flowhub error:

* a result: its tensors are validated and mapped from the sealed memfd, the skeleton unpickled
  (``mode="proxy"``: the value decoded from JSON, objects kept in the worker as
  :class:`~flowhub.worker.proxy.Proxy` handles; nothing from the worker is unpickled);
* an exception from hubconf code: re-raised with its own type when importable here, else
  ``HubconfError`` (see :mod:`flowhub.worker.failures`);
* the worker died: ``WorkerCrashedError`` with its exit code or signal (the zygote reaps it);
* the deadline passed: the worker is killed, ``WorkerTimeoutError``.

Workers idle for ``idle_timeout`` seconds are reaped by a background thread, at most
``max_workers`` are kept (least recently used goes first), and everything is killed at exit.
A worker whose objects the caller still holds proxies of is neither reaped nor evicted.
"""
from __future__ import annotations

import atexit
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from flowhub.errors import TransferError, WorkerCrashedError, WorkerError, WorkerTimeoutError
from flowhub.worker import protocol
from flowhub.worker.launcher import ZygoteHandle

OPS = ("list", "help", "load")
ISOLATED_MODES = ("rebuild", "proxy")
DEFAULT_IDLE_TIMEOUT = 300.0
DEFAULT_MAX_WORKERS = 8


_FAULTHANDLER_SIGNALS = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}


def _describe_status(status: dict) -> str:
    if status.get("cause"):  # a sandboxed worker ended by one of its limits (see sandbox_host)
        return f"{_describe_status(dict(status, cause=None))}: {status['cause']}"
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


class _Worker:
    """One worker process as the caller sees it. Used only while holding ``self.lock``."""

    def __init__(self, ikey: tuple, label: str) -> None:
        self.ikey, self.label = ikey, label
        self.lock = threading.Lock()
        self.pid: Optional[int] = None
        self.sock: Optional[socket.socket] = None
        self.last_used = time.monotonic()
        self.dead = False
        self.stamp: Optional[tuple] = None
        self.gen = 0  # +1 per process forked for this worker; a proxy belongs to one generation
        self.ended: Dict[int, str] = {}  # generation -> how its process ended (for stale proxies)
        self.conn: Any = None  # proxy.Connection of the current generation, once a proxy-mode call made one
        self.settings: Optional[dict] = None  # the last call's settings: a sandboxed worker's downloads use them

    def pinned(self) -> bool:
        """The caller holds proxies of objects in this process: do not reap or evict it."""
        conn = self.conn
        return conn is not None and conn.gen == self.gen and not self.dead and conn.live()

    def looks_alive(self) -> bool:
        """An idle worker never writes: a readable or hung-up socket means it has died."""
        if self.sock is None or self.dead:
            return False
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return not poller.poll(0)


class WorkerManager:
    """Runs hubconf operations in isolated workers, one persistent worker per key."""

    def __init__(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_workers: int = DEFAULT_MAX_WORKERS,
                 zygote_start: str = "auto") -> None:
        """``zygote_start``: ``"spawn"`` (a fresh interpreter), ``"fork"`` (from this process, cleaned)
        or ``"auto"`` (fork when this process is single-threaded, i.e. before oneflow is imported)."""
        if zygote_start not in ("auto", "fork", "spawn"):
            raise ValueError(f"zygote_start must be 'auto', 'fork' or 'spawn', not {zygote_start!r}")
        self.idle_timeout = idle_timeout
        self.max_workers = max_workers
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._zygote = ZygoteHandle(zygote_start)
        self._sandbox: Optional[Any] = None  # sandbox_host.SandboxHost, made by the first sandboxed call
        self._workers: Dict[tuple, _Worker] = {}
        self._reaper: Optional[threading.Thread] = None
        self._wake = threading.Condition(self._lock)
        self._last_activity = time.monotonic()

    # -- public -----------------------------------------------------------------------------------
    def call(self, *, repo_dir: str, key: str, op: str, model: Optional[str] = None, args: tuple = (),
             kwargs: Optional[dict] = None, mode: str = "rebuild", settings: Optional[dict] = None,
             timeout: Optional[float] = None, label: str = "", mock_torch: bool = False,
             weights: Optional[list] = None, sandbox: bool = False) -> Any:
        """Run ``op`` (``list``, ``help`` or ``load``) in the worker of ``key`` and return its result.

        The weight files the call used (URL, size, SHA-256) are appended to ``weights`` if given.

        ``mode="proxy"``: the result stays in the worker; plain values, tensors and proxies come back
        (see :mod:`flowhub.worker.proxy`).

        ``args``/``kwargs``/``settings`` are sent by value (cloudpickle; tensors and numpy buffers
        through a sealed memfd, like results). ``timeout`` (seconds, ``None`` = no limit; default
        ``settings["worker_timeout"]``, or ``$FLOWHUB_WORKER_TIMEOUT`` without settings) bounds the
        call once its worker runs. A worker whose ``hubconf.py`` changed on disk since it imported it
        is replaced (the reference re-imports hubconf.py on every call).

        ``sandbox=True``: the worker comes from a separate, scrubbed zygote and is sandboxed before it
        imports the hubconf; it never gets the GitHub token, and the caller makes its downloads (see
        :mod:`flowhub.worker.sandbox_host`).
        """
        if op not in OPS:
            raise ValueError(f"unknown hub operation {op!r}; expected one of {', '.join(OPS)}")
        if mode not in ISOLATED_MODES:
            raise ValueError(f"WorkerManager runs isolated modes only ({', '.join(ISOLATED_MODES)}), not {mode!r}")
        if timeout is None and settings is not None:
            timeout = settings.get("worker_timeout")
        elif timeout is None:
            from flowhub.settings import ENV_WORKER_TIMEOUT, _env_float

            timeout = _env_float(os.environ, ENV_WORKER_TIMEOUT, None)
        sandbox_hub = None
        if sandbox:
            from flowhub.settings import default_hub_dir

            from flowhub.worker.sandbox_host import Limits

            settings = {k: v for k, v in (settings or {}).items() if k != "github_token"}
            sandbox_hub = os.path.realpath(settings.get("hub_dir") or default_hub_dir(os.environ))
            if timeout is None:  # a sandboxed call never waits for ever (FLOWHUB_SANDBOX_TIMEOUT)
                timeout = Limits.from_env().timeout
            self.sandbox_host().prewarm()
        else:
            self.prewarm()  # the zygote imports oneflow while this process does the same below
        from flowhub.worker import rebuild

        label = label or key
        context = _context(op, model, label)
        try:
            request = rebuild.encode((settings, tuple(args), dict(kwargs or {}), rebuild.rng_state()))
        except Exception as exc:
            raise TransferError(f"{context}: the arguments cannot be sent to the worker by value "
                                f"({type(exc).__name__}: {exc})") from None
        repo_dir = os.path.abspath(repo_dir)
        worker = self._acquire((key, os.path.realpath(repo_dir), bool(mock_torch), sandbox_hub), repo_dir,
                               mock_torch, label)
        worker.settings = settings  # for the requests a sandboxed worker makes during the call
        try:
            result, used = self._call(worker, op, model, request, timeout, context, mode)
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
        """The :class:`~flowhub.worker.sandbox_host.SandboxHost` of this manager's sandboxed workers."""
        with self._lock:
            if self._sandbox is None:
                from flowhub.worker.sandbox_host import SandboxHost

                self._sandbox = SandboxHost()
            return self._sandbox

    def active_pids(self) -> List[int]:
        """Pids of the processes this manager keeps: the zygote (if running) and every live worker."""
        with self._lock:
            pids = [w.pid for w in self._workers.values() if w.pid is not None and not w.dead]
        zygote = self._zygote.pid if self._zygote.alive() else None
        sandboxed = self._sandbox.zygote_pid() if self._sandbox is not None else None
        return [z for z in (zygote, sandboxed) if z] + pids

    def worker_pid(self, key: str) -> Optional[int]:
        """The pid of the live worker serving ``key`` (any repo dir / mock flag), or ``None``."""
        with self._lock:
            for ikey, w in self._workers.items():
                if ikey[0] == key and not w.dead:
                    return w.pid
        return None

    @property
    def zygote_pid(self) -> Optional[int]:
        """The zygote's pid while it runs."""
        return self._zygote.pid if self._zygote.alive() else None

    @property
    def zygote_started_by(self) -> str:
        """How the current (or last) zygote was started: ``"fork"``, ``"spawn"`` or ``""``."""
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
    def _acquire(self, ikey: tuple, repo_dir: str, mock_torch: bool, label: str) -> _Worker:
        """The live worker for ``ikey``, locked for this call (forked if needed)."""
        while True:
            with self._lock:
                worker = self._workers.get(ikey)
                fresh = worker is None
                if fresh:
                    worker = self._workers[ikey] = _Worker(ikey, label)
            worker.lock.acquire()
            if worker.dead:  # retired while we waited for it
                worker.lock.release()
                continue
            stamp = _hubconf_stamp(repo_dir)
            alive = fresh or worker.looks_alive()
            if fresh or worker.stamp != stamp or not alive:
                if not fresh:
                    status = self._reap(worker, kill=True, why="was replaced because its hubconf.py changed")
                    if not alive:
                        worker.ended[worker.gen] = f"died ({_describe_status(status)})"
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

    def _fork(self, worker: _Worker, repo_dir: str, mock_torch: bool) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        spec = {"repo_dir": repo_dir, "mock_torch": bool(mock_torch), "env": dict(os.environ),
                "cwd": os.getcwd(), "sys_path": _worker_sys_path()}
        try:
            if len(worker.ikey) > 3 and worker.ikey[3] is not None:  # sandboxed (ikey[3]: its hub folder)
                reply = {"pid": self.sandbox_host().fork(spec, worker.ikey[3], theirs.fileno(), worker.label)}
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

    def _reap(self, worker: _Worker, kill: bool, why: str = "was stopped") -> dict:
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

    def _forget(self, worker: _Worker) -> None:
        with self._lock:
            if self._workers.get(worker.ikey) is worker:
                del self._workers[worker.ikey]

    def _retire(self, worker: _Worker) -> None:
        self._reap(worker, kill=True, why="was stopped (idle, or over max_workers)")
        self._forget(worker)

    def _after_call(self, worker: _Worker) -> None:
        if worker.dead:
            self._forget(worker)

    def _evict_lru(self, keep: _Worker) -> None:
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
    def _call(self, worker: _Worker, op: str, model: Optional[str], request: Any, timeout: Optional[float],
              context: str, mode: str = "rebuild") -> Any:
        from flowhub.worker import transfer

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
                return self._raise_remote(reply, body, context, worker.label)
            return _decode_result(reply, body, fds, context)
        del body  # proxy mode: never looked at, let alone unpickled
        result = self._proxy_reply(worker, conn, reply, fds, context)
        return result, _checked_weights(reply.get("weights"), context)

    def _exchange(self, worker: _Worker, header: dict, body: bytes, packed: Any, timeout: Optional[float],
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
            raise WorkerTimeoutError(f"{context} did not finish within {timeout:g} s, so its worker process "
                                     f"(pid {pid}) was killed (worker_timeout / FLOWHUB_WORKER_TIMEOUT)") from None
        except (protocol.PeerClosed, protocol.ProtocolError, OSError) as exc:
            pid = worker.pid
            status = self._reap(worker, kill=True)
            how = _describe_status(status) if isinstance(exc, (protocol.PeerClosed, BrokenPipeError,
                                                                  ConnectionError)) else f"{type(exc).__name__}: {exc}"
            worker.ended[worker.gen] = f"died ({how})"
            raise WorkerCrashedError(f"{context}: the worker process (pid {pid}) died: {how}. "
                                     f"The next call starts a fresh worker.") from None
        except BaseException:  # KeyboardInterrupt and the like: the worker's state is unknown
            self._reap(worker, kill=True, why="was killed when a call to it was interrupted")
            raise

    def _receive(self, worker: _Worker, deadline: Optional[float]) -> protocol.Message:
        """The worker's reply to the current request. A sandboxed worker may first send requests of
        its own (weight downloads, see :mod:`flowhub.worker.sandbox_host`): each is answered, and the
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

    @staticmethod
    def _raise_remote(reply: dict, body: bytes, context: str, label: str) -> Any:
        from flowhub.worker import failures

        info = reply.get("error") if isinstance(reply.get("error"), dict) else {}
        if reply.get("kind") == "transfer":
            raise TransferError(f"{context}: {info.get('message', 'transfer failed')}")
        raise failures.rebuild(info, body, context, label)

    # -- proxy mode -----------------------------------------------------------------------------------
    def _connection(self, worker: _Worker, timeout: Optional[float]) -> Any:
        """The proxy connection of the worker's current process (made on first use)."""
        from flowhub.worker.proxy import Connection

        if worker.conn is None or worker.conn.gen != worker.gen:
            worker.conn = Connection(self, worker, timeout)
        worker.conn.timeout = timeout
        return worker.conn

    def _proxy_request(self, conn: Any, header: dict, arrays: Sequence[Any], context: str) -> Any:
        """One request from a proxy (see :mod:`flowhub.worker.objects`), with its arguments' arrays."""
        from flowhub.worker import transfer

        worker = conn.worker
        packed = transfer.pack(arrays, name="flowhub-args")
        header.update(mode="proxy", size=packed.size, table=packed.table)
        try:
            with worker.lock:
                conn.check(context)
                releases = conn.take_releases()
                if releases:
                    header["release"] = releases
                try:
                    reply, _, fds = self._exchange(worker, header, b"", packed, conn.timeout, context)
                finally:
                    worker.last_used = self._last_activity = time.monotonic()
                    self._after_call(worker)
                return self._proxy_reply(worker, conn, reply, fds, context, header.get("op") == "next")
        finally:
            packed.close()

    def _proxy_reply(self, worker: _Worker, conn: Any, reply: dict, fds: List[int], context: str,
                     may_stop: bool = False) -> Any:
        """Decode a proxy-mode reply (JSON and validated tensors only) or raise the error it reports."""
        if reply.get("ok") is not True:
            from flowhub.worker import failures

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
        return conn.decode(reply, fds, context)

    def _flush_releases(self, conn: Any) -> None:
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


def _decode_result(reply: dict, body: bytes, fds: List[int], context: str) -> Any:
    from flowhub.worker import rebuild, transfer

    fd = fds.pop(0) if fds else None
    protocol.close_fds(fds)
    try:
        table = reply.get("table")
        # pre-fault the pages in one madvise (no copy): cheaper than faulting them one by one later
        arrays = transfer.unpack(fd, int(reply.get("size", 0)), table, populate=True)
        for entry in table:  # type: ignore[union-attr]
            if entry.get("kind") not in ("param", "tensor", "buffer") or (
                    entry.get("kind") == "buffer" and entry.get("dtype") != "uint8"):
                raise TransferError(f"bad tensor kind in the result table: {entry!r:.200}")
        result, rng, weights = rebuild.decode(body, arrays, table)  # type: ignore[arg-type]
    except TransferError as exc:
        raise TransferError(f"{context}: {exc}") from None
    except Exception as exc:
        raise TransferError(f"{context}: the result could not be rebuilt in this process "
                            f"({type(exc).__name__}: {exc}); use mode=\"proxy\" to keep it in the worker") from None
    if rng:
        rebuild.set_rng_state(rng)
    return result, weights


def _checked_weights(weights: Any, context: str) -> List[dict]:
    """The weight files a proxy-mode load reports, checked to be plain JSON records."""
    if weights is None:
        return []
    ok = isinstance(weights, list) and all(
        isinstance(w, dict) and all(isinstance(k, str) and (v is None or type(v) in (str, int, float, bool))
                                    for k, v in w.items()) for w in weights)
    if not ok:
        raise TransferError(f"{context}: the worker reported malformed weight records")
    return weights


def _worker_sys_path() -> List[str]:
    """This process's import path without its working folder and main script's folder, whose
    modules (a caller's own ``models.py``) would otherwise shadow the repository's (pytorch#65881)."""
    own = {os.path.realpath(os.getcwd())}
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        own.add(os.path.realpath(os.path.dirname(os.path.abspath(main_file))))
    return [p for p in sys.path if isinstance(p, str) and p and os.path.realpath(p) not in own]


def _hubconf_stamp(repo_dir: str) -> Optional[tuple]:
    try:
        st = os.stat(os.path.join(repo_dir, "hubconf.py"))
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _context(op: str, model: Optional[str], label: str) -> str:
    if op == "list":
        return f"listing the entrypoints of {label}"
    if op == "help":
        return f"help for entrypoint {model!r} of {label}"
    return f"entrypoint {model!r} of {label}"


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
