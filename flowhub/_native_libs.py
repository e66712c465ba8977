"""Make ``import oneflow`` work on a CPU machine without LD_LIBRARY_PATH.

The oneflow 0.9.0 wheel is a CUDA build that links against cuDNN 8 and cuBLAS 11. Those come
from the ``nvidia-cudnn-cu11`` / ``nvidia-cublas-cu11`` wheels, which the dynamic loader does not
search, so they are loaded here once, globally, before oneflow is imported.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

_LIBRARIES = (
    ("nvidia.cublas", ("libcublasLt.so.11", "libcublas.so.11")),
    ("nvidia.cudnn", ("libcudnn.so.8",)),
)
_loaded = False


def preload() -> None:
    """Load the NVIDIA libraries oneflow needs with RTLD_GLOBAL (idempotent, never raises)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for package, names in _LIBRARIES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        lib_dir = os.path.join(list(spec.submodule_search_locations)[0], "lib")
        for name in names:
            path = os.path.join(lib_dir, name)
            if os.path.exists(path):
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass  # oneflow's own import error will then say what is missing
