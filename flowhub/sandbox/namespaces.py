"""Network isolation through a new user + network namespace.

``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` moves the worker into a network namespace of its own with
only a loopback interface that is down: every connection (TCP, UDP, DNS, to the host's 127.0.0.1 as
much as to the internet) fails with ``ENETUNREACH``, while OneFlow's own ``bind(127.0.0.1:0)`` still
works. The new user namespace is what lets an unprivileged process do this, and it also takes every
capability in the host's namespace away (root included). The worker's uid and gid are mapped to
themselves, so files it creates in scratch belong to the caller and ``getuid()`` does not change.

Needs a single-threaded process (the kernel refuses ``CLONE_NEWUSER`` otherwise) and a kernel that
allows user namespaces (``user.max_user_namespaces`` > 0; Ubuntu 23.10+ AppArmor may refuse them).
"""
from __future__ import annotations

import os
from typing import Tuple

from flowhub.sandbox._common import Skipped, libc, raise_errno
from flowhub.sandbox.policy import SandboxPolicy

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def available() -> Tuple[bool, str]:
    for ns in ("user", "net"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return False, f"the kernel has no {ns} namespaces"
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return False, "user.max_user_namespaces is 0"
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0" and os.geteuid() != 0:
        return False, "kernel.unprivileged_userns_clone is 0"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1" and os.geteuid() != 0:
        return False, "AppArmor restricts unprivileged user namespaces"
    return True, "user and network namespaces"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def apply(policy: SandboxPolicy) -> str:
    if policy.allow_network:
        raise Skipped("the policy allows the network")
    uid, gid = os.geteuid(), os.getegid()
    if libc().unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        raise_errno("unshare(CLONE_NEWUSER|CLONE_NEWNET)")
    # Without a mapping the worker could not create files (EOVERFLOW). Mapping its own ids needs no
    # privilege, once setgroups is denied.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    return f"new user and network namespace (only a downed loopback), uid {uid} and gid {gid} mapped to themselves"
