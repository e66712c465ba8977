"""Namespaces: no network, no other processes, a read-only filesystem but for a size-capped scratch.

``unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID)`` and then one ``fork``:

* **network**: a network namespace of its own with only a loopback interface that is down: every
  connection (TCP, UDP, DNS, to the host's 127.0.0.1 as much as to the internet) fails with
  ``ENETUNREACH``, while OneFlow's own ``bind(127.0.0.1:0)`` still works (skipped when the policy
  allows the network);
* **processes**: the forked child, which goes on as the worker, is PID 1 of a PID namespace of its
  own, with its own ``/proc``: it can name no process outside (no ``kill``, ``prlimit``,
  ``/proc/<caller>/...``), orphans of its subprocesses re-parent to it, and when it dies the kernel
  kills everything in the namespace. The parent stays outside as a *shim*: it closes every
  descriptor, waits for the worker and ends the way the worker ended (same exit code or signal), so
  the zygote's pid and status bookkeeping stay as they were; killing the shim kills the worker
  (``PR_SET_PDEATHSIG``) and with it the namespace. As PID 1, the worker ignores signals it sends
  itself for which it has no handler, and ``SIGXCPU``: the CPU limit's hard ``SIGKILL`` ends it, which
  the shim reports as ``SIGXCPU``;
* **files**: a mount namespace in which every mount is read-only (also for root, also for file times
  and metadata that Landlock does not cover), except the scratch folder, which becomes a tmpfs of
  ``policy.max_scratch`` bytes and ``policy.max_scratch_files`` inodes (the kernel enforces the
  quota; it vanishes with the worker), and the policy's write paths;
* **privileges**: the new user namespace takes every capability in the host's namespaces away (root
  included); the worker's uid and gid are mapped to themselves, so ``getuid()`` does not change.

Needs a single-threaded process (the kernel refuses ``CLONE_NEWUSER`` otherwise) and a kernel that
allows user namespaces (``user.max_user_namespaces`` > 0; Ubuntu 23.10+ AppArmor may refuse them).
Where the PID or mount namespace cannot be had, the user and network namespaces are still applied
and the report says what is missing.
"""
from __future__ import annotations

import ctypes
import os
import resource
import select
import signal
from typing import List, Tuple

from flowhub.sandbox._common import libc, raise_errno
from flowhub.sandbox.policy import SandboxPolicy

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 1
PR_SET_PDEATHSIG = 1


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def available() -> Tuple[bool, str]:
    for ns in ("user", "net", "mnt", "pid"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            return False, f"the kernel has no {ns} namespaces"
    if _read("/proc/sys/user/max_user_namespaces") == "0":
        return False, "user.max_user_namespaces is 0"
    if _read("/proc/sys/kernel/unprivileged_userns_clone") == "0" and os.geteuid() != 0:
        return False, "kernel.unprivileged_userns_clone is 0"
    if _read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == "1" and os.geteuid() != 0:
        return False, "AppArmor restricts unprivileged user namespaces"
    return True, "user, network, mount and PID namespaces"


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _mount(source: object, target: str, fstype: object, flags: int, data: object = None) -> None:
    enc = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
    if libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise_errno(f"mount {target}")


def _set_readonly(path: str, readonly: bool, recursive: bool) -> None:
    attr = _MountAttr(MOUNT_ATTR_RDONLY if readonly else 0, 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    if libc().syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), AT_RECURSIVE if recursive else 0,
                      ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        raise_errno(f"mount_setattr {path}")


def apply(policy: SandboxPolicy) -> str:
    uid, gid = os.geteuid(), os.getegid()
    net = 0 if policy.allow_network else CLONE_NEWNET
    notes: List[str] = []
    if libc().unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | net) != 0:
        if not net:
            raise_errno("unshare(CLONE_NEWUSER|CLONE_NEWNS|CLONE_NEWPID)")
        if libc().unshare(CLONE_NEWUSER | net) != 0:  # an older or stricter kernel: the network at least
            raise_errno("unshare(CLONE_NEWUSER|CLONE_NEWNET)")
        notes.append("no PID or mount namespace on this kernel: other processes stay visible, files writable "
                     "as far as landlock allows")
        _map_ids(uid, gid)
        return _summary(net, notes, pid=False)
    _map_ids(uid, gid)
    _enter_pid_namespace()
    notes += _lock_mounts(policy)
    return _summary(net, notes, pid=True)


def _summary(net: int, notes: List[str], pid: bool) -> str:
    parts = ["new user namespace (no host capabilities)"]
    if net:
        parts.append("network namespace (only a downed loopback)")
    if pid:
        parts.append("PID namespace (the worker is its PID 1)")
    return "; ".join(parts + notes)


def _map_ids(uid: int, gid: int) -> None:
    # Without a mapping the worker could not create files (EOVERFLOW). Mapping its own ids needs no
    # privilege, once setgroups is denied.
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


def _enter_pid_namespace() -> None:
    """Fork: the child returns as PID 1 of the new PID namespace; this process becomes the shim."""
    alive_r, alive_w = os.pipe()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the shim must be able to wait for its child
    pid = os.fork()
    if pid:
        os.close(alive_r)
        _shim(pid, alive_w)  # never returns
    os.close(alive_w)
    if libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise_errno("prctl(PR_SET_PDEATHSIG)")
    poller = select.poll()
    poller.register(alive_r, select.POLLIN | select.POLLHUP)
    if poller.poll(0):  # the shim died before PDEATHSIG was armed
        os._exit(1)
    os.close(alive_r)


def _shim(child: int, keep: int) -> None:
    """Outside the PID namespace: hold nothing, wait for ``child``, then end exactly as it did."""
    code = 70
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.closerange(0, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))  # the worker's socket: EOF reaches the caller
        try:
            _, status, usage = os.wait4(child, 0)
        except ChildProcessError:
            os._exit(code)
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            cpu_limit = resource.getrlimit(resource.RLIMIT_CPU)[0]
            if sig == signal.SIGKILL and cpu_limit != resource.RLIM_INFINITY and \
                    usage.ru_utime + usage.ru_stime >= cpu_limit:
                sig = signal.SIGXCPU  # PID 1 ignores SIGXCPU, so the hard limit's SIGKILL ended it: say why
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
            code = 128 + sig
        else:
            code = os.WEXITSTATUS(status)
    finally:
        os._exit(code)


def _lock_mounts(policy: SandboxPolicy) -> List[str]:
    """In the new mount namespace: own /proc, a tmpfs scratch with a quota, everything else read-only."""
    notes: List[str] = []
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        notes.append("own /proc")
    except OSError as exc:
        notes.append(f"host /proc kept ({exc.strerror})")
    cwd = os.getcwd()
    size = f"size={policy.max_scratch}," if policy.max_scratch else ""
    files = f"nr_inodes={policy.max_scratch_files}," if policy.max_scratch_files else ""
    try:
        _mount("tmpfs", policy.scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"{size}{files}mode=0700")
        notes.append("scratch is a tmpfs" + (f" of {policy.max_scratch >> 20} MiB" if policy.max_scratch else ""))
    except OSError as exc:
        notes.append(f"scratch not size-capped ({exc.strerror})")
    writable = [p for p in policy.write_paths if os.path.isdir(p)]
    for path in writable:
        _mount(path, path, None, MS_BIND | MS_REC)
    try:
        _set_readonly("/", True, recursive=True)
        for path in [policy.scratch] + writable:
            _set_readonly(path, False, recursive=False)
        notes.append("every other mount read-only")
    except OSError as exc:
        notes.append(f"mounts left writable ({exc.strerror}): landlock alone guards writes")
    if os.path.realpath(cwd) == os.path.realpath(policy.scratch):
        os.chdir(policy.scratch)  # the old working folder is the covered directory, not the tmpfs
    return notes
