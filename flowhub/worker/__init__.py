"""Isolated workers: each repository's ``hubconf.py`` runs in its own process.

The data path is ``manager`` (caller side: zygote, one worker per key, timeouts, crash reports)
-> ``protocol`` (framing and fd passing) -> ``child`` (inside the worker: import hubconf, run the
operation) -> ``rebuild`` (cloudpickle skeleton by value) + ``transfer`` (tensors in a sealed
memfd) -> back to the caller as real objects. ``launcher`` starts the ``zygote``, which forks the
workers; ``failures`` carries exceptions across. Importing this package is cheap: oneflow is
imported on the first call.
"""
from flowhub.worker.manager import WorkerManager, get_manager

__all__ = ["WorkerManager", "get_manager"]
