"""Privileges: ``no_new_privs`` and an empty capability set.

``PR_SET_NO_NEW_PRIVS`` makes ``execve`` unable to grant anything (setuid binaries, file
capabilities); Landlock and seccomp need it in an unprivileged process. Dropping every capability
(bounding set, ambient set, then effective/permitted/inheritable) matters when the worker runs as
root without a user namespace: root without ``CAP_DAC_OVERRIDE``, ``CAP_NET_RAW``, ``CAP_SYS_ADMIN``
and the rest can only do what its file permissions and the other mechanisms allow. The uid stays 0:
files owned by root remain readable by their owner bits, which is why Landlock restricts paths.

Capabilities are per thread: in a multi-threaded process only the calling thread loses them.
"""
from __future__ import annotations

import ctypes
import errno
from typing import List, Tuple

from flowhub.sandbox._common import libc, prctl, raise_errno
from flowhub.sandbox.policy import SandboxPolicy

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def available() -> Tuple[bool, str]:
    return True, "prctl and capset"


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def set_no_new_privs() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1, what="prctl(PR_SET_NO_NEW_PRIVS)")


def drop_capabilities() -> str:
    notes: List[str] = []
    kept_bounding = 0
    for cap in range(_last_cap() + 1):
        if libc().prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            if ctypes.get_errno() == errno.EPERM:  # no CAP_SETPCAP: harmless under no_new_privs
                kept_bounding += 1
            elif ctypes.get_errno() != errno.EINVAL:
                raise_errno(f"prctl(PR_CAPBSET_DROP, {cap})")
    if kept_bounding:
        notes.append("bounding set kept (no CAP_SETPCAP; no_new_privs makes it moot)")
    libc().prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)  # EINVAL on kernels < 4.3: fine
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc().capset(ctypes.byref(header), data) != 0:
        raise_errno("capset")
    return "; ".join(["capabilities dropped"] + notes)


def apply(policy: SandboxPolicy) -> str:
    set_no_new_privs()
    return "no_new_privs set; " + drop_capabilities()
