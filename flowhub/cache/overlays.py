"""Per-repository dependency overlays: a repository's declared requirements that this environment
lacks, installed as wheels into ``<hub_dir>/overlays/<key>/site`` and put on its worker's ``sys.path``.

An overlay's key is the SHA-256 of the requirement set (merged, markers evaluated, see
:func:`flowhub.requirements.unsatisfied`) and the interpreter's most specific wheel tag, so two repos
that need the same things share one overlay and two that need different versions of a package get two.
It is installed like every cache entry is published: under the entry's lock, into a staging folder,
then one atomic rename; a failed install publishes nothing. Wheels only (``--only-binary :all:``): no
code of a dependency runs at install time. Everything else the environment has is pinned as a
constraint, so a dependency never brings a second, different numpy into a worker.

The installer is ``uv pip install --target`` where uv is found (13-50x faster than pip here: 35-130 ms
against 1.7-1.8 s for two small wheels), else ``pip install --target``; ``FLOWHUB_INSTALLER`` picks one.
Both use pip's configured package index (``pip config list``: files and ``PIP_*`` variables). Offline, an
existing overlay is used and a missing one is an :class:`~flowhub.errors.OfflineError`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence

from flowhub import requirements, settings as settings_mod
from flowhub.cache import store
from flowhub.errors import OfflineError, RequirementsInstallError
from flowhub.settings import Settings

OVERLAYS_DIR = "overlays"
MANIFEST = "overlay.json"
SITE = "site"
INSTALL_TIMEOUT = 900.0  # seconds for one installer run (it downloads)
CONFIG_TIMEOUT = 60.0  # seconds for ``pip config list``
_PIP_INDEX_OPTIONS = ("index-url", "extra-index-url", "find-links", "no-index")


@dataclasses.dataclass(frozen=True)
class Overlay:
    """A published overlay: its key, folder and what it was installed for."""

    key: str
    path: str
    requirements: List[str]

    @property
    def site(self) -> str:
        """The folder that goes on the worker's ``sys.path``."""
        return os.path.join(self.path, SITE)


@dataclasses.dataclass
class Plan:
    """What one repository needs: its declared requirements, those this environment lacks, and the
    overlay holding them (``None`` when nothing is lacking)."""

    declared: requirements.RepoRequirements
    needed: List[str]
    overlay: Optional[Overlay] = None

    @property
    def sys_path(self) -> List[str]:
        return [self.overlay.site] if self.overlay is not None else []


@functools.lru_cache(maxsize=1)
def interpreter_tag() -> str:
    """This interpreter's most specific wheel tag (``cp310-cp310-manylinux_2_35_x86_64``)."""
    from packaging import tags

    return str(next(iter(tags.sys_tags())))


def overlays_root(hub_dir: str) -> str:
    return os.path.join(hub_dir, OVERLAYS_DIR)


def overlay_key(needed: Sequence[str]) -> str:
    """The key of the overlay for ``needed`` on this interpreter."""
    data = json.dumps({"requirements": sorted(needed), "tag": interpreter_tag()}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:24]


def find(hub_dir: str, needed: Sequence[str]) -> Optional[Overlay]:
    """The published overlay for ``needed``, if there is one (its last use is recorded)."""
    key = overlay_key(needed)
    path = os.path.join(overlays_root(hub_dir), key)
    manifest = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest):
        return None
    store.touch(manifest)
    return Overlay(key, path, list(needed))


def _plan_path(hub_dir: str, repo_dir: str, provided: Sequence[str]) -> str:
    """Where the plan of ``repo_dir`` is remembered, named after everything that decides it: the stamps of
    its requirement files, this interpreter, and the folders of its import path (installing or removing
    a distribution changes its folder's mtime)."""
    stamps = []
    for name in requirements.SOURCES:
        try:
            st = os.stat(os.path.join(repo_dir, name))
            stamps.append([name, st.st_mtime_ns, st.st_size, st.st_ino])
        except OSError:
            stamps.append([name, None])
    cwd = os.getcwd()
    env = []
    for entry in sys.path:
        if entry and os.path.isabs(entry) and entry != cwd:
            try:
                env.append([entry, os.stat(entry).st_mtime_ns])
            except OSError:
                pass
    data = json.dumps([os.path.realpath(repo_dir), stamps, sys.executable, sys.version, sorted(provided), env])
    return os.path.join(overlays_root(hub_dir), store.META_DIR, "plans", hashlib.sha256(data.encode()).hexdigest()[:32] + ".json")


def plan(settings: Settings, repo_dir: str, label: str, provided: Iterable[str] = ()) -> Plan:
    """Read what ``repo_dir`` declares and make sure an overlay holds what this environment lacks
    (installing it unless it is published already).

    A warm plan is one small JSON file and two ``stat`` calls per file: the reading, the check against
    the environment (``packaging`` and ``importlib.metadata`` alone take 50-200 ms to import here) and
    the overlay's key are remembered under a name that changes with any of their inputs."""
    provided = sorted(provided)
    remembered = _plan_path(settings.hub_dir, repo_dir, provided)
    cached = store.read_json(remembered)
    if isinstance(cached, dict):
        try:
            result = Plan(requirements.RepoRequirements.from_dict(cached["declared"]), list(cached["needed"]))
            key = cached.get("key")
            if not result.needed:
                return result
            path = os.path.join(overlays_root(settings.hub_dir), str(key))
            if key and os.path.isfile(os.path.join(path, MANIFEST)):
                store.touch(os.path.join(path, MANIFEST))
                result.overlay = Overlay(str(key), path, result.needed)
                return result
        except (KeyError, TypeError, ValueError):
            pass  # an unreadable record: plan afresh
    declared = requirements.read(repo_dir)
    needed, refused = requirements.unsatisfied(declared, repo_dir, provided)
    declared.notes.extend(f"not installed: {r}" for r in refused)
    result = Plan(declared, needed)
    if needed:
        result.overlay = ensure(settings, needed, label)
    try:
        store.write_json_atomic(remembered, {"declared": declared.as_dict(), "needed": needed,
                                             "key": result.overlay.key if result.overlay else None})
    except OSError:  # a read-only cache still works, planning each time
        pass
    return result


def ensure(settings: Settings, needed: Sequence[str], label: str) -> Overlay:
    """The overlay for ``needed``: found, or installed and published now (under its lock)."""
    found = find(settings.hub_dir, needed)
    if found is not None:
        return found
    if settings.offline:
        raise OfflineError(f"{label} needs {', '.join(needed)}, which this environment lacks, and no overlay in "
                           f"{overlays_root(settings.hub_dir)} holds them yet; load it once online (with "
                           "install_requirements) or install them into this environment.")
    root = overlays_root(settings.hub_dir)
    key = overlay_key(needed)
    lock = os.path.join(root, store.META_DIR, "locks", key + ".lock")
    with store.entry_lock(lock, settings.lock_timeout, f"installing the requirements of {label}"):
        found = find(settings.hub_dir, needed)
        if found is not None:
            return found
        staged = store.staging_dir(root)
        try:
            index = pip_index_options()
            installer, installed = install(needed, os.path.join(staged, SITE), label, index)
            store.write_json_atomic(os.path.join(staged, MANIFEST), {
                "requirements": sorted(needed), "tag": interpreter_tag(), "installer": installer, "index": index,
                "installed": installed, "for": label, "created": time.time()})
            store.publish_dir(staged, os.path.join(root, key), root)
        finally:
            store.remove_tree(staged)
    published = find(settings.hub_dir, needed)
    assert published is not None
    return published


# -- running the installer ---------------------------------------------------------------------------
def _environment_pins(needed: Sequence[str]) -> List[str]:
    """``name==version`` for every distribution of this environment that ``needed`` does not name."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version

    skip = {canonicalize_name(Requirement(n).name) for n in needed}
    pins = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        try:
            Version(dist.version)
        except (InvalidVersion, TypeError):
            continue
        if name and canonicalize_name(name) not in skip:
            pins[canonicalize_name(name)] = f"{name}=={dist.version}"
    return sorted(pins.values())


def pip_index_options(env: Optional[Dict[str, str]] = None) -> List[str]:
    """pip's configured package index (files and ``PIP_*`` variables, as ``pip config list`` merges
    them) as installer options: ``--index-url``, ``--extra-index-url``, ``--find-links``, ``--no-index``."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                              timeout=CONFIG_TIMEOUT, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    values: Dict[str, Dict[str, str]] = {}
    for line in proc.stdout.splitlines():
        name, sep, raw = line.partition("=")
        section, _, option = name.rpartition(".")
        if not sep or option not in _PIP_INDEX_OPTIONS:
            continue
        try:
            value = str(ast.literal_eval(raw))
        except (ValueError, SyntaxError):
            value = raw.strip("'\"")
        values.setdefault(option, {})[section] = value
    options: List[str] = []
    for option in _PIP_INDEX_OPTIONS:
        by_section = values.get(option, {})
        value = next((by_section[s] for s in (":env:", "install", "global") if s in by_section), None)
        if value is None:
            continue
        if option == "no-index":
            options += ["--no-index"] if value.strip().lower() in ("1", "true", "yes", "on") else []
        else:
            for item in value.split():
                options += [f"--{option}", item]
    return options


def installer_command(choice: str) -> List[str]:
    """The installer to run: ``[uv, "pip"]`` or ``[python, "-m", "pip"]``."""
    if choice in ("auto", "uv"):
        for candidate in settings_mod.uv_candidates():
            if os.access(candidate, os.X_OK):
                return [candidate, "pip"]
        if choice == "uv":
            raise RequirementsInstallError(f"{settings_mod.ENV_INSTALLER}=uv, but uv is not on PATH nor in "
                                           "~/.cache/flowhub/uv-py310 (scripts/ensure_env.sh puts it there)")
    return [sys.executable, "-m", "pip"]


def install(needed: Sequence[str], site: str, label: str, index: Sequence[str] = ()) -> tuple:
    """Install ``needed`` as wheels into ``site``; returns ``(installer, ["name==version", ...])``.
    ``index``: pip's configured index as options (:func:`pip_index_options`), for uv; pip reads its own."""
    os.makedirs(site)
    constraints = os.path.join(os.path.dirname(site), "constraints.txt")
    with open(constraints, "w", encoding="utf-8") as f:
        f.write("\n".join(_environment_pins(needed)) + "\n")
    command = installer_command(settings_mod.installer_choice())
    uv = command[-1] == "pip" and len(command) == 2
    common = ["install", "--target", site, "--only-binary", ":all:", "-c", constraints]
    if uv:
        args = command + common + ["--python", sys.executable, "--no-config", "--compile-bytecode",
                                   "--link-mode", "copy"] + list(index) + list(needed)
    else:
        args = command + common + ["--disable-pip-version-check", "--no-input", "--no-warn-script-location"] \
            + list(needed)
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RequirementsInstallError(f"{label}: installing {', '.join(needed)} took longer than "
                                       f"{INSTALL_TIMEOUT:g} s; nothing was installed.") from None
    except OSError as exc:
        raise RequirementsInstallError(f"{label}: could not run the installer {args[0]}: {exc}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise RequirementsInstallError(
            f"{label}: its requirements {', '.join(needed)} could not be installed as wheels that agree with this "
            f"environment's packages ({'uv' if uv else 'pip'} exited with {proc.returncode}); nothing was installed. "
            "flowhub installs wheels only, so no code of a dependency runs at install time (a requirement that "
            "only has a source distribution must be installed into this environment by you), and keeps every "
            f"package this environment has at its version. The installer said:\n{tail}")
    return ("uv" if uv else "pip"), installed_distributions(site)


def installed_distributions(site: str) -> List[str]:
    """``name==version`` of every distribution in an overlay's ``site`` folder."""
    found = []
    for entry in sorted(os.listdir(site)) if os.path.isdir(site) else []:
        if entry.endswith(".dist-info"):
            name, _, version = entry[:-len(".dist-info")].partition("-")
            found.append(f"{name}=={version}")
    return found


def scan(hub_dir: str) -> List[dict]:
    """Every published overlay: ``{key, path, manifest}`` (a damaged one has an empty manifest)."""
    root = overlays_root(hub_dir)
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name)
        if not name.startswith(".") and os.path.isdir(path):
            found.append({"key": name, "path": path, "manifest": store.read_json(os.path.join(path, MANIFEST)) or {}})
    return found
