"""A caller-side, private view of one requirement overlay: its modules, never in ``sys.modules``.

A rebuilt result of a repo whose requirements live in an overlay refers to the overlay's packages
(by name, through pickle's globals and cloudpickle's ``subimport``). :class:`PrivateImporter` loads
them from the overlay's ``site`` folder as module objects of its own, which the caller's ``import``
never finds. Every module it loads, and every by-value function the unpickler rebuilds for such a
result, gets :attr:`PrivateImporter.builtins`: the real builtins with an ``__import__`` that serves
the overlay's names privately (relative imports too) and everything else through the normal import,
so module-level imports at load time and function-level ones at call time both stay private.

One importer per overlay per process (:func:`for_site`): two models from one overlay share their
classes, two overlays (two versions of one package) get distinct module objects side by side.

Limits: ``importlib.import_module`` bypasses ``__import__``, so code that imports an overlay name that
way fails here; a module that puts itself (or a stand-in) in ``sys.modules`` or folders on
``sys.path`` is refused (both undone); finders a private module adds to ``sys.meta_path`` are dropped.
Failures while loading for a result (:meth:`PrivateImporter.preload`, the unpickler) are raised as
:class:`~flowhub.errors.OverlayImportError`, on which the hub falls back to proxy mode.
"""
from __future__ import annotations

import builtins
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set

from flowhub.errors import OverlayImportError

_LOADERS = [(importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
            (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
            (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES)]
_SUFFIXES = tuple(importlib.machinery.all_suffixes())


def top_level_names(site: str) -> FrozenSet[str]:
    """The top-level packages and modules an overlay's ``site`` folder provides."""
    names = set()
    for entry in os.listdir(site) if os.path.isdir(site) else []:
        path = os.path.join(site, entry)
        if entry.startswith(".") or entry == "__pycache__" or entry.endswith((".dist-info", ".egg-info", ".data")):
            continue
        if os.path.isdir(path):
            if entry.isidentifier() and _is_package_dir(path):
                names.add(entry)
        elif entry.endswith(_SUFFIXES):
            name = entry.split(".", 1)[0]
            if name.isidentifier():
                names.add(name)
    return frozenset(names)


def _is_package_dir(path: str) -> bool:
    """A regular package, or a namespace one (Python files or packages inside; ``bin/`` is neither)."""
    children = os.listdir(path)
    return "__init__.py" in children or any(
        c.endswith(_SUFFIXES) or os.path.isfile(os.path.join(path, c, "__init__.py")) for c in children)


class PrivateImporter:
    """Loads the modules of one overlay's ``site`` folder privately (thread-safe)."""

    def __init__(self, site: str) -> None:
        self.site = os.path.realpath(site)
        self.names = top_level_names(self.site)
        self.modules: Dict[str, types.ModuleType] = {}
        self._lock = threading.RLock()
        self._finders: Dict[str, importlib.machinery.FileFinder] = {}
        #: builtins of every module this importer loads and every by-value function rebuilt for it
        self.builtins: Dict[str, Any] = dict(builtins.__dict__, __import__=self.__import__)

    def __repr__(self) -> str:
        return f"PrivateImporter({self.site!r}: {', '.join(sorted(self.names))})"

    def provides(self, name: str) -> bool:
        """Whether module ``name`` belongs to one of the overlay's top-level packages."""
        return name.partition(".")[0] in self.names

    def import_module(self, name: str) -> types.ModuleType:
        """The private module ``name`` (dotted names too), loaded on first use."""
        with self._lock:
            module = self.modules.get(name)
            if module is not None:
                return module
            parent, _, tail = name.rpartition(".")
            if parent:
                package = self.import_module(parent)
                if name in self.modules:  # the parent's own code imported it
                    return self.modules[name]
                paths: Optional[Sequence[str]] = getattr(package, "__path__", None)
                spec = self._find(name, paths) if paths else None
                if spec is None:
                    attribute = getattr(package, tail, None)  # six.moves: a module object, not a file
                    if isinstance(attribute, types.ModuleType):
                        return attribute
                    raise ModuleNotFoundError(f"No module named {name!r} in the overlay {self.site}", name=name)
            else:
                if name not in self.names:
                    raise ModuleNotFoundError(f"No module named {name!r} in the overlay {self.site}", name=name)
                spec = self._find(name, [self.site])
                if spec is None:
                    raise ModuleNotFoundError(f"No module named {name!r} in the overlay {self.site}", name=name)
            module = self._load(spec)
            if parent:
                setattr(self.modules[parent], tail, module)
            return module

    def subimport(self, name: str) -> types.ModuleType:
        """cloudpickle's ``subimport`` for a reply of this overlay: private for its names."""
        if self.provides(name):
            return self.load_for_result(name)
        __import__(name)
        return sys.modules[name]

    def load_for_result(self, name: str) -> types.ModuleType:
        """:meth:`import_module`, any failure raised as :class:`~flowhub.errors.OverlayImportError`."""
        try:
            return self.import_module(name)
        except Exception as exc:
            raise OverlayImportError(self.site, name, exc) from exc

    def preload(self) -> None:
        """Import every top-level package of the overlay privately now, so that a package that cannot
        be loaded this way is found before a load relies on it (raises OverlayImportError)."""
        for name in sorted(self.names):
            self.load_for_result(name)

    def __import__(self, name: str, globals: Optional[dict] = None, locals: Any = None,
                   fromlist: Sequence[str] = (), level: int = 0) -> types.ModuleType:
        """``builtins.__import__``, with the overlay's names served from this importer."""
        resolved, package = name, _package_of(globals or {}) if level > 0 else ""
        if level > 0 and package:
            resolved = importlib.util.resolve_name("." * level + name, package)
        if (level > 0 and not package) or not self.provides(resolved):
            return builtins.__import__(name, globals, locals, fromlist, level)
        module = self.import_module(resolved)
        if fromlist:
            items: List[str] = list(fromlist)
            if "*" in items:
                items.remove("*")
                items.extend(getattr(module, "__all__", ()))
            for item in items:
                if not hasattr(module, item) and hasattr(module, "__path__"):
                    try:
                        self.import_module(f"{resolved}.{item}")
                    except ModuleNotFoundError:
                        pass  # the statement itself raises ImportError for a missing name
            return module
        if level == 0:
            return self.import_module(resolved.partition(".")[0])
        if not name:
            return module
        cut = len(name) - len(name.partition(".")[0])  # as importlib: ``import ..a.b`` gives ``..a``
        return self.import_module(resolved[:len(resolved) - cut])

    def _find(self, name: str, paths: Sequence[str]) -> Optional[importlib.machinery.ModuleSpec]:
        tail = name.rpartition(".")[2]
        portions: List[str] = []
        for path in list(paths):
            finder = self._finders.get(path)
            if finder is None:
                finder = self._finders[path] = importlib.machinery.FileFinder(path, *_LOADERS)
            spec = finder.find_spec(name)
            if spec is None:
                continue
            if spec.loader is not None:
                return spec
            portions.extend(spec.submodule_search_locations or [os.path.join(path, tail)])
        if portions:  # a namespace package
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = portions
            return spec
        return None

    def _load(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        name = spec.name
        if spec.loader is None:
            module = types.ModuleType(name)
            module.__spec__, module.__path__, module.__package__ = spec, list(spec.submodule_search_locations), name
        else:
            module = importlib.util.module_from_spec(spec)
        module.__dict__["__builtins__"] = self.builtins
        self.modules[name] = module  # before its code runs, as sys.modules: circular imports find it
        claimed, finders, path = {n for n in sys.modules if self.provides(n)}, list(sys.meta_path), list(sys.path)
        try:
            try:
                if spec.loader is not None:
                    spec.loader.exec_module(module)
            finally:
                problem = self._undo_side_effects(claimed, finders, path)
            if problem:
                raise ImportError(f"{problem}; it works only as an ordinary (shared) import")
        except BaseException:
            self.modules.pop(name, None)
            raise
        return module

    def _undo_side_effects(self, claimed: Set[str], finders: List[Any], path: List[str]) -> str:
        """Keep the caller's import system as it was after a private module's code ran, and say what
        would make that module fail privately: the overlay's names it put in ``sys.modules`` (itself or a
        stand-in) or folders it put on ``sys.path`` (removed again). Finders of the overlay's classes
        that it added to ``sys.meta_path`` are dropped silently (six adds one for ``six.moves``, which
        this importer serves as attributes)."""
        sys.meta_path[:] = [f for f in sys.meta_path
                            if any(f is old for old in finders) or not self.provides(type(f).__module__)]
        problems = []
        intruders = sorted(n for n in list(sys.modules) if self.provides(n) and n not in claimed)
        if intruders:
            for intruder in intruders:
                sys.modules.pop(intruder, None)
            problems.append(f"importing it registered {', '.join(intruders)} in sys.modules")
        added = [p for p in sys.path if p not in path]
        if added:
            sys.path[:] = [p for p in sys.path if p in path]
            problems.append(f"importing it put {', '.join(map(repr, added))} on sys.path")
        return "; ".join(problems)


def _package_of(globals: dict) -> str:
    """The package relative imports in a module with these globals start from (as importlib)."""
    package = globals.get("__package__")
    if package is not None:
        return package
    spec = globals.get("__spec__")
    if spec is not None:
        return spec.parent
    name = globals.get("__name__", "")
    return name if "__path__" in globals else name.rpartition(".")[0]


_importers: Dict[str, PrivateImporter] = {}
_importers_lock = threading.Lock()


def for_site(site: str) -> PrivateImporter:
    """This process's one :class:`PrivateImporter` of the overlay at ``site``."""
    key = os.path.realpath(site)
    with _importers_lock:
        importer = _importers.get(key)
        if importer is None:
            importer = _importers[key] = PrivateImporter(key)
        return importer
