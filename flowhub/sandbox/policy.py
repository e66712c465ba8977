"""What a sandboxed worker may do: one frozen policy that every mechanism reads.

The policy names only what is specific to one worker (its repository, the cache it may read, its
scratch folder, its limits). The paths every Python process needs (the interpreter, site-packages,
system libraries, a short list of ``/etc`` and ``/dev`` entries) are added by :func:`system_paths`
when the policy is applied, so they match the process that is being locked down.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import site
import sys
from typing import Dict, Iterable, List, Optional, Tuple

from flowhub.sandbox.report import MECHANISMS

#: Variables a worker keeps (patterns whose only wildcard is ``*``); everything else is removed.
DEFAULT_ENV_ALLOW: Tuple[str, ...] = (
    "PATH", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "LD_LIBRARY_PATH", "OMP_*", "MKL_*", "OPENBLAS_*",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "PYTHON*",
)
#: Removed even when an allow pattern matches: startup hooks and anything named like a credential.
DEFAULT_ENV_DENY: Tuple[str, ...] = (
    "PYTHONSTARTUP", "PYTHONBREAKPOINT", "PYTHONUSERBASE", "*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*",
    "*CREDENTIAL*", "*_KEY", "*_KEY_*", "*APIKEY*", "*AUTH*", "*COOKIE*", "*SESSION*",
)

#: Directories with programs and libraries: read and execute.
SYSTEM_EXEC_DIRS: Tuple[str, ...] = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
#: Kernel views: read only (other processes' ``environ``/``mem`` stay closed: they need ptrace
#: access, which Landlock, the user namespace and the dropped capabilities each deny).
SYSTEM_READ_DIRS: Tuple[str, ...] = ("/proc", "/sys")
#: ``/etc`` is an allow-list, not the whole folder: root can read ``/etc/shadow`` and the SSH host keys.
ETC_ENTRIES: Tuple[str, ...] = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ld.so.preload", "localtime", "timezone", "zoneinfo",
    "hosts", "host.conf", "resolv.conf", "nsswitch.conf", "gai.conf", "services", "protocols", "passwd",
    "group", "mime.types", "os-release", "lsb-release", "debian_version", "alternatives", "ssl",
    "ca-certificates", "ca-certificates.conf", "fonts", "matplotlibrc", "locale.alias", "locale.conf",
    "machine-id", "OpenCL",
)
#: ``/dev`` is an allow-list too: as root, ``/dev/vda`` would be readable by owner permissions alone.
DEV_READ_WRITE: Tuple[str, ...] = ("/dev/null", "/dev/zero", "/dev/full")
DEV_READ: Tuple[str, ...] = ("/dev/random", "/dev/urandom")
#: GPU device nodes (read, write and ioctl) for spawned GPU workers; absent on CPU machines.
DEV_GPU_GLOBS: Tuple[str, ...] = ("/dev/nvidia*", "/dev/nvidia-caps", "/dev/dri")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SandboxPolicy:
    """Everything one sandboxed worker may do.

    Paths are read-only (``read_paths``) or read-write (``write_paths`` and ``scratch``); the
    interpreter, site-packages and system paths are added automatically unless ``default_paths`` is
    False. ``HOME`` and ``TMPDIR`` point at ``scratch``. Sizes are bytes, ``None`` means no limit.
    ``/dev/shm`` is not writable unless listed in ``write_paths`` (so ``multiprocessing`` locks and
    queues fail), and subprocesses are allowed unless ``allow_subprocesses`` is False: they inherit
    every restriction.
    """

    scratch: str
    read_paths: Tuple[str, ...] = ()
    write_paths: Tuple[str, ...] = ()
    allow_network: bool = False
    #: RLIMIT_CPU, counted over the worker's whole life (a per-call limit is the caller's timeout).
    cpu_seconds: Optional[int] = None
    max_open_files: int = 256
    max_processes: Optional[int] = 64
    max_file_size: Optional[int] = 4 << 30
    #: RLIMIT_DATA: heap and private writable mappings (numpy/oneflow buffers), not mapped libraries,
    #: so unlike RLIMIT_AS it does not break ``import oneflow`` (VmData is ~0.55 GiB after it).
    max_memory: Optional[int] = 4 << 30
    #: The scratch folder's quota (bytes and files): a tmpfs of that size in the worker's mount namespace.
    max_scratch: Optional[int] = 1 << 30
    max_scratch_files: Optional[int] = 100_000
    allow_subprocesses: bool = True
    env_allow: Tuple[str, ...] = DEFAULT_ENV_ALLOW
    env_deny: Tuple[str, ...] = DEFAULT_ENV_DENY
    env_set: Tuple[Tuple[str, str], ...] = ()
    default_paths: bool = True
    #: Mechanisms not to apply (names from ``flowhub.sandbox.MECHANISMS``), e.g. ``("namespaces",)``
    #: to use Landlock + seccomp for the network where a namespace gets in the way.
    skip_mechanisms: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.scratch or not os.path.isabs(self.scratch):
            raise ValueError(f"SandboxPolicy.scratch must be an absolute path, not {self.scratch!r}")
        for name in ("read_paths", "write_paths", "env_allow", "env_deny", "skip_mechanisms"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"SandboxPolicy.{name} must be a tuple of strings, not a string")
            object.__setattr__(self, name, tuple(str(v) for v in value))
        object.__setattr__(self, "env_set", tuple((str(k), str(v)) for k, v in self.env_set))
        unknown = set(self.skip_mechanisms) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"SandboxPolicy.skip_mechanisms: unknown {sorted(unknown)}; known: {', '.join(MECHANISMS)}")
        for name in ("cpu_seconds", "max_processes", "max_file_size", "max_memory", "max_scratch", "max_scratch_files"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                raise ValueError(f"SandboxPolicy.{name} must be positive or None, not {value!r}")
        if int(self.max_open_files) <= 0:
            raise ValueError("SandboxPolicy.max_open_files must be positive")

    @classmethod
    def for_worker(cls, repo_dir: str, scratch: str, hub_dir: Optional[str] = None, **options) -> "SandboxPolicy":
        """The usual worker policy: the repository and the hub cache read-only, ``scratch`` writable."""
        reads = [repo_dir] + ([hub_dir] if hub_dir else []) + list(options.pop("read_paths", ()))
        return cls(scratch=scratch, read_paths=tuple(reads), **options)

    def keeps_variable(self, name: str) -> bool:
        """True if the environment variable ``name`` survives the scrub (allow patterns are
        case-sensitive, deny patterns are not)."""
        if not any(_wildcard_match(name, pattern) for pattern in self.env_allow):
            return False
        upper = name.upper()
        return not any(_wildcard_match(upper, pattern.upper()) for pattern in self.env_deny)

    def environ(self, source: Dict[str, str]) -> Dict[str, str]:
        """The scrubbed environment made from ``source``: allowed variables, then HOME/TMPDIR, then ``env_set``."""
        env = {k: v for k, v in source.items() if self.keeps_variable(k)}
        for name in ("HOME", "TMPDIR", "TMP", "TEMP"):
            env[name] = self.scratch
        env.update(dict(self.env_set))
        return env


def _wildcard_match(name: str, pattern: str) -> bool:
    """``fnmatchcase`` for patterns whose only wildcard is ``*``, without compiling a regex (a
    forked worker would pay for every compile)."""
    parts = pattern.split("*")
    if len(parts) == 1:
        return name == pattern
    if not name.startswith(parts[0]) or not name.endswith(parts[-1]) or len(name) < len(parts[0]) + len(parts[-1]):
        return False
    pos, end = len(parts[0]), len(name) - len(parts[-1])
    for middle in parts[1:-1]:
        found = name.find(middle, pos, end)
        if found < 0:
            return False
        pos = found + len(middle)
    return True


@dataclasses.dataclass(frozen=True)
class PathRule:
    """One Landlock-style grant: ``path`` with ``access`` in {"read", "exec", "write", "device"}."""

    path: str
    access: str


def _module_roots() -> List[str]:
    """Folders (or single files) of every top-level module loaded now: editable installs, the repo's
    own imports made by the zygote, ``sys.path`` additions of flowhub itself."""
    roots: List[str] = []
    for name, module in list(sys.modules.items()):
        if "." in name or module is None:
            continue
        path = getattr(module, "__file__", None)
        if path:
            path = os.path.abspath(path)
            base = os.path.basename(path)
            roots.append(os.path.dirname(path) if base.startswith("__init__.") else path)
        else:
            roots.extend(os.path.abspath(p) for p in getattr(module, "__path__", None) or () if isinstance(p, str))
    return roots


_cache: Tuple[int, List[PathRule]] = (-1, [])


def system_paths() -> List[PathRule]:
    """The grants every Python worker needs: interpreter, stdlib, site-packages, loaded packages,
    system libraries and a short list of ``/etc`` and ``/dev`` entries.

    Cached while ``sys.modules`` keeps its size: a zygote that calls this once (see
    :func:`flowhub.sandbox.prepare`) spares each forked worker the scan, which costs several ms of
    copy-on-write faults there.
    """
    global _cache
    if _cache[0] != len(sys.modules):
        _cache = (len(sys.modules), _system_paths())
    return list(_cache[1])


def _system_paths() -> List[PathRule]:
    rules = [PathRule(p, "exec") for p in SYSTEM_EXEC_DIRS]
    rules += [PathRule(p, "read") for p in SYSTEM_READ_DIRS]
    rules += [PathRule(os.path.join("/etc", e), "read") for e in ETC_ENTRIES]
    rules += [PathRule(p, "write") for p in DEV_READ_WRITE]
    rules += [PathRule(p, "read") for p in DEV_READ]
    rules += [PathRule(p, "device") for pattern in DEV_GPU_GLOBS for p in sorted(glob.glob(pattern))]
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    rules += [PathRule(p, "exec") for p in sorted(prefixes) if p and p != "/"]
    sites: Iterable[str] = []
    try:
        sites = list(site.getsitepackages())
        if site.ENABLE_USER_SITE:
            sites.append(site.getusersitepackages())
    except Exception:  # a patched or embedded site module
        pass
    rules += [PathRule(p, "read") for p in sites]
    rules += [PathRule(p, "read") for p in _module_roots()]
    return collapse(rules)


_IMPLIES = {"read": {"read"}, "exec": {"read", "exec"}, "write": {"read", "write"},
            "device": {"read", "write", "device"}}


def collapse(rules: List[PathRule]) -> List[PathRule]:
    """Resolve every path (dropping missing ones) and drop grants already implied by a grant on a
    parent folder: Landlock rules apply to the whole tree below them, so ~200 module folders inside
    site-packages become a few rules."""
    resolved: Dict[str, set] = {}
    for rule in rules:
        try:
            real = os.path.realpath(rule.path)
        except (OSError, ValueError):
            continue
        if os.path.exists(real):
            resolved.setdefault(real, set()).update(_IMPLIES[rule.access])
    kept: List[Tuple[str, set]] = []
    out: List[PathRule] = []
    for path in sorted(resolved):
        rights = resolved[path]
        covered = set()
        for parent, parent_rights in kept:
            if path.startswith(parent.rstrip("/") + "/"):
                covered |= parent_rights
        if rights <= covered:
            continue
        kept.append((path, rights))
        # the fewest names whose grants add up to ``rights``: those no other name implies
        out.extend(PathRule(path, a) for a in sorted(rights) if not any(a != b and a in _IMPLIES[b] for b in rights))
    return out


def worker_paths(policy: SandboxPolicy) -> List[PathRule]:
    """Every grant of ``policy``: system paths (if ``default_paths``), its read paths, its write paths
    and the scratch folder; overlapping grants are kept, Landlock takes their union."""
    rules = system_paths() if policy.default_paths else []
    rules += [PathRule(p, "read") for p in policy.read_paths]
    rules += [PathRule(p, "write") for p in policy.write_paths + (policy.scratch,)]
    return rules
