"""The module-level ``oneflow.hub`` API, as thin wrappers over a default :class:`~flowhub.hub.Hub`.

While a hubconf runs on behalf of a ``Hub`` (in this process or in a worker), the "current" hub is
that one, so weight downloads the hubconf asks for (through flowhub or through ``oneflow.hub``) use
the same settings, cache, locks and progress bars.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Any, Dict, Iterator, List, Optional

from flowhub import settings as settings_mod
from flowhub.hub import Hub, PathLike
from flowhub.trust import TrustArg

_default_hub: Optional[Hub] = None
_current_hub: contextvars.ContextVar[Optional[Hub]] = contextvars.ContextVar("flowhub_current_hub", default=None)
# While an entrypoint runs under force_reload=True: the set of weight files already fetched again.
_refreshed: contextvars.ContextVar[Optional[set]] = contextvars.ContextVar("flowhub_refreshed", default=None)
# While an entrypoint runs: the weight files it used (for provenance), and those a lockfile pins (URL → hash).
_weights_log: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar("flowhub_weights_log", default=None)
_expected: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("flowhub_expected_weights", default=None)
_PATCHED_NAMES = ("download_url_to_file", "load_state_dict_from_url", "get_dir", "set_dir")


def default_hub() -> Hub:
    """The Hub behind the module-level functions (settings from the environment)."""
    global _default_hub
    if _default_hub is None:
        _default_hub = Hub()
    return _default_hub


def current_hub() -> Hub:
    """The Hub a running hubconf belongs to, else the default one."""
    return _current_hub.get() or default_hub()


def claim_refresh(path: str) -> bool:
    """True if ``path`` must be downloaded again: an entrypoint runs under ``force_reload=True`` and has not
    refreshed this file yet (the reference's docs promise that force_reload re-downloads the weights)."""
    refreshed = _refreshed.get()
    if refreshed is None or path in refreshed:
        return False
    refreshed.add(path)
    return True


def note_weights(fingerprint: Dict[str, Any]) -> None:
    """Called for every weight file a running entrypoint uses: checked against the lockfile, then logged."""
    from flowhub.provenance import check_weight

    check_weight(fingerprint["url"], fingerprint.get("sha256"), fingerprint.get("size"),
                 (_expected.get() or {}).get(fingerprint["url"]))
    log = _weights_log.get()
    if log is not None:
        log.append(fingerprint)


def take_weights_log() -> List[Dict[str, Any]]:
    """Inside a worker: the weight files used since the last call (and start a new log)."""
    log = _weights_log.get() or []
    _weights_log.set([])
    return log


@contextlib.contextmanager
def serving(hub: Hub, refresh_weights: bool = False,
            expected_weights: Optional[Dict[str, Any]] = None) -> Iterator[List[Dict[str, Any]]]:
    """Make ``hub`` current, and route ``oneflow.hub``'s download functions to flowhub, for the duration.

    Yields the list that collects the weight files used meanwhile.
    """
    import oneflow.hub as module  # hubconfs call oneflow.hub.load_state_dict_from_url & co.

    log: List[Dict[str, Any]] = []
    tokens = (_current_hub.set(hub), _refreshed.set(set() if refresh_weights else None),
              _weights_log.set(log), _expected.set(expected_weights))
    saved: Dict[str, Any] = {}
    try:
        for name in _PATCHED_NAMES:
            saved[name] = getattr(module, name, None)
            setattr(module, name, globals()[name])
        yield log
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        for var, token in zip((_current_hub, _refreshed, _weights_log, _expected), tokens):
            var.reset(token)


def adopt_settings(settings: Dict[str, Any]) -> None:
    """Inside a worker: make the default hub use the caller's settings and route ``oneflow.hub`` to flowhub.

    ``settings`` is ``Settings.as_dict()`` from the caller, optionally with ``refresh_weights`` and
    ``expected_weights`` (URL → pinned hash, from a lockfile). The weight files the next call uses are
    collected for :func:`take_weights_log`.
    """
    global _default_hub
    values = dict(settings)
    refresh = bool(values.pop("refresh_weights", False))
    _expected.set(values.pop("expected_weights", None))
    _weights_log.set([])
    values["mode"] = "inprocess"
    _default_hub = Hub(**{k: v for k, v in values.items() if k != "hub_dir"}, hub_dir=values.get("hub_dir"))
    _refreshed.set(set() if refresh else None)
    import oneflow.hub as module

    for name in _PATCHED_NAMES:
        setattr(module, name, globals()[name])


# -- the reference's functions ------------------------------------------------------------------
def get_dir() -> str:
    """The hub cache folder: ``set_dir`` > ``$ONEFLOW_HOME/hub`` > ``$XDG_CACHE_HOME/oneflow/hub`` > ``~/.cache/oneflow/hub``."""
    _deprecated_env_warnings()
    return current_hub().get_dir()


def set_dir(d: PathLike) -> None:
    """Use ``d`` as the hub cache folder from now on (``~`` is expanded), for every ``Hub`` not given its own."""
    settings_mod.set_process_hub_dir(os.fspath(d))


def list(github: str, force_reload: bool = False, skip_validation: bool = False,  # noqa: A001
         trust_repo: TrustArg = None, verbose: bool = True) -> List[str]:
    """List all callable entrypoints available in the repo ``owner/repo[:ref]``."""
    return default_hub().list(github, force_reload=force_reload, skip_validation=skip_validation,
                              trust_repo=trust_repo, verbose=verbose)


def help(github: str, model: str, force_reload: bool = False, skip_validation: bool = False,  # noqa: A001
         trust_repo: TrustArg = None) -> Optional[str]:
    """Show the docstring of entrypoint ``model``."""
    return default_hub().help(github, model, force_reload=force_reload, skip_validation=skip_validation,
                              trust_repo=trust_repo)


def load(repo_or_dir: str, model: str, *args: Any, source: str = "github", trust_repo: TrustArg = None,
         force_reload: bool = False, verbose: bool = True, skip_validation: bool = False, **kwargs: Any) -> Any:
    """Load a model (or any object an entrypoint returns) from a GitHub repo or a local folder."""
    return default_hub().load(repo_or_dir, model, *args, source=source, trust_repo=trust_repo,
                              force_reload=force_reload, verbose=verbose, skip_validation=skip_validation, **kwargs)


def download_url_to_file(url: str, dst: str, hash_prefix: Optional[str] = None, progress: bool = True) -> None:
    """Download the object at ``url`` to the local path ``dst``."""
    current_hub().download_url_to_file(url, dst, hash_prefix=hash_prefix, progress=progress)


def load_state_dict_from_url(url: str, model_dir: Optional[str] = None, map_location: Any = None,
                             progress: bool = True, check_hash: bool = False,
                             file_name: Optional[str] = None, weights_only: bool = False) -> Dict[str, Any]:
    """Load the OneFlow serialized object at ``url`` (downloaded once into ``<hub_dir>/checkpoints``);
    ``weights_only=True`` unpickles it in a sandboxed worker and returns only tensors and plain values."""
    return current_hub().load_state_dict_from_url(url, model_dir=model_dir, map_location=map_location,
                                                  progress=progress, check_hash=check_hash, file_name=file_name,
                                                  weights_only=weights_only)


def load_weights(path: PathLike, map_location: Any = None, weights_only: bool = True) -> Any:
    """Load a local checkpoint; by default weights-only, in a sandboxed worker (see :meth:`Hub.load_weights`)."""
    return current_hub().load_weights(path, map_location=map_location, weights_only=weights_only)


def _deprecated_env_warnings() -> None:
    for name in ("ONEFLOW_HUB", "ONEFLOW_MODEL_ZOO"):
        if os.getenv(name):
            import warnings

            warnings.warn(f"{name} is deprecated, please use env ONEFLOW_HOME instead")
