"""Importing a repository's ``hubconf.py`` and finding its entrypoints, in the current process.

This is the reference's in-process mechanism (used by ``mode="inprocess"`` and, inside each worker,
by the isolated modes), with its ``sys.path`` leak fixed: the repo folder is removed from
``sys.path`` on every exit path.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from typing import Any, Callable, Iterator, List, Optional

from flowhub.errors import EntrypointError, MissingDependenciesError

MODULE_HUBCONF = "hubconf.py"
VAR_DEPENDENCY = "dependencies"


@contextlib.contextmanager
def repo_on_sys_path(repo_dir: str) -> Iterator[None]:
    """Put ``repo_dir`` first on ``sys.path`` for the duration, and take it off again however we leave."""
    sys.path.insert(0, repo_dir)
    try:
        yield
    finally:
        try:
            sys.path.remove(repo_dir)
        except ValueError:
            pass


def import_hubconf(repo_dir: str) -> types.ModuleType:
    """Execute ``<repo_dir>/hubconf.py`` and return it as a module (not registered in ``sys.modules``).

    The caller must hold :func:`repo_on_sys_path` so that the hubconf's own imports resolve.
    """
    path = os.path.join(repo_dir, MODULE_HUBCONF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: a hub repository needs a hubconf.py at its top level.")
    spec = importlib.util.spec_from_file_location(MODULE_HUBCONF, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_dependencies(module: types.ModuleType) -> None:
    """Raise if a name in the hubconf's ``dependencies`` list cannot be found by the import system."""
    deps = getattr(module, VAR_DEPENDENCY, None)
    if not deps:
        return
    missing = [name for name in deps if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependenciesError(f"Missing dependencies: {', '.join(missing)}")


def list_entrypoints(module: types.ModuleType) -> List[str]:
    """Public callables of the hubconf, as the reference lists them."""
    return [name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")]


def find_entrypoint(module: types.ModuleType, model: Any) -> Callable[..., Any]:
    """The callable named ``model``, after the ``dependencies`` check."""
    if not isinstance(model, str):
        raise ValueError("Invalid input: model should be a string of function name")
    check_dependencies(module)
    func = getattr(module, model, None)
    if func is None or not callable(func):
        available = ", ".join(list_entrypoints(module)) or "none"
        raise EntrypointError(f"Cannot find callable {model} in hubconf (available entrypoints: {available})")
    return func


def entrypoint_doc(module: types.ModuleType, model: Any) -> Optional[str]:
    """The docstring of an entrypoint (``None`` if it has none)."""
    return find_entrypoint(module, model).__doc__


def run_in_process(repo_dir: str, op: str, model: Optional[str] = None, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
    """Do ``list``, ``help`` or ``load`` on a repository in this process (the reference's behaviour)."""
    with repo_on_sys_path(repo_dir):
        module = import_hubconf(repo_dir)
        if op == "list":
            return list_entrypoints(module)
        if op == "help":
            return entrypoint_doc(module, model)
        if op == "load":
            return find_entrypoint(module, model)(*args, **(kwargs or {}))
    raise ValueError(f"unknown hub operation {op!r}")
