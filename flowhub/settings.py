"""Every setting flowhub reads, with its environment variable and default, in one place.

Settings are read when a call is made, never frozen at import time: a user (or a test) may set
``FLOWHUB_OFFLINE=1`` after ``import flowhub`` and the next call honours it.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, List, Mapping, Optional

from flowhub import units

ENV_ONEFLOW_HOME = "ONEFLOW_HOME"
ENV_XDG_CACHE_HOME = "XDG_CACHE_HOME"
DEFAULT_CACHE_DIR = "~/.cache"
ENV_GITHUB_TOKEN = "GITHUB_TOKEN"

ENV_GITHUB_URL = "FLOWHUB_GITHUB_URL"
ENV_GITHUB_API_URL = "FLOWHUB_GITHUB_API_URL"
ENV_OFFLINE = "FLOWHUB_OFFLINE"
ENV_TIMEOUT = "FLOWHUB_TIMEOUT"
ENV_RETRIES = "FLOWHUB_RETRIES"
ENV_LOCK_TIMEOUT = "FLOWHUB_LOCK_TIMEOUT"
ENV_MODE = "FLOWHUB_MODE"
ENV_WORKER_TIMEOUT = "FLOWHUB_WORKER_TIMEOUT"
ENV_SANDBOX = "FLOWHUB_SANDBOX"
ENV_INSTALL_REQUIREMENTS = "FLOWHUB_INSTALL_REQUIREMENTS"
ENV_CACHE_SHARED = "FLOWHUB_CACHE_SHARED"
ENV_BROADCAST_WEIGHTS = "FLOWHUB_BROADCAST_WEIGHTS"
ENV_JOB_TIMEOUT = "FLOWHUB_JOB_TIMEOUT"
ENV_DEFERRED_INIT = "FLOWHUB_DEFERRED_INIT"
DEFAULT_JOB_TIMEOUT = 600.0
CACHE_SHARED_CHOICES = ("auto", "1", "0")

DEFAULT_GITHUB_URL = "https://github.com"
DEFAULT_GITHUB_API_URL = "https://api.github.com"
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 2
DEFAULT_LOCK_TIMEOUT = 600.0
DEFAULT_MODE = "rebuild"
SANDBOX_DEFAULT_MODE = "proxy"
MODES = ("inprocess", "rebuild", "proxy")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off.")


def _env_float(env: Mapping[str, str], name: str, default: Optional[float]) -> Optional[float]:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds.") from None
    if value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number of seconds.")
    return value


def _seconds(value: Any, name: str, env_name: str) -> float:
    """``value`` (from ``Hub(name=...)`` or ``env_name``) as a positive, finite number of seconds."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name}={value!r} is not a positive number of seconds; set Hub({name}=...) or "
                         f"{env_name} to one, e.g. 10.")
    return seconds


def _optional_seconds(value: Any, name: str, env_name: str) -> Optional[float]:
    return None if value is None else _seconds(value, name, env_name)


def _retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise ValueError(f"retries={value!r} is not a whole number >= 0; set Hub(retries=...) or {ENV_RETRIES} "
                         "to one, e.g. 2.")
    return int(value)


def _hub_dir(value: Any) -> str:
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else value
    if not isinstance(path, str) or not path.strip() or "\0" in path:
        raise ValueError(f"hub_dir={value!r} is not a folder: pass a path (Hub(hub_dir=...) or set_dir), or None "
                         f"for the default (${ENV_ONEFLOW_HOME}/hub, ${ENV_XDG_CACHE_HOME}/oneflow/hub or "
                         "~/.cache/oneflow/hub).")
    return os.path.expanduser(path)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The effective settings of one call: explicit ``Hub`` arguments over environment variables."""

    hub_dir: str
    github_url: str = DEFAULT_GITHUB_URL
    github_api_url: str = DEFAULT_GITHUB_API_URL
    offline: bool = False
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    mode: str = DEFAULT_MODE
    worker_timeout: Optional[float] = None
    sandbox: bool = False
    install_requirements: bool = False
    cache_shared: str = "auto"
    broadcast_weights: bool = False
    job_timeout: float = DEFAULT_JOB_TIMEOUT
    #: A worker's load skips the random initialisation of parameters the checkpoint overwrites
    #: (:mod:`flowhub.worker.proc.deferred`).
    deferred_init: bool = True
    #: In a distributed job: "fetch" (this rank fetches for its cache) or "wait" (another rank does); see
    #: :mod:`flowhub.distributed`. Empty outside a job.
    job_role: str = ""
    github_token: Optional[str] = dataclasses.field(default=None, repr=False)

    def to_wire(self) -> dict:
        """The settings a worker gets, as plain JSON values: everything but the token."""
        data = dataclasses.asdict(self)
        del data["github_token"]
        return data

    @classmethod
    def from_wire(cls, data: Any) -> "Settings":
        """The settings :meth:`to_wire` made, checked field by field (never a token)."""
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "github_token"}
        if not isinstance(data, dict) or set(data) - set(fields) or not isinstance(data.get("hub_dir"), str):
            raise ValueError(f"malformed settings from the caller: {str(data)[:200]}")
        return cls(**{k: v for k, v in data.items()})


_process_hub_dir: Optional[str] = None


def set_process_hub_dir(path: Optional[str]) -> None:
    """``flowhub.set_dir``: the hub folder of every ``Hub`` in this process that was not given one."""
    global _process_hub_dir
    _process_hub_dir = _hub_dir(path) if path is not None else None


def default_hub_dir(env: Mapping[str, str]) -> str:
    """The reference's precedence: ``set_dir``, $ONEFLOW_HOME/hub, $XDG_CACHE_HOME/oneflow/hub, ~/.cache/oneflow/hub."""
    if _process_hub_dir is not None:
        return _process_hub_dir
    if env.get(ENV_ONEFLOW_HOME):
        return os.path.join(os.path.expanduser(env[ENV_ONEFLOW_HOME]), "hub")
    cache_home = os.path.expanduser(env.get(ENV_XDG_CACHE_HOME) or DEFAULT_CACHE_DIR)
    return os.path.join(cache_home, "oneflow", "hub")


def resolve(overrides: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> Settings:
    """Combine explicit overrides (``None`` = unset) with the environment, read now."""
    env = os.environ if env is None else env

    def pick(key: str, from_env: Any) -> Any:
        value = overrides.get(key)
        return from_env if value is None else value

    sandbox = bool(pick("sandbox", _env_bool(env, ENV_SANDBOX, False)))
    # With a sandbox nothing the worker sends may be unpickled here unless asked for: proxy by default.
    default_mode = SANDBOX_DEFAULT_MODE if sandbox else DEFAULT_MODE
    mode = pick("mode", (env.get(ENV_MODE) or default_mode).strip().lower())
    if mode not in MODES:
        raise ValueError(f"Unknown flowhub mode {mode!r}; choose one of {', '.join(MODES)} "
                         f"(Hub(mode=...) or {ENV_MODE}).")
    retries_raw = env.get(ENV_RETRIES)
    try:
        retries_env = DEFAULT_RETRIES if not retries_raw else int(retries_raw)
    except ValueError:
        raise ValueError(f"{ENV_RETRIES}={retries_raw!r} is not an integer.") from None
    hub_dir = overrides.get("hub_dir")
    return Settings(
        hub_dir=_hub_dir(hub_dir) if hub_dir is not None else default_hub_dir(env),
        github_url=str(pick("github_url", env.get(ENV_GITHUB_URL) or DEFAULT_GITHUB_URL)).rstrip("/"),
        github_api_url=str(pick("github_api_url", env.get(ENV_GITHUB_API_URL) or DEFAULT_GITHUB_API_URL)).rstrip("/"),
        offline=bool(pick("offline", _env_bool(env, ENV_OFFLINE, False))),
        timeout=_seconds(pick("timeout", _env_float(env, ENV_TIMEOUT, DEFAULT_TIMEOUT)), "timeout", ENV_TIMEOUT),
        retries=_retries(pick("retries", retries_env)),
        lock_timeout=_seconds(pick("lock_timeout", _env_float(env, ENV_LOCK_TIMEOUT, DEFAULT_LOCK_TIMEOUT)),
                              "lock_timeout", ENV_LOCK_TIMEOUT),
        mode=mode,
        worker_timeout=_optional_seconds(pick("worker_timeout", _env_float(env, ENV_WORKER_TIMEOUT, None)),
                                         "worker_timeout", ENV_WORKER_TIMEOUT),
        sandbox=sandbox,
        install_requirements=bool(pick("install_requirements", _env_bool(env, ENV_INSTALL_REQUIREMENTS, False))),
        cache_shared=_cache_shared(pick("cache_shared", env.get(ENV_CACHE_SHARED))),
        broadcast_weights=bool(pick("broadcast_weights", _env_bool(env, ENV_BROADCAST_WEIGHTS, False))),
        job_timeout=_seconds(pick("job_timeout", _env_float(env, ENV_JOB_TIMEOUT, DEFAULT_JOB_TIMEOUT)),
                             "job_timeout", ENV_JOB_TIMEOUT),
        deferred_init=bool(pick("deferred_init", _env_bool(env, ENV_DEFERRED_INIT, True))),
        github_token=env.get(ENV_GITHUB_TOKEN) or None,
    )


# -- requirement overlays (flowhub.cache.overlays) ----------------------------------------------------
ENV_INSTALLER = "FLOWHUB_INSTALLER"
INSTALLERS = ("auto", "uv", "pip")


def installer_choice(env: Optional[Mapping[str, str]] = None) -> str:
    """``FLOWHUB_INSTALLER``: ``auto`` (uv where found, else pip; the default), ``uv`` or ``pip``."""
    raw = ((os.environ if env is None else env).get(ENV_INSTALLER) or "auto").strip().lower()
    if raw not in INSTALLERS:
        raise ValueError(f"{ENV_INSTALLER}={raw!r}: use one of {', '.join(INSTALLERS)}")
    return raw


def uv_candidates(env: Optional[Mapping[str, str]] = None) -> List[str]:
    """Where ``uv`` may be: ``$PATH``, then the copy ``scripts/ensure_env.sh`` keeps in
    ``$XDG_CACHE_HOME/flowhub/uv-py310``."""
    import shutil

    env = os.environ if env is None else env
    cache_home = os.path.expanduser(env.get(ENV_XDG_CACHE_HOME) or DEFAULT_CACHE_DIR)
    found = shutil.which("uv", path=env.get("PATH"))
    return [p for p in (found, os.path.join(cache_home, "flowhub", "uv-py310", "bin", "uv")) if p]


def _cache_shared(value: Any) -> str:
    """``Hub(cache_shared=...)`` / ``FLOWHUB_CACHE_SHARED`` as "auto", "1" (shared) or "0" (node-local)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return "auto"
    text = {True: "1", False: "0"}.get(value, str(value)) if isinstance(value, bool) else str(value).strip().lower()
    text = {"true": "1", "yes": "1", "shared": "1", "false": "0", "no": "0", "local": "0"}.get(text, text)
    if text not in CACHE_SHARED_CHOICES:
        raise ValueError(f"cache_shared={value!r}: use auto, 1 (the cache is on a filesystem every node shares) "
                         f"or 0 (each node has its own cache); Hub(cache_shared=...) or {ENV_CACHE_SHARED}.")
    return text


# -- distributed jobs (the launcher's variables) -----------------------------------------------------
#: What ``python -m oneflow.distributed.launch`` (and torchrun) set; all four of the first are needed.
JOB_REQUIRED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
JOB_OPTIONAL = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK")
#: Never passed on to worker processes: a worker that imported oneflow with them would try to join the job.
JOB_VARIABLES = JOB_REQUIRED + JOB_OPTIONAL


def job_variables(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The launcher's variables that are set (see :mod:`flowhub.distributed.job`)."""
    env = os.environ if env is None else env
    return {name: env[name] for name in JOB_REQUIRED + JOB_OPTIONAL if env.get(name, "").strip()}


def worker_environ(env: Mapping[str, str]) -> Dict[str, str]:
    """``env`` for a worker process: without the launcher's variables (the worker is no rank of the job)."""
    return {k: v for k, v in env.items() if k not in JOB_VARIABLES}


# -- sandboxed workers ------------------------------------------------------------------------------
#: Sandbox strengths, weakest first (``FLOWHUB_SANDBOX_MIN_STRENGTH``).
STRENGTHS = ("weak", "partial", "strong")
ENV_SANDBOX_MAX_MEMORY = "FLOWHUB_SANDBOX_MAX_MEMORY"
ENV_SANDBOX_MAX_PROCESSES = "FLOWHUB_SANDBOX_MAX_PROCESSES"
ENV_SANDBOX_MIN_STRENGTH = "FLOWHUB_SANDBOX_MIN_STRENGTH"
ENV_SANDBOX_MAX_CPU = "FLOWHUB_SANDBOX_MAX_CPU"
ENV_SANDBOX_TIMEOUT = "FLOWHUB_SANDBOX_TIMEOUT"
ENV_SANDBOX_MAX_SCRATCH = "FLOWHUB_SANDBOX_MAX_SCRATCH"
ENV_SANDBOX_MAX_DOWNLOADS = "FLOWHUB_SANDBOX_MAX_DOWNLOADS"
ENV_SANDBOX_MAX_DOWNLOAD_BYTES = "FLOWHUB_SANDBOX_MAX_DOWNLOAD_BYTES"
ENV_SANDBOX_MAX_OUTPUT = "FLOWHUB_SANDBOX_MAX_OUTPUT"
SANDBOX_DEFAULT_MAX_MEMORY = 4 << 30
SANDBOX_DEFAULT_MAX_PROCESSES = 64
SANDBOX_DEFAULT_MAX_CPU = 3600
SANDBOX_DEFAULT_TIMEOUT = 600.0
SANDBOX_DEFAULT_MAX_SCRATCH = 1 << 30
SANDBOX_DEFAULT_MAX_DOWNLOADS = 32
SANDBOX_DEFAULT_MAX_DOWNLOAD_BYTES = 16 << 30
SANDBOX_DEFAULT_MAX_OUTPUT = 1 << 20
#: A zip a sandboxed hubconf had fetched may not expand by more than this (real checkpoints: ~1.1).
SANDBOX_MAX_EXTRACT_RATIO = 100
ENV_SANDBOX_ALLOWED_HOSTS = "FLOWHUB_SANDBOX_ALLOWED_HOSTS"


def _positive(env: Dict[str, str], name: str, default: int) -> int:
    """``name`` as a positive whole number, else ``default``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name}={raw!r} is not a positive number")
    return value


def _size(env: Dict[str, str], name: str, default: int) -> int:
    """``name`` as a size (``"2G"``, ``"512M"``, ``"1.5GiB"`` or bytes), else ``default``."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        size = units.parse_size(raw)
    except ValueError:
        size = 0
    if size <= 0:
        raise ValueError(f"{name}={raw!r} is not a size like 4G or 512M")
    return size


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """What each sandboxed worker may use, read from the environment when it starts (see the table in
    the module docstring). Every limit is enforced by the kernel or by the caller, never by the worker."""

    max_memory: int = SANDBOX_DEFAULT_MAX_MEMORY
    max_processes: int = SANDBOX_DEFAULT_MAX_PROCESSES
    min_strength: str = "strong"
    max_cpu: int = SANDBOX_DEFAULT_MAX_CPU
    timeout: float = SANDBOX_DEFAULT_TIMEOUT
    max_scratch: int = SANDBOX_DEFAULT_MAX_SCRATCH
    max_downloads: int = SANDBOX_DEFAULT_MAX_DOWNLOADS
    max_download_bytes: int = SANDBOX_DEFAULT_MAX_DOWNLOAD_BYTES
    max_output: int = SANDBOX_DEFAULT_MAX_OUTPUT

    @classmethod
    def from_env(cls, env: Optional[Dict[str, str]] = None) -> "SandboxLimits":
        env = dict(os.environ if env is None else env)
        strength = (env.get(ENV_SANDBOX_MIN_STRENGTH) or "strong").strip().lower()
        if strength not in STRENGTHS:
            raise ValueError(f"{ENV_SANDBOX_MIN_STRENGTH}={strength!r}: use one of {', '.join(STRENGTHS)}")
        return cls(max_memory=_size(env, ENV_SANDBOX_MAX_MEMORY, SANDBOX_DEFAULT_MAX_MEMORY),
                   max_processes=_positive(env, ENV_SANDBOX_MAX_PROCESSES, SANDBOX_DEFAULT_MAX_PROCESSES),
                   min_strength=strength,
                   max_cpu=_positive(env, ENV_SANDBOX_MAX_CPU, SANDBOX_DEFAULT_MAX_CPU),
                   timeout=_env_float(env, ENV_SANDBOX_TIMEOUT, SANDBOX_DEFAULT_TIMEOUT),
                   max_scratch=_size(env, ENV_SANDBOX_MAX_SCRATCH, SANDBOX_DEFAULT_MAX_SCRATCH),
                   max_downloads=_positive(env, ENV_SANDBOX_MAX_DOWNLOADS, SANDBOX_DEFAULT_MAX_DOWNLOADS),
                   max_download_bytes=_size(env, ENV_SANDBOX_MAX_DOWNLOAD_BYTES, SANDBOX_DEFAULT_MAX_DOWNLOAD_BYTES),
                   max_output=_size(env, ENV_SANDBOX_MAX_OUTPUT, SANDBOX_DEFAULT_MAX_OUTPUT))

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
            "memory": f"{size(self.max_memory)} ({ENV_SANDBOX_MAX_MEMORY}): RLIMIT_DATA and RLIMIT_FSIZE in the worker, "
                      f"and the caller's watchdog on its processes' memory and memfds",
            "processes": f"{self.max_processes} ({ENV_SANDBOX_MAX_PROCESSES}): RLIMIT_NPROC, the caller's watchdog, "
                         f"and a PID namespace that dies with the worker",
            "cpu": f"{self.max_cpu} s over the worker's life ({ENV_SANDBOX_MAX_CPU}): RLIMIT_CPU",
            "call time": f"{self.timeout:g} s per call unless FLOWHUB_WORKER_TIMEOUT says otherwise "
                         f"({ENV_SANDBOX_TIMEOUT}): the caller kills the worker",
            "scratch": f"{size(self.max_scratch)} ({ENV_SANDBOX_MAX_SCRATCH}): a tmpfs of that size",
            "downloads": f"{self.max_downloads} files and {size(self.max_download_bytes)} per call, extraction "
                         f"included, at most {SANDBOX_MAX_EXTRACT_RATIO}x a zip's size ({ENV_SANDBOX_MAX_DOWNLOADS}, "
                         f"{ENV_SANDBOX_MAX_DOWNLOAD_BYTES}): the caller, which makes them",
            "output": f"{size(self.max_output)} of stdout and stderr per call ({ENV_SANDBOX_MAX_OUTPUT}): "
                      f"the caller relays it, prefixed, then drops the rest",
        }


def sandbox_extra_hosts(env: Optional[Mapping[str, str]] = None) -> List[str]:
    """``FLOWHUB_SANDBOX_ALLOWED_HOSTS``: hosts besides the GitHub endpoints a sandboxed hubconf may have
    the caller fetch from (comma-separated ``host`` or ``host:port``; ``*`` allows any)."""
    extra = (os.environ if env is None else env).get(ENV_SANDBOX_ALLOWED_HOSTS, "")
    return [h.strip().lower() for h in extra.split(",") if h.strip()]


def progress_disabled(env: Optional[Mapping[str, str]] = None) -> bool:
    """``TQDM_DISABLE`` (set by ``flowhub -q``, inherited by workers): no progress bars."""
    return (os.environ if env is None else env).get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes")


def deprecated_variables(env: Optional[Mapping[str, str]] = None) -> List[str]:
    """The reference's deprecated hub variables that are set (``ONEFLOW_HUB``, ``ONEFLOW_MODEL_ZOO``)."""
    env = os.environ if env is None else env
    return [name for name in ("ONEFLOW_HUB", "ONEFLOW_MODEL_ZOO") if env.get(name)]


ENV_ZYGOTE = "FLOWHUB_ZYGOTE"
ENV_ZYGOTE_IDLE_TIMEOUT = "FLOWHUB_ZYGOTE_IDLE_TIMEOUT"
ENV_RUNTIME_DIR = "FLOWHUB_RUNTIME_DIR"
ZYGOTE_KINDS = ("shared", "process")
DEFAULT_ZYGOTE_IDLE_TIMEOUT = 300.0
#: Variables a zygote service is started with and keyed by (they change what its imports do);
#: every other variable reaches a worker in its fork request, never the service.
SERVICE_ENV_PREFIXES = ("ONEFLOW_", "GLOG_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "NCCL_", "LD_", "PYTHON")
SERVICE_ENV_NAMES = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")
#: Not part of a service's identity: the hub's folder (read per call) and what ``import oneflow`` sets
#: in every process itself (so a caller that imported oneflow finds the same service as one that did not).
SERVICE_ENV_IGNORED = (ENV_ONEFLOW_HOME, "ONEFLOW_HUB", "ONEFLOW_MODEL_ZOO", "CUDA_MODULE_LOADING")


@dataclasses.dataclass(frozen=True)
class ZygoteSettings:
    """Where workers are forked from: one warm zygote service per user and environment (``shared``,
    the default) or a zygote of this process's own (``process``)."""

    kind: str
    idle_timeout: float
    runtime_dir: str

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "ZygoteSettings":
        env = os.environ if env is None else env
        kind = (env.get(ENV_ZYGOTE) or "shared").strip().lower()
        if kind not in ZYGOTE_KINDS:
            raise ValueError(f"{ENV_ZYGOTE}={kind!r}: use 'shared' (one warm zygote service per user and "
                             f"environment) or 'process' (a zygote per process).")
        idle = _env_float(env, ENV_ZYGOTE_IDLE_TIMEOUT, DEFAULT_ZYGOTE_IDLE_TIMEOUT)
        if idle is None or not math.isfinite(idle) or idle <= 0:
            raise ValueError(f"{ENV_ZYGOTE_IDLE_TIMEOUT}={env.get(ENV_ZYGOTE_IDLE_TIMEOUT)!r} is not a positive "
                             f"number of seconds (how long an unused zygote service stays up), e.g. 300.")
        return cls(kind=kind, idle_timeout=idle, runtime_dir=runtime_dir(env))

    def service_environ(self, env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The environment a zygote service starts with: the variables that shape imports, no secrets."""
        env = os.environ if env is None else env
        return {k: v for k, v in env.items()
                if (k.startswith(SERVICE_ENV_PREFIXES) or k in SERVICE_ENV_NAMES) and k not in SERVICE_ENV_IGNORED}


def runtime_dir(env: Optional[Mapping[str, str]] = None) -> str:
    """``FLOWHUB_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/flowhub``, else ``/tmp/flowhub-<uid>``: where the
    zygote services' sockets live (a folder only this user may enter)."""
    env = os.environ if env is None else env
    if env.get(ENV_RUNTIME_DIR):
        return os.path.abspath(os.path.expanduser(env[ENV_RUNTIME_DIR]))
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "flowhub")
    return os.path.join("/tmp", f"flowhub-{os.getuid()}")
