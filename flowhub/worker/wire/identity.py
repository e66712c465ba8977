"""What a zygote service must share with a caller for the caller to use it: its environment's identity.

A worker forked from a zygote runs the zygote's already-imported oneflow, numpy, cloudpickle and
flowhub, so a caller may use a zygote service only if it would have imported the very same files.
:func:`identity` describes that from the side that computes it (caller or service): the interpreter,
where each preloaded package resolves on this ``sys.path`` (with each file's size and mtime, so a
reinstall or an edited flowhub source changes it), the environment the service starts with, the
service's flavour (plain or sandbox) and the user. Both sides compute it; the caller names the
service's socket after its digest and the service refuses a caller whose digest differs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from typing import Any, Dict, Mapping, Tuple

#: The top-level packages a zygote imports before forking (see flowhub.worker.proc.zygote.PRELOAD).
PRELOADED_PACKAGES = ("cloudpickle", "numpy", "oneflow", "flowhub")


def _file_stamp(path: str) -> list:
    try:
        st = os.stat(path)
    except OSError:
        return [path, None]
    return [path, st.st_size, st.st_mtime_ns]


def _package_files(folder: str) -> list:
    """Size and mtime of every ``.py`` file under ``folder`` (flowhub's own sources: any edit counts)."""
    stamps = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        stamps.extend(_file_stamp(os.path.join(root, f)) for f in sorted(files) if f.endswith(".py"))
    return stamps


def _where(name: str) -> Any:
    module = sys.modules.get(name)
    spec = getattr(module, "__spec__", None) if module is not None else None
    if spec is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
    if spec is None or not spec.origin:
        return None
    if name == "flowhub":
        return _package_files(os.path.dirname(spec.origin))
    return _file_stamp(spec.origin)


def identity(flavour: str, service_env: Mapping[str, str]) -> Tuple[str, Dict[str, Any]]:
    """``(digest, material)`` of a zygote service of ``flavour`` (``""`` or ``"sandbox"``) started with
    ``service_env``, as seen from this process's ``sys.path``."""
    material = {
        "python": [sys.executable, sys.version, sys.prefix],
        "packages": {name: _where(name) for name in PRELOADED_PACKAGES},
        "env": sorted(service_env.items()),
        "flavour": flavour,
        "uid": os.getuid(),
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], material
