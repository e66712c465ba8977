"""flowhub: a drop-in replacement for ``oneflow.hub``.

``import flowhub as hub`` gives the reference's functions (``list``, ``help``, ``load``,
``download_url_to_file``, ``load_state_dict_from_url``, ``get_dir``, ``set_dir``) backed by a cache
that many processes can share; :class:`Hub` carries settings for a different cache, server or mode.
"""
from flowhub import _native_libs

_native_libs.preload()

from flowhub._version import __version__  # noqa: E402,F401  (re-exported)

from flowhub.api import (  # noqa: E402
    download_url_to_file,
    get_dir,
    help,
    list,
    load,
    load_state_dict_from_url,
    load_weights,
    set_dir,
)
from flowhub.cache.checkpoints import HASH_REGEX  # noqa: E402
from flowhub.entrypoints import MODULE_HUBCONF, VAR_DEPENDENCY  # noqa: E402
from flowhub.errors import (  # noqa: E402
    ArchiveError,
    CheckpointFormatError,
    EntrypointError,
    FlowhubError,
    HashMismatchError,
    HubconfError,
    IncompleteDownloadError,
    IntegrityError,
    MissingDependenciesError,
    MissingModuleError,
    NetworkError,
    OfflineError,
    ProxyError,
    RateLimitError,
    RepoSpecError,
    RequestTimeoutError,
    RequirementsInstallError,
    ResolveError,
    StaleProxyError,
    TransferError,
    UnsafeCheckpointError,
    UntrustedRepositoryError,
    WeightsOnlyError,
    WorkerCrashedError,
    WorkerError,
    WorkerTimeoutError,
)
from flowhub.hub import Hub  # noqa: E402
from flowhub.worker.host.proxy import Proxy  # noqa: E402  (cheap: no oneflow import)
from flowhub.settings import ENV_GITHUB_TOKEN, ENV_ONEFLOW_HOME, ENV_XDG_CACHE_HOME  # noqa: E402

__all__ = [
    "list", "help", "load", "download_url_to_file", "load_state_dict_from_url", "get_dir", "set_dir",
    "Hub", "HASH_REGEX", "MODULE_HUBCONF", "VAR_DEPENDENCY", "ENV_GITHUB_TOKEN", "ENV_ONEFLOW_HOME",
    "ENV_XDG_CACHE_HOME", "FlowhubError", "RepoSpecError", "EntrypointError", "MissingDependenciesError",
    "ResolveError", "RateLimitError", "NetworkError", "RequestTimeoutError", "OfflineError", "IntegrityError",
    "IncompleteDownloadError", "HashMismatchError", "ArchiveError", "UntrustedRepositoryError", "WorkerError",
    "WorkerCrashedError", "WorkerTimeoutError", "HubconfError", "TransferError", "ProxyError", "StaleProxyError",
    "Proxy", "load_weights", "WeightsOnlyError", "CheckpointFormatError", "UnsafeCheckpointError",
    "MissingModuleError", "RequirementsInstallError",
]
