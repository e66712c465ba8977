"""One load's context: the settings, cache and bookkeeping that weight downloads made *during* a call use.

While an entrypoint runs on behalf of a ``Hub`` (in this process, or in a worker for a caller), the
downloads its hubconf asks for, through flowhub or through ``oneflow.hub`` (whose functions are routed
here for the duration), use that call's settings, cache, locks and progress bars; they are checked
against the lockfile's pinned hashes, logged for provenance, and fetched again once under
``force_reload``. How a file is fetched is a :class:`Downloads` strategy: :class:`LocalDownloads` by
default; a sandboxed worker installs one that asks its caller (see
:mod:`flowhub.worker.proc.sandbox_child`). This module sits below ``hub``, ``api`` and the worker
processes, so each of them can use it without importing the others.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

from flowhub import settings as settings_mod
from flowhub.cache import checkpoints
from flowhub.cache.provenance import check_weight
from flowhub.net.download import download
from flowhub.net.http import HttpClient
from flowhub.settings import Settings

#: The names of ``oneflow.hub`` that are routed here while a hubconf runs.
ROUTED_NAMES = ("download_url_to_file", "load_state_dict_from_url", "get_dir", "set_dir")
Fingerprint = Dict[str, Any]


@dataclasses.dataclass
class LoadContext:
    """What one running entrypoint's downloads use and record."""

    settings: Settings
    refreshed: Optional[set] = None  # under force_reload: the weight files already fetched again
    weights: List[Fingerprint] = dataclasses.field(default_factory=list)  # used, for provenance
    expected: Dict[str, Any] = dataclasses.field(default_factory=dict)  # URL -> hash pinned by a lockfile

    def claim_refresh(self, path: str) -> bool:
        """True if ``path`` must be downloaded again (once per file and call under ``force_reload``)."""
        if self.refreshed is None or path in self.refreshed:
            return False
        self.refreshed.add(path)
        return True

    def note(self, fingerprint: Fingerprint) -> None:
        """Check a weight file against the lockfile's pin, then log it."""
        check_weight(fingerprint["url"], fingerprint.get("sha256"), fingerprint.get("size"),
                     self.expected.get(fingerprint["url"]))
        self.weights.append(fingerprint)


@dataclasses.dataclass(frozen=True)
class CallSettings:
    """What a worker is given for one call: the caller's settings (never its token) and the call's
    options, with a plain-JSON wire form checked on arrival."""

    settings: Settings
    refresh_weights: bool = False
    expected_weights: Optional[Dict[str, Any]] = None

    def to_wire(self) -> Dict[str, Any]:
        return {"settings": self.settings.to_wire(), "refresh_weights": bool(self.refresh_weights),
                "expected_weights": self.expected_weights}

    @classmethod
    def from_wire(cls, data: Any) -> "CallSettings":
        if not isinstance(data, dict) or not isinstance(data.get("expected_weights") or {}, dict):
            raise ValueError("malformed call settings")
        return cls(Settings.from_wire(data.get("settings")), bool(data.get("refresh_weights")),
                   data.get("expected_weights") or None)


_current: contextvars.ContextVar[Optional[LoadContext]] = contextvars.ContextVar("flowhub_load", default=None)
#: In a worker: the context of the caller's current call (worker threads see it too).
_adopted: Optional[LoadContext] = None


def current() -> Optional[LoadContext]:
    """The running entrypoint's context, if any."""
    return _current.get() or _adopted


class Downloads(Protocol):
    """How this process fetches files (a strategy: local, or through a sandboxed worker's caller)."""

    def fetch_weights(self, settings: Settings, url: str, model_dir: Optional[str], progress: bool,
                      check_hash: bool, file_name: Optional[str], refresh: Callable[[str], bool]
                      ) -> Tuple[str, Fingerprint]: ...

    def download_file(self, settings: Settings, url: str, dst: str, hash_prefix: Optional[str],
                      progress: bool) -> Fingerprint: ...


class LocalDownloads:
    """Fetch through this process's own HTTP client and cache."""

    def fetch_weights(self, settings: Settings, url: str, model_dir: Optional[str], progress: bool,
                      check_hash: bool, file_name: Optional[str], refresh: Callable[[str], bool]
                      ) -> Tuple[str, Fingerprint]:
        folder = model_dir if model_dir is not None else os.path.join(settings.hub_dir, "checkpoints")
        cached = checkpoints.fetch_weights(HttpClient(settings), url, folder, progress=progress,
                                           check_hash=check_hash, file_name=file_name, refresh=refresh)
        return cached, checkpoints.fingerprint(folder, os.path.basename(cached), url)

    def download_file(self, settings: Settings, url: str, dst: str, hash_prefix: Optional[str],
                      progress: bool) -> Fingerprint:
        result = download(HttpClient(settings), url, dst, hash_prefix=hash_prefix, progress=progress)
        return {"url": url, "file": os.path.basename(result.path), "size": result.size, "sha256": result.sha256}


_downloads: Downloads = LocalDownloads()
_weights_only_loader: Optional[Callable[..., Any]] = None


def install_downloads(strategy: Downloads) -> None:
    """Make every later download of this process go through ``strategy`` (a sandboxed worker's)."""
    global _downloads
    _downloads = strategy


def sandboxed_downloads() -> bool:
    """True once a strategy other than the local one is installed (in a sandboxed worker)."""
    return not isinstance(_downloads, LocalDownloads)


def set_weights_only_loader(loader: Callable[..., Any]) -> None:
    """Who runs ``weights_only=True`` loads (``flowhub.hub`` installs the one-shot sandboxed loader)."""
    global _weights_only_loader
    _weights_only_loader = loader


# -- the functions hubconfs reach (flowhub's and oneflow.hub's names) ---------------------------------
def _settings(settings: Optional[Settings]) -> Settings:
    if settings is not None:
        return settings
    ctx = current()
    return ctx.settings if ctx is not None else settings_mod.resolve({})


def _note(fingerprint: Fingerprint) -> None:
    ctx = current()
    if ctx is not None:
        ctx.note(fingerprint)
    else:
        check_weight(fingerprint["url"], fingerprint.get("sha256"), fingerprint.get("size"), None)


def download_url_to_file(url: str, dst: Any, hash_prefix: Optional[str] = None, progress: bool = True,
                         settings: Optional[Settings] = None) -> None:
    """Download ``url`` to ``dst`` (atomically, resumably, verified against ``hash_prefix`` if given)."""
    _note(_downloads.download_file(_settings(settings), url, os.fspath(dst), hash_prefix, progress))


def load_state_dict_from_url(url: str, model_dir: Any = None, map_location: Any = None, progress: bool = True,
                             check_hash: bool = False, file_name: Optional[str] = None, weights_only: bool = False,
                             settings: Optional[Settings] = None) -> Any:
    """Download (once) and load the checkpoint at ``url``; ``weights_only=True`` loads it in a sandboxed
    worker that returns only tensors and plain values."""
    settings = _settings(settings)
    ctx = current()
    refresh = ctx.claim_refresh if ctx is not None else (lambda path: False)

    def fetch() -> Tuple[str, Fingerprint]:
        return _downloads.fetch_weights(settings, url, None if model_dir is None else os.fspath(model_dir),
                                        progress, check_hash, file_name, refresh)

    if settings.broadcast_weights and not weights_only and not sandboxed_downloads():
        from flowhub.distributed import weights as job_weights  # delayed: only with broadcast_weights

        job = job_weights.job_for_broadcast()
        if job is not None:  # rank 0 fetches and reads it, the other ranks receive its tensors
            def read() -> Tuple[Any, Fingerprint]:
                path, fp = fetch()
                return checkpoints.load_checkpoint(path, map_location, settings.lock_timeout), fp

            obj, fingerprint = job_weights.broadcast_load(job, read, map_location)
            _note(fingerprint)
            return obj
    cached, fingerprint = fetch()
    _note(fingerprint)
    if weights_only:
        if _weights_only_loader is None:
            raise RuntimeError("weights_only=True needs flowhub's weights-only loader (import flowhub first)")
        return _weights_only_loader(cached, map_location, settings)
    return checkpoints.load_checkpoint(cached, map_location, settings.lock_timeout)


def get_dir() -> str:
    """The hub folder of the running call (else of the environment)."""
    return _settings(None).hub_dir


def set_dir(d: Any) -> None:
    """``set_dir``: the hub folder of every ``Hub`` in this process that was not given one."""
    settings_mod.set_process_hub_dir(os.fspath(d))


# -- entering a context --------------------------------------------------------------------------------
def _route_oneflow_hub() -> Dict[str, Any]:
    import oneflow.hub as module  # delayed: importing oneflow is the caller's choice, not this module's

    saved = {}
    for name in ROUTED_NAMES:
        saved[name] = getattr(module, name, None)
        setattr(module, name, globals()[name])
    return saved


@contextlib.contextmanager
def serving(settings: Settings, refresh_weights: bool = False,
            expected_weights: Optional[Dict[str, Any]] = None) -> Iterator[List[Fingerprint]]:
    """Run an entrypoint in this process under ``settings``, with ``oneflow.hub`` routed here meanwhile;
    yields the list that collects the weight files it uses."""
    ctx = LoadContext(settings, set() if refresh_weights else None, [], dict(expected_weights or {}))
    token = _current.set(ctx)
    saved = _route_oneflow_hub()
    try:
        yield ctx.weights
    finally:
        import oneflow.hub as module

        for name, value in saved.items():
            setattr(module, name, value)
        _current.reset(token)


def adopt(call: CallSettings) -> None:
    """In a worker, before each call: the caller's settings become this process's context, and
    ``oneflow.hub`` is routed here (for good: nothing else runs in a worker)."""
    global _adopted
    _adopted = LoadContext(call.settings, set() if call.refresh_weights else None, [],
                           dict(call.expected_weights or {}))
    _route_oneflow_hub()


def take_weights_log() -> List[Fingerprint]:
    """In a worker: the weight files used since the last call (and a new log)."""
    ctx = current()
    if ctx is None:
        return []
    log, ctx.weights = ctx.weights, []
    return log
