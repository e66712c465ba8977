"""Isolated workers: each repository's ``hubconf.py`` runs in its own process.

The data path is ``manager`` (caller side: zygote, one worker per key, timeouts, crash reports)
-> ``protocol`` (framing and fd passing) -> ``child`` (inside the worker: import hubconf, run the
operation) -> ``rebuild`` (cloudpickle skeleton by value) + ``transfer`` (tensors in a sealed
memfd) -> back to the caller as real objects. ``launcher`` starts the ``zygote``, which forks the
workers; ``failures`` carries exceptions across. Importing this package is cheap: oneflow is
imported on the first call.

In ``mode="proxy"`` the result stays in the worker instead: ``objects`` (inside the worker) keeps it
in a table and answers the requests of the caller's ``proxy`` handles, and ``codec`` carries values
as restricted JSON plus tensors in a sealed memfd, so the caller never unpickles what such a
worker sends.

Sandboxed workers (``sandbox=True``) come from a second, scrubbed zygote: ``sandbox_host`` is the
caller's side (scratch folders, watchdog, the downloads it makes for them, one-shot workers),
``sandbox_child`` the worker's (lock down before the hubconf, ask the caller for downloads), and
``weights`` loads checkpoints weights-only in a one-shot sandboxed worker.
"""
from flowhub.worker.manager import WorkerManager, get_manager
from flowhub.worker.proxy import Proxy, ProxyError, StaleProxyError

__all__ = ["WorkerManager", "get_manager", "Proxy", "ProxyError", "StaleProxyError"]
