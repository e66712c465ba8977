"""What a repository declares it needs, read statically (nothing of the repository runs), and which
of those needs this environment already meets.

Sources, in this order: ``hubconf.py``'s ``dependencies`` (import names, as the reference checks them),
``requirements.txt``, ``pyproject.toml`` ``[project].dependencies``, ``setup.cfg`` ``[options]
install_requires`` and ``setup.py``'s ``install_requires=`` (an ``ast`` reading of list literals, the
names they are bound to and literal ``append``/``extend``/``+=`` on those names; ``setup.py`` is never
run). What cannot be read that way is kept in ``notes``, never guessed.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Dict, Iterable, List, Optional, Tuple

from flowhub.errors import MissingModuleError

#: The hubconf variable the reference reads (``oneflow.hub.VAR_DEPENDENCY``).
VAR_DEPENDENCY = "dependencies"
HUBCONF = "hubconf.py"
_MAX_FILE = 1 << 20  # a requirements file larger than this is not read
#: PyTorch's compiled extensions, with OneFlow's counterpart where there is one. Their operators are
#: libtorch code (torchvision 0.29 loads its ``_C`` through ``torch.ops.load_library``), and
#: ``oneflow.mock_torch`` stands in for ``torch`` only: under it no copy of them can run, wherever installed.
TORCH_EXTENSIONS = {"torchvision": "flowvision (its hub repository is Oneflow-Inc/vision)",
                    "torchaudio": "", "torchtext": ""}


@dataclasses.dataclass(frozen=True)
class Declared:
    """One declared requirement: its text, the file it comes from, and whether it is an import name
    (a hubconf ``dependencies`` entry) or a distribution requirement (PEP 508)."""

    text: str
    source: str
    import_name: bool = False


@dataclasses.dataclass
class RepoRequirements:
    """Everything a repository declares, plus notes on what could not be read statically."""

    declared: List[Declared]
    notes: List[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return {"declared": [dataclasses.astuple(d) for d in self.declared], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, data: dict) -> "RepoRequirements":
        return cls([Declared(str(t), str(s), bool(i)) for t, s, i in data["declared"]], [str(n) for n in data["notes"]])

    def describe(self) -> str:
        """One line per source, e.g. ``setup.py install_requires: six==1.16.0, tabulate``."""
        by_source: Dict[str, List[str]] = {}
        for d in self.declared:
            by_source.setdefault(d.source, []).append(d.text)
        lines = [f"{source}: {', '.join(texts)}" for source, texts in by_source.items()]
        return "\n".join(lines + [f"(not read: {n})" for n in self.notes]) or "(none declared)"


def _read_text(path: str) -> Optional[str]:
    try:
        if not os.path.isfile(path) or os.path.getsize(path) > _MAX_FILE:
            return None
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _parse(path: str, notes: List[str]) -> Optional[ast.Module]:
    text = _read_text(path)
    if text is None:
        return None
    try:
        return ast.parse(text, filename=path)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:  # a hostile file is a note, not a crash
        notes.append(f"{os.path.basename(path)} does not parse ({type(exc).__name__})")
        return None


def _strings(node: ast.AST) -> Optional[List[str]]:
    """The strings of a list/tuple literal of string constants, else ``None``."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def hubconf_dependencies(repo_dir: str, notes: List[str]) -> List[str]:
    """The module-level ``dependencies = [...]`` literal of ``hubconf.py`` (not imported)."""
    tree = _parse(os.path.join(repo_dir, HUBCONF), notes)
    found: List[str] = []
    for node in tree.body if tree is not None else []:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
        if any(isinstance(t, ast.Name) and t.id == VAR_DEPENDENCY for t in targets):
            values = _strings(node.value)  # type: ignore[union-attr]
            if values is None:
                notes.append(f"{HUBCONF} {VAR_DEPENDENCY} is not a literal list of names")
            else:
                found = values
    return found


def _requirements_txt(text: str, notes: List[str]) -> List[str]:
    out = []
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            notes.append(f"requirements.txt option {line.split()[0]} ignored")
            continue
        out.append(line)
    return out


def _pyproject(text: str, notes: List[str]) -> List[str]:
    try:
        import tomllib  # type: ignore[import-not-found]  # Python 3.11+
    except ImportError:
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        project = tomllib.loads(text).get("project") or {}
    except (ValueError, AttributeError):
        notes.append("pyproject.toml does not parse")
        return []
    if "dependencies" in (project.get("dynamic") or []):
        notes.append("pyproject.toml [project].dependencies is dynamic")
    deps = project.get("dependencies") or []
    return [d for d in deps if isinstance(d, str)] if isinstance(deps, list) else []


def _setup_cfg(text: str, notes: List[str]) -> List[str]:
    import configparser  # delayed: most repos have no setup.cfg

    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text)
        raw = parser.get("options", "install_requires", fallback="")
    except configparser.Error:
        notes.append("setup.cfg does not parse")
        return []
    return [line.split(" #", 1)[0].strip() for line in raw.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def _setup_py(repo_dir: str, notes: List[str]) -> List[str]:
    """``install_requires`` of ``setup(...)``: a literal, or a name bound to one and grown literally."""
    tree = _parse(os.path.join(repo_dir, "setup.py"), notes)
    if tree is None:
        return []
    value: Optional[ast.AST] = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "setup":
            value = next((k.value for k in node.keywords if k.arg == "install_requires"), value)
    if value is None:
        return []
    literal = _strings(value)
    if literal is not None:
        return literal
    if not isinstance(value, ast.Name):
        notes.append("setup.py install_requires is not a literal")
        return []
    name, found, dynamic = value.id, [], False
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            items = _strings(node.value)
            found, dynamic = (items, dynamic) if items is not None else (found, True)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            items = _strings(node.value)
            found, dynamic = (found + items, dynamic) if items is not None else (found, True)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == name \
                and node.func.attr in ("append", "extend") and len(node.args) == 1:
            items = _strings(node.args[0])
            found, dynamic = (found + items, dynamic) if items is not None else (found, True)
    if dynamic:
        notes.append(f"setup.py {name} is partly computed; only its literal parts were read")
    return found


#: The files :func:`read` looks at (their stamps say when a reading is out of date).
SOURCES = (HUBCONF, "requirements.txt", "pyproject.toml", "setup.cfg", "setup.py")


def read(repo_dir: str) -> RepoRequirements:
    """Every requirement ``repo_dir`` declares, read without running any of its code."""
    notes: List[str] = []
    declared = [Declared(n, f"{HUBCONF} {VAR_DEPENDENCY}", True) for n in hubconf_dependencies(repo_dir, notes)]
    for fname, reader, source in (("requirements.txt", _requirements_txt, "requirements.txt"),
                                  ("pyproject.toml", _pyproject, "pyproject.toml [project].dependencies"),
                                  ("setup.cfg", _setup_cfg, "setup.cfg install_requires")):
        text = _read_text(os.path.join(repo_dir, fname))
        if text is not None:
            declared += [Declared(t, source) for t in reader(text, notes)]
    declared += [Declared(t, "setup.py install_requires") for t in _setup_py(repo_dir, notes)]
    return RepoRequirements(declared, notes)


# -- what this environment lacks -----------------------------------------------------------------------
def _installed_version(name: str) -> Optional[str]:
    import importlib.metadata  # delayed: it costs tens of ms, and ``import flowhub`` must stay cheap

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _provided(import_name: str, repo_dir: str, provided: Iterable[str]) -> bool:
    top = import_name.split(".")[0]
    if top in provided or os.path.exists(os.path.join(repo_dir, top + ".py")) \
            or os.path.isdir(os.path.join(repo_dir, top)):
        return True
    try:
        return importlib.util.find_spec(top) is not None or _installed_version(top) is not None
    except (ImportError, ValueError):
        return False


def unsatisfied(reqs: RepoRequirements, repo_dir: str, provided: Iterable[str] = ()) -> Tuple[List[str], List[str]]:
    """``(needed, refused)``: the declared requirements this environment does not meet, merged per
    distribution (markers evaluated here), and those that cannot be installed from an index (direct URLs,
    unparsable lines). A hubconf ``dependencies`` name counts as met when it is importable here, is a
    module of the repository, or is in ``provided`` (``torch`` under ``mock_torch``, which also makes
    PyTorch's compiled extensions, :data:`TORCH_EXTENSIONS`, refused: no installed copy could run)."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    provided = set(provided)
    mock_torch = "torch" in provided
    merged: Dict[str, Tuple[str, set, SpecifierSet]] = {}
    refused: List[str] = []
    for d in reqs.declared:
        if d.import_name and _provided(d.text, repo_dir, provided):
            continue
        if mock_torch and _top_name(d.text) in TORCH_EXTENSIONS:
            refused.append(f"{d.text!r} ({d.source}: a compiled PyTorch extension, which oneflow.mock_torch "
                           "cannot stand in for)")
            continue
        try:
            req = Requirement(d.text)
        except InvalidRequirement:
            refused.append(f"{d.text!r} ({d.source}: not a requirement)")
            continue
        if req.url:
            refused.append(f"{d.text!r} ({d.source}: a direct URL; overlays install from the package index only)")
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        key = canonicalize_name(req.name)
        name, extras, spec = merged.get(key, (req.name, set(), SpecifierSet()))
        merged[key] = (name, extras | set(req.extras), spec & req.specifier)
    needed = []
    for key, (name, extras, spec) in sorted(merged.items()):
        version = _installed_version(name)
        if version is not None and spec.contains(version, prereleases=True) and not extras:
            continue
        needed.append(name + (f"[{','.join(sorted(extras))}]" if extras else "") + str(spec))
    return needed, refused


def _top_name(text: str) -> str:
    """The top-level name of an import name or the distribution of a requirement, normalised."""
    import re

    name = re.split(r"[\s\[<>=!~;@(.]", text.strip(), maxsplit=1)[0]
    return name.lower().replace("_", "-")


# -- the error for a module that repo code could not import -------------------------------------------
def mock_torch_hint(module: str) -> str:
    """Why ``module`` cannot be had under ``mock_torch`` (a PyTorch compiled extension), or ``""``."""
    top = _top_name(module)
    if top not in TORCH_EXTENSIONS:
        return ""
    alt = TORCH_EXTENSIONS[top]
    return (f"{module.split('.')[0]!r} is a compiled extension of PyTorch: its operators are libtorch code, and "
            "oneflow.mock_torch stands in for torch only, so installing it (here or in an overlay) does not make "
            "this repository run on OneFlow." + (f" OneFlow's counterpart is {alt}." if alt else ""))


def missing_module_error(exc: ModuleNotFoundError, repo: str, op: str, model: Optional[str], repo_dir: str,
                         overlays: bool, mock_torch: bool = False) -> MissingModuleError:
    """The :class:`~flowhub.errors.MissingModuleError` for ``exc`` raised by ``repo``'s code (in its worker
    or here): it names the module, the call, what the repository declares and how to get the module (or,
    under ``mock_torch``, why a PyTorch extension cannot be had)."""
    import re

    module = getattr(exc, "name", None)
    if not isinstance(module, str) or not module:
        match = re.search(r"No module named '([^']+)'", str(exc))
        module = match.group(1) if match else "?"
    what = {"list": "listing its entrypoints (importing hubconf.py)",
            "help": f"help for entrypoint {model!r}"}.get(op, f"entrypoint {model!r}")
    install = ""
    try:
        reqs = read(repo_dir)
        declared = reqs.describe()
        top = module.split(".")[0].lower().replace("_", "-")
        for d in reqs.declared:  # the declared requirement named like the module, if any
            name = re.split(r"[\s\[<>=!~;@(]", d.text.strip(), maxsplit=1)[0]
            if not d.import_name and name.lower().replace("_", "-").replace(".", "-") == top:
                install = d.text
    except Exception as read_exc:  # the error must come out whatever the repository holds
        declared = f"(could not be read: {type(read_exc).__name__})"
    return MissingModuleError(repo=repo, entrypoint=what, module=module, declared=declared, overlays=overlays,
                              install=install, hint=mock_torch_hint(module) if mock_torch else "")
