"""Landlock: the filesystem view, TCP connect/bind, signals and abstract sockets (raw syscalls 444-446).

The worker may read (and execute from) the interpreter, site-packages, loaded packages and system
folders; read its repository and the hub cache; write only its scratch folder and the policy's
write paths (see :mod:`flowhub.sandbox.policy`). Beyond files:

* network, when the policy denies it: TCP ``connect`` is refused everywhere and TCP ``bind`` is
  allowed only on port 0, which OneFlow's startup needs (ABI >= 4). Landlock does not cover UDP:
  seccomp closes that (see :mod:`flowhub.sandbox.seccomp`), or the network namespace does;
* ptrace-style access to processes outside the sandbox is refused by every Landlock ABI, which
  closes ``/proc/<caller>/environ`` and ``/proc/<caller>/mem`` even for the same uid (the user
  namespace and dropped capabilities close them too, see :mod:`flowhub.sandbox.report`);
* signals to processes outside the sandbox and abstract unix sockets created outside it (ABI >= 6).

Landlock restricts the calling thread only (and the threads and processes it creates later), so the
process must be single-threaded when this runs. Each right is requested only if the running ABI
knows it (the "best effort" rule of the kernel documentation).
"""
from __future__ import annotations

import ctypes
import os
import stat
from typing import Dict, List, Tuple

from flowhub.sandbox._common import Unavailable, raise_errno, syscall
from flowhub.sandbox.policy import SandboxPolicy, worker_paths

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK = 1 << 8, 1 << 9, 1 << 10, 1 << 11
MAKE_SYM, REFER, TRUNCATE, IOCTL_DEV = 1 << 12, 1 << 13, 1 << 14, 1 << 15
BIND_TCP, CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

#: File-system rights each ABI knows (the kernel rejects unknown bits).
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
#: Rights that make sense on a file (as opposed to a directory).
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

_READ = READ_FILE | READ_DIR
_ACCESS: Dict[str, int] = {
    "read": _READ,
    "exec": _READ | EXECUTE,
    "device": _READ | WRITE_FILE | IOCTL_DEV,
    # everything but execute and device nodes: a dropped binary cannot be executed
    "write": _READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK | MAKE_FIFO
    | MAKE_SYM | REFER | TRUNCATE,
}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def abi_version() -> int:
    """The kernel's Landlock ABI (0 when absent or disabled)."""
    return max(syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION), 0)


def available() -> Tuple[bool, str]:
    abi = abi_version()
    if abi <= 0:
        err = ctypes.get_errno()
        why = "disabled at boot (lsm= lacks landlock)" if err == 95 else "not supported by this kernel"
        return False, f"Landlock {why} ({os.strerror(err)})"
    return True, f"Landlock ABI {abi}"


def _handled_fs(abi: int) -> int:
    return _FS_BY_ABI.get(abi, _FS_BY_ABI[5])


def _add_path(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FILE_RIGHTS
        attr = _PathBeneathAttr(access, fd)
        if syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(attr), 0) != 0:
            raise_errno(f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def apply(policy: SandboxPolicy) -> str:
    abi = abi_version()
    if abi <= 0:
        raise Unavailable(available()[1])
    if not os.path.isdir(policy.scratch):  # a rule needs the folder to exist
        try:
            os.makedirs(policy.scratch, mode=0o700, exist_ok=True)
        except OSError:
            pass  # recorded below as a path that could not be granted
    handled_fs = _handled_fs(abi)
    handled_net = (BIND_TCP | CONNECT_TCP) if abi >= 4 and not policy.allow_network else 0
    scoped = (SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(handled_fs, handled_net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = syscall(SYS_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise_errno("landlock_create_ruleset")
    skipped: List[str] = []
    granted = 0
    named = set(policy.read_paths + policy.write_paths + (policy.scratch,))
    try:
        seen = set()
        for rule in worker_paths(policy):
            key = (rule.path, rule.access)
            if key in seen:
                continue
            seen.add(key)
            try:
                _add_path(ruleset, rule.path, _ACCESS[rule.access] & handled_fs)
                granted += 1
            except FileNotFoundError:
                if rule.path in named:
                    skipped.append(f"{rule.path} (missing)")
                continue  # /lib32 on a machine without it, a glob that vanished
            except OSError as exc:
                skipped.append(f"{rule.path} ({exc.strerror})")
        if handled_net:
            port0 = _NetPortAttr(BIND_TCP, 0)
            if syscall(SYS_ADD_RULE, ruleset, RULE_NET_PORT, ctypes.byref(port0), 0) != 0:
                raise_errno("landlock_add_rule(bind port 0)")
        if syscall(SYS_RESTRICT_SELF, ruleset, 0) != 0:
            raise_errno("landlock_restrict_self")
    finally:
        os.close(ruleset)
    parts = [f"ABI {abi}: {granted} path rules"]
    parts.append("TCP connect denied, bind only on port 0" if handled_net else
                 "network not restricted (policy allows it)" if policy.allow_network else
                 "no TCP rules (ABI < 4)")
    if scoped:
        parts.append("signals and abstract sockets scoped")
    if skipped:
        parts.append("not granted: " + ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return "; ".join(parts)
