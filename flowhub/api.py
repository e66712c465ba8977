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

from flowhub.hub import Hub, PathLike
from flowhub.trust import TrustArg

_default_hub: Optional[Hub] = None
_current_hub: contextvars.ContextVar[Optional[Hub]] = contextvars.ContextVar("flowhub_current_hub", default=None)
# While an entrypoint runs under force_reload=True: the set of weight files already fetched again.
_refreshed: contextvars.ContextVar[Optional[set]] = contextvars.ContextVar("flowhub_refreshed", default=None)
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


@contextlib.contextmanager
def serving(hub: Hub, refresh_weights: bool = False) -> Iterator[None]:
    """Make ``hub`` current, and route ``oneflow.hub``'s download functions to flowhub, for the duration."""
    import oneflow.hub as module  # hubconfs call oneflow.hub.load_state_dict_from_url & co.

    token = _current_hub.set(hub)
    refresh_token = _refreshed.set(set() if refresh_weights else None)
    saved: Dict[str, Any] = {}
    try:
        for name in _PATCHED_NAMES:
            saved[name] = getattr(module, name, None)
            setattr(module, name, globals()[name])
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        _refreshed.reset(refresh_token)
        _current_hub.reset(token)


def adopt_settings(settings: Dict[str, Any]) -> None:
    """Inside a worker: make the default hub use the caller's settings and route ``oneflow.hub`` to flowhub.

    ``settings`` is ``Settings.as_dict()`` from the caller, optionally with ``refresh_weights``.
    """
    global _default_hub
    values = dict(settings)
    refresh = bool(values.pop("refresh_weights", False))
    values.pop("github_token", None)  # the worker reads its own environment for the token
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
    """Use ``d`` as the hub cache folder from now on (``~`` is expanded)."""
    current_hub().set_dir(d)


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
                             file_name: Optional[str] = None) -> Dict[str, Any]:
    """Load the OneFlow serialized object at ``url`` (downloaded once into ``<hub_dir>/checkpoints``)."""
    return current_hub().load_state_dict_from_url(url, model_dir=model_dir, map_location=map_location,
                                                  progress=progress, check_hash=check_hash, file_name=file_name)


def _deprecated_env_warnings() -> None:
    for name in ("ONEFLOW_HUB", "ONEFLOW_MODEL_ZOO"):
        if os.getenv(name):
            import warnings

            warnings.warn(f"{name} is deprecated, please use env ONEFLOW_HOME instead")
