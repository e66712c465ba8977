"""The module-level ``oneflow.hub`` API: the reference's functions over a default :class:`~flowhub.hub.Hub`.

While a hubconf runs on behalf of a ``Hub`` (in this process or in a worker), the download functions
use that call's settings, cache, locks and progress bars (see :mod:`flowhub.context`).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

from flowhub import context, settings as settings_mod
from flowhub.cache.trust import TrustArg
from flowhub.hub import Hub, PathLike

_default_hub: Optional[Hub] = None


def default_hub() -> Hub:
    """The Hub behind the module-level functions (settings from the environment)."""
    global _default_hub
    if _default_hub is None:
        _default_hub = Hub()
    return _default_hub


# -- the reference's functions ------------------------------------------------------------------
def get_dir() -> str:
    """The hub cache folder: ``set_dir`` > ``$ONEFLOW_HOME/hub`` > ``$XDG_CACHE_HOME/oneflow/hub`` > ``~/.cache/oneflow/hub``."""
    _deprecated_env_warnings()
    return context.get_dir()


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
    context.download_url_to_file(url, dst, hash_prefix, progress)


def load_state_dict_from_url(url: str, model_dir: Optional[str] = None, map_location: Any = None,
                             progress: bool = True, check_hash: bool = False,
                             file_name: Optional[str] = None, weights_only: bool = False) -> Dict[str, Any]:
    """Load the OneFlow serialized object at ``url`` (downloaded once into ``<hub_dir>/checkpoints``);
    ``weights_only=True`` unpickles it in a sandboxed worker and returns only tensors and plain values."""
    return context.load_state_dict_from_url(url, model_dir, map_location, progress, check_hash, file_name,
                                            weights_only)


def load_weights(path: PathLike, map_location: Any = None, weights_only: bool = True) -> Any:
    """Load a local checkpoint; by default weights-only, in a sandboxed worker (see :meth:`Hub.load_weights`)."""
    ctx = context.current()
    hub = _hub_with(ctx.settings) if ctx is not None else default_hub()  # a running call's settings
    return hub.load_weights(path, map_location=map_location, weights_only=weights_only)


def _hub_with(settings: settings_mod.Settings) -> Hub:
    """A ``Hub`` with ``settings``: those of its fields that are ``Hub`` arguments (not, say, a job role)."""
    import inspect

    accepted = inspect.signature(Hub).parameters
    return Hub(**{k: v for k, v in settings.to_wire().items() if k in accepted})


def _deprecated_env_warnings() -> None:
    import warnings

    for name in settings_mod.deprecated_variables():
        warnings.warn(f"{name} is deprecated, please use env ONEFLOW_HOME instead")
