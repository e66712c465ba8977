"""The caller's side of sandboxed workers: their own zygote, a scratch folder each, a watchdog, and
answers to the requests they make.

What :mod:`flowhub.sandbox` asks of a caller, done here for :class:`~flowhub.worker.manager.WorkerManager`:

* **a separate zygote, spawned with a scrubbed environment** (never forked from the caller, so it
  holds no token, no caller module and no caller memory), whose forks lock themselves down before
  they import anything of the repository (:func:`flowhub.worker.sandbox_child.enter`);
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

Limits are read from the environment when a worker is started (:class:`Limits`; ``flowhub doctor``
shows each with how it is enforced):

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

A worker's stdout and stderr are pipes the caller relays (:mod:`flowhub.worker.output`), never the
caller's own descriptors.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from flowhub import units
from flowhub.archive import check_expansion
from flowhub.checkpoints import SANDBOXED_DIR
from flowhub.errors import WorkerCrashedError, WorkerTimeoutError
from flowhub.worker import output, protocol
from flowhub.worker.launcher import ZygoteHandle, _spawn_from_long_lived_thread
from flowhub.worker.sandbox_child import EXIT_SANDBOX_WEAK, STRENGTHS

ENV_MAX_MEMORY = "FLOWHUB_SANDBOX_MAX_MEMORY"
ENV_MAX_PROCESSES = "FLOWHUB_SANDBOX_MAX_PROCESSES"
ENV_MIN_STRENGTH = "FLOWHUB_SANDBOX_MIN_STRENGTH"
ENV_MAX_CPU = "FLOWHUB_SANDBOX_MAX_CPU"
ENV_TIMEOUT = "FLOWHUB_SANDBOX_TIMEOUT"
ENV_MAX_SCRATCH = "FLOWHUB_SANDBOX_MAX_SCRATCH"
ENV_MAX_DOWNLOADS = "FLOWHUB_SANDBOX_MAX_DOWNLOADS"
ENV_MAX_DOWNLOAD_BYTES = "FLOWHUB_SANDBOX_MAX_DOWNLOAD_BYTES"
ENV_MAX_OUTPUT = "FLOWHUB_SANDBOX_MAX_OUTPUT"
DEFAULT_MAX_MEMORY = 4 << 30
DEFAULT_MAX_PROCESSES = 64
DEFAULT_MAX_CPU = 3600
DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_SCRATCH = 1 << 30
DEFAULT_MAX_DOWNLOADS = 32
DEFAULT_MAX_DOWNLOAD_BYTES = 16 << 30
DEFAULT_MAX_OUTPUT = 1 << 20
#: A zip a sandboxed hubconf had fetched may not expand by more than this (real checkpoints: ~1.1).
MAX_EXTRACT_RATIO = 100
ENV_ALLOWED_HOSTS = "FLOWHUB_SANDBOX_ALLOWED_HOSTS"
_WATCH_INTERVAL = 0.1


def parse_size(text: str, name: str) -> int:
    """``"2G"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes, for the variable ``name``."""
    try:
        size = units.parse_size(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"{name}={text!r} is not a size like 4G or 512M")
    return size


def allowed_hosts(settings: Any) -> List[str]:
    """Hosts a sandboxed hubconf may have the caller fetch from: the configured GitHub endpoints, plus
    ``FLOWHUB_SANDBOX_ALLOWED_HOSTS`` (comma-separated ``host`` or ``host:port``; ``*`` allows any). A
    bare ``host`` stands for the default ports (80, 443) only; see :func:`flowhub.urls.allows`."""
    from flowhub import urls

    hosts = []
    for endpoint in (settings.github_url, settings.github_api_url):
        try:
            hosts.append(urls.authority(endpoint))
        except ValueError:  # not an http(s) URL: nothing can be fetched from it anyway
            pass
    extra = os.environ.get(ENV_ALLOWED_HOSTS, "")
    return hosts + [h.strip().lower() for h in extra.split(",") if h.strip()]


def _check_allowed_host(url: str, settings: Any) -> None:
    """Refuse (``PermissionError``) a URL a sandboxed hubconf asked for unless it is a plain http(s) URL
    on an allowed host, as the HTTP client will parse it (:func:`flowhub.urls.check_allowed`)."""
    from flowhub import urls

    allowed = allowed_hosts(settings)
    try:
        urls.check_allowed(url, allowed)
    except PermissionError as exc:
        raise PermissionError(
            f"a sandboxed hubconf's fetch was refused: {exc}. The caller fetches only plain http(s) URLs "
            f"(no credentials, backslashes or spaces) from the configured endpoints ({', '.join(allowed)}); "
            f"to allow another host, add it to {ENV_ALLOWED_HOSTS} (comma-separated host or host:port; "
            "'*' allows any).") from None


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 16 << 30


def _positive(env: Dict[str, str], name: str, default: float, kind: type = int) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name}={raw!r} is not a positive number")
    return value


def _size(env: Dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    return parse_size(raw, name) if raw else default


@dataclasses.dataclass(frozen=True)
class Limits:
    """What each sandboxed worker may use, read from the environment when it starts (see the table in
    the module docstring). Every limit is enforced by the kernel or by the caller, never by the worker."""

    max_memory: int = DEFAULT_MAX_MEMORY
    max_processes: int = DEFAULT_MAX_PROCESSES
    min_strength: str = "strong"
    max_cpu: int = DEFAULT_MAX_CPU
    timeout: float = DEFAULT_TIMEOUT
    max_scratch: int = DEFAULT_MAX_SCRATCH
    max_downloads: int = DEFAULT_MAX_DOWNLOADS
    max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES
    max_output: int = DEFAULT_MAX_OUTPUT

    @classmethod
    def from_env(cls, env: Optional[Dict[str, str]] = None) -> "Limits":
        env = dict(os.environ if env is None else env)
        strength = (env.get(ENV_MIN_STRENGTH) or "strong").strip().lower()
        if strength not in STRENGTHS:
            raise ValueError(f"{ENV_MIN_STRENGTH}={strength!r}: use one of {', '.join(STRENGTHS)}")
        return cls(max_memory=_size(env, ENV_MAX_MEMORY, DEFAULT_MAX_MEMORY),
                   max_processes=_positive(env, ENV_MAX_PROCESSES, DEFAULT_MAX_PROCESSES),
                   min_strength=strength,
                   max_cpu=_positive(env, ENV_MAX_CPU, DEFAULT_MAX_CPU),
                   timeout=_positive(env, ENV_TIMEOUT, DEFAULT_TIMEOUT, float),
                   max_scratch=_size(env, ENV_MAX_SCRATCH, DEFAULT_MAX_SCRATCH),
                   max_downloads=_positive(env, ENV_MAX_DOWNLOADS, DEFAULT_MAX_DOWNLOADS),
                   max_download_bytes=_size(env, ENV_MAX_DOWNLOAD_BYTES, DEFAULT_MAX_DOWNLOAD_BYTES),
                   max_output=_size(env, ENV_MAX_OUTPUT, DEFAULT_MAX_OUTPUT))

    def policy_options(self) -> Dict[str, Any]:
        """The :class:`~flowhub.sandbox.SandboxPolicy` fields these limits set inside the worker:
        ``RLIMIT_DATA`` and ``RLIMIT_FSIZE`` at the memory cap (a memfd is a file: no single one can
        outgrow it), ``RLIMIT_CPU``, the process count, and the scratch tmpfs quota."""
        return {"max_memory": self.max_memory, "max_file_size": self.max_memory, "cpu_seconds": self.max_cpu,
                "max_processes": self.max_processes, "max_scratch": self.max_scratch}

    def describe(self) -> Dict[str, str]:
        """Each limit with its effective value and how it is enforced (for ``flowhub doctor``)."""
        size = units.human_size
        return {
            "memory": f"{size(self.max_memory)} ({ENV_MAX_MEMORY}): RLIMIT_DATA and RLIMIT_FSIZE in the worker, "
                      f"and the caller's watchdog on its processes' memory and memfds",
            "processes": f"{self.max_processes} ({ENV_MAX_PROCESSES}): RLIMIT_NPROC, the caller's watchdog, "
                         f"and a PID namespace that dies with the worker",
            "cpu": f"{self.max_cpu} s over the worker's life ({ENV_MAX_CPU}): RLIMIT_CPU",
            "call time": f"{self.timeout:g} s per call unless FLOWHUB_WORKER_TIMEOUT says otherwise "
                         f"({ENV_TIMEOUT}): the caller kills the worker",
            "scratch": f"{size(self.max_scratch)} ({ENV_MAX_SCRATCH}): a tmpfs of that size",
            "downloads": f"{self.max_downloads} files and {size(self.max_download_bytes)} per call, extraction "
                         f"included, at most {MAX_EXTRACT_RATIO}x a zip's size ({ENV_MAX_DOWNLOADS}, "
                         f"{ENV_MAX_DOWNLOAD_BYTES}): the caller, which makes them",
            "output": f"{size(self.max_output)} of stdout and stderr per call ({ENV_MAX_OUTPUT}): "
                      f"the caller relays it, prefixed, then drops the rest",
        }


class _SandboxZygote(ZygoteHandle):
    """A zygote always *spawned*, with the environment a sandboxed worker would get (``HOME`` and
    ``TMPDIR`` in ``home``), which warms the sandbox before it says ready."""

    def __init__(self, home: str) -> None:
        super().__init__("spawn")
        self.home = home

    def _spawn(self, theirs: socket.socket) -> subprocess.Popen:  # type: ignore[override]
        from flowhub.sandbox import SandboxPolicy, environment

        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = environment.scrubbed_environ(SandboxPolicy(scratch=self.home))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        args = [sys.executable, "-c", "from flowhub.worker.zygote import main; main()",
                str(theirs.fileno()), str(os.getpid()), "sandbox"]
        return _spawn_from_long_lived_thread(args, pass_fds=(theirs.fileno(),), env=env, cwd=self.home,
                                             stdin=subprocess.DEVNULL, close_fds=True)


@dataclasses.dataclass
class _Slot:
    """The folders and limits of one sandboxed worker."""

    scratch: str
    inbox: str
    limits: Limits
    downloads: int = 0

    def remove(self) -> None:
        for path in (self.scratch, self.inbox):
            shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class _Quota:
    """What one call of a sandboxed worker may still have the caller fetch (files, bytes), kept in the
    call's state; a fetch over it raises :class:`PermissionError`, which the hubconf sees."""

    limits: Limits
    files: int = 0
    bytes: int = 0

    @classmethod
    def of(cls, state: dict, limits: Limits) -> "_Quota":
        quota = state.get("quota")
        if quota is None:
            quota = state["quota"] = cls(limits)
        return quota

    def left(self) -> int:
        return max(self.limits.max_download_bytes - self.bytes, 0)

    def take_file(self, url: str) -> None:
        self.files += 1
        if self.files > self.limits.max_downloads:
            raise PermissionError(f"a sandboxed hubconf asked for more than {self.limits.max_downloads} downloads "
                                  f"in one call ({url!r:.200} refused; {ENV_MAX_DOWNLOADS})")

    def take_bytes(self, size: int, url: str) -> None:
        self.bytes += size
        if self.bytes > self.limits.max_download_bytes:
            raise PermissionError(f"the downloads of one sandboxed call passed {units.human_size(self.limits.max_download_bytes)} "
                                  f"with {url!r:.200} ({ENV_MAX_DOWNLOAD_BYTES})")


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


def _plain_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name or len(name) > 255:
        raise ValueError(f"{what} {name!r:.80} is not a plain file name")
    return name


def _inside(path: str, folder: str) -> bool:
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


class SandboxHost:
    """Sandboxed workers of one :class:`~flowhub.worker.manager.WorkerManager` (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._base: Optional[str] = None
        self._zygote: Optional[_SandboxZygote] = None
        self._slots: Dict[int, _Slot] = {}
        self._watchdogs: Dict[Tuple[int, int], Any] = {}
        self._kills: Dict[int, Any] = {}
        self._count = 0

    # -- lifecycle ------------------------------------------------------------------------------------
    def _ensure(self) -> _SandboxZygote:
        with self._lock:
            if self._base is None or not os.path.isdir(self._base):
                self._base = tempfile.mkdtemp(prefix="flowhub-sandbox-")
            if self._zygote is None:
                home = os.path.join(self._base, "zygote")
                os.makedirs(home, mode=0o700, exist_ok=True)
                self._zygote = _SandboxZygote(home)
            return self._zygote

    def prewarm(self) -> None:
        """Start the sandbox zygote now (without waiting), so it imports oneflow meanwhile."""
        zygote = self._ensure()
        with zygote.lock:
            zygote.start()

    def owns(self, pid: Optional[int]) -> bool:
        with self._lock:
            return pid in self._slots

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
                    f"of {units.human_size(limits.max_memory)} ({ENV_MAX_MEMORY})")
        if kill is not None:
            return (f"the sandbox watchdog killed it because it ran {kill.processes} processes, over its limit "
                    f"of {limits.max_processes} ({ENV_MAX_PROCESSES})")
        if status.get("exitcode") == EXIT_SANDBOX_WEAK:
            return (f"its sandbox could not be set up as required on this machine (see stderr, or run "
                    f"'flowhub doctor'; {ENV_MIN_STRENGTH}={limits.min_strength})")
        if status.get("signal") == signal.SIGXCPU:
            return "it used up its CPU time limit"
        return None

    # -- requests from a worker -----------------------------------------------------------------------
    def answer(self, sock: socket.socket, pid: Optional[int], header: dict, settings: Optional[dict],
               state: dict) -> None:
        """Answer one request a sandboxed worker sent during a call (``state`` lives as long as the call).

        A request this host does not know raises :class:`~flowhub.worker.protocol.ProtocolError` (the
        worker is then treated as crashed); a download that fails is reported to the worker, whose
        hubconf sees the exception.
        """
        with self._lock:
            slot = self._slots.get(pid) if pid is not None else None
        if slot is None or header.get("request") != "fetch" or header.get("kind") not in ("weights", "file"):
            raise protocol.ProtocolError(f"unexpected request {str(header.get('request'))!r:.40} "
                                         f"({str(header.get('kind'))!r:.40}) from a worker")
        try:
            reply = self._fetch(header, settings or {}, state, slot)
            reply["ok"] = True
        except Exception as exc:
            cls = type(exc)
            reply = {"ok": False, "error": {"type": f"{cls.__module__}.{cls.__qualname__}", "message": str(exc)[:1 << 16],
                                            "status": getattr(exc, "status", None)}}
        reply["reply"] = "fetch"
        protocol.send_message(sock, reply)

    def _fetch(self, header: dict, values: dict, state: dict, slot: _Slot) -> dict:
        from flowhub import checkpoints
        from flowhub.download import download
        from flowhub.network import HttpClient
        from flowhub.provenance import check_weight

        url = header.get("url")
        if not isinstance(url, str) or len(url) > 16384 or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"a sandboxed worker may have http(s) URLs fetched, not {str(url)!r:.200}")
        settings = _settings(values)
        _check_allowed_host(url, settings)
        client = HttpClient(settings, allow_url=lambda hop: _check_allowed_host(hop, settings))
        quota = _Quota.of(state, slot.limits)
        quota.take_file(url)
        progress = header.get("progress") is not False
        expected = values.get("expected_weights") if isinstance(values.get("expected_weights"), dict) else {}
        if header.get("kind") == "weights":
            shared = os.path.join(settings.hub_dir, "checkpoints")
            requested = header.get("model_dir")
            if requested is not None and (not isinstance(requested, str)
                                          or os.path.realpath(requested) != os.path.realpath(shared)):
                warnings.warn(f"flowhub: a sandboxed hubconf asked for weights in {str(requested)!r:.200}; "
                              f"sandboxed downloads are cached in {os.path.join(shared, SANDBOXED_DIR)}.",
                              stacklevel=2)
            name = _plain_name(header.get("file_name") or os.path.basename(urlsplit(url).path), "the weight file name")
            if name.startswith(".") or name.endswith(checkpoints.EXTRACTED_SUFFIX):
                raise ValueError(f"the weight file name {name!r:.80} is reserved")
            if not values.get("refresh_weights") and checkpoints._cached_file_ok(shared, name):
                folder = shared  # cached by a trusted load: shared, read-only (the reference's by-name cache)
                cached = os.path.join(shared, name)
            else:  # never where a trusted load would look: no planting a file it would unpickle
                folder = os.path.join(shared, SANDBOXED_DIR)
                refreshed = state.setdefault("refreshed", set())

                def refresh(path: str) -> bool:
                    if not values.get("refresh_weights") or path in refreshed:
                        return False
                    refreshed.add(path)
                    return True

                cached = checkpoints.fetch_weights(client, url, folder, progress=progress,
                                                   check_hash=header.get("check_hash") is True, file_name=name,
                                                   refresh=refresh)
            if not _inside(cached, settings.hub_dir):
                raise ValueError(f"refusing to hand {cached} to a sandboxed worker: it is outside the hub folder")
            quota.take_bytes(os.path.getsize(cached), url)
            if zipfile.is_zipfile(cached):  # the worker cannot write the extracted folder itself
                with zipfile.ZipFile(cached) as zf:  # a zip bomb is refused before a byte is written
                    expands = check_expansion(zf.infolist(), cached, quota.left(), MAX_EXTRACT_RATIO)
                quota.take_bytes(expands, url)
                checkpoints.extracted_checkpoint(cached, settings.lock_timeout)
            fingerprint = checkpoints.fingerprint(folder, os.path.basename(cached), url)
            path = cached
        else:
            prefix = header.get("hash_prefix")
            if prefix is not None and not isinstance(prefix, str):
                raise ValueError("hash_prefix must be a string")
            slot.downloads += 1
            name = os.path.basename(urlsplit(url).path)
            name = name if name not in ("", ".", "..") and len(name) <= 200 else "download"
            target = os.path.join(slot.inbox, f"{slot.downloads}-{name}")
            result = download(client, url, target, hash_prefix=prefix, progress=progress)
            quota.take_bytes(result.size, url)
            fingerprint = {"url": url, "file": name, "size": result.size, "sha256": result.sha256}
            path = result.path
        check_weight(url, fingerprint.get("sha256"), fingerprint.get("size"), expected.get(url))
        return {"path": path, "fingerprint": fingerprint}

    # -- one-shot workers -----------------------------------------------------------------------------
    def run_once(self, spec: dict, read_path: str, header: dict, timeout: Optional[float],
                 what: str) -> Tuple[dict, List[int]]:
        """Fork a sandboxed worker that may read only ``read_path``, send it ``header``, and return its
        reply and descriptors (the caller owns them); the worker is reaped in every case."""
        from flowhub.worker.manager import _describe_status, _worker_sys_path

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            spec = dict(spec, repo_dir=read_path, mock_torch=False, sys_path=_worker_sys_path())
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
                raise WorkerTimeoutError(f"{what} did not finish within {timeout:g} s, so its sandboxed worker "
                                         f"(pid {pid}) was killed (worker_timeout / FLOWHUB_WORKER_TIMEOUT)") from None
            except (protocol.PeerClosed, protocol.ProtocolError, OSError) as exc:
                reaped = self.reap(pid)
                how = _describe_status(reaped) if isinstance(exc, (protocol.PeerClosed, ConnectionError)) \
                    else f"{type(exc).__name__}: {exc}"
                raise WorkerCrashedError(f"{what}: its sandboxed worker (pid {pid}) died: {how}") from None
            return reply, fds
        finally:
            ours.close()
            if reaped is None:
                self.reap(pid)


def _settings(values: dict) -> Any:
    """The caller's settings for a download on a sandboxed worker's behalf: never with the token (a
    hostile hubconf must not be able to make authenticated requests through the caller)."""
    from flowhub import settings as settings_mod

    names = {f.name for f in dataclasses.fields(settings_mod.Settings)}
    known = {k: v for k, v in values.items() if k in names}
    if not known.get("hub_dir"):
        known["hub_dir"] = settings_mod.resolve({}).hub_dir
    known["github_token"] = None
    return settings_mod.Settings(**known)
