"""seccomp: a deny-list of dangerous system calls and socket families, through ctypes to libseccomp.

Applied last, because it also forbids what the other mechanisms use (``unshare``, ``setns``,
``mount``). Denied calls fail with ``EPERM`` (sockets with ``EAFNOSUPPORT``) instead of killing the
worker, so library code that probes for a feature sees "not available". Denied:

* kernel and machine administration: modules, kexec, reboot, swap, mounts, clocks, hostnames,
  ``acct``, ``quotactl``, ``syslog``, ``iopl``/``ioperm``;
* reaching into other processes: ``ptrace``, ``process_vm_readv``/``writev``, ``pidfd_getfd``,
  ``kcmp``, ``process_madvise``;
* kernel attack surface rarely needed by model code: ``bpf``, ``perf_event_open``,
  ``userfaultfd``, ``io_uring_*``, ``keyctl``/``add_key``/``request_key``, ``open_by_handle_at``;
* leaving the sandbox: ``setns``, ``unshare`` and ``clone`` with any ``CLONE_NEW*`` flag,
  ``clone3`` (returns ``ENOSYS`` so glibc falls back to ``clone``, whose flags can be checked),
  ``setsid``/``setpgid`` (the worker's process group is how the watchdog finds its processes);
* sockets other than ``AF_INET`` (``AF_INET6`` too when the network is allowed): no ``AF_UNIX``
  socket can be created, so no listener with a path (docker.sock, an ssh-agent, D-Bus: Landlock
  does not cover connecting to them) is reachable; the worker's channel to the caller is inherited,
  and ``socketpair`` (which reaches nothing) stays. No ``AF_PACKET``, ``AF_NETLINK``, ``AF_VSOCK``,
  ``AF_ALG``...; and when the network is denied, no UDP or raw ``AF_INET`` sockets, which closes the
  UDP/DNS gap Landlock leaves when no network namespace is available. TCP stays, for OneFlow's
  ``bind(127.0.0.1:0)``;
* other processes' resource limits: ``prlimit64`` on any pid but 0 (itself) fails with ``EPERM``;
* running programs: ``execve`` and ``execveat`` fail with ``EPERM`` (``subprocess`` raises
  ``PermissionError``), so no dropped binary, ``ld.so``-launched file or memfd runs. ``fork`` stays:
  a worker may use processes, which inherit every restriction and its process limits;
* with ``allow_subprocesses=False``: also ``fork``, ``vfork`` and ``clone`` without
  ``CLONE_THREAD`` (threads keep working).

Changes of file metadata (mode, owner, extended attributes) are not denied but *ignored*: they
return success and change nothing. Landlock does not cover them, so otherwise a worker could
``chmod`` files it may only read, or not even open (the caller's ``~/.ssh``, the hub cache); and
``shutil.copy``, which copies the mode, keeps working.

The filter is loaded with ``TSYNC``, so in a multi-threaded process every thread gets it.
"""
from __future__ import annotations

import ctypes
from typing import List, Optional, Tuple

from flowhub.sandbox._common import Unavailable
from flowhub.sandbox.policy import SandboxPolicy

EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
ACT_ALLOW = 0x7FFF0000
FLTATR_CTL_NNP, FLTATR_CTL_TSYNC = 3, 4
CMP_NE, CMP_EQ, CMP_GE, CMP_MASKED_EQ = 1, 4, 5, 7

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM, SOCK_TYPE_MASK, SOCK_MAX = 1, 0xF, 11
CLONE_THREAD = 0x00010000
CLONE_NEW_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
                   "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                   "CLONE_NEWNET": 0x40000000}

DENIED_SYSCALLS: Tuple[str, ...] = (
    # other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "process_madvise",
    # kernel attack surface
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "name_to_handle_at", "open_by_handle_at", "lookup_dcookie",
    "fanotify_init", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl", "vm86", "vm86old",
    # namespaces and mounts
    "setns", "unshare", "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # the machine
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm",
    "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64", "settimeofday", "stime",
    "sethostname", "setdomainname",
    # the process group the watchdog relies on
    "setsid", "setpgid",
    # System V shared memory: memory that neither RSS nor the worker's descriptors show
    "shmget",
)
#: Running a program: always denied once the filter is loaded (the worker is set up by then).
EXEC_SYSCALLS: Tuple[str, ...] = ("execve", "execveat")
SUBPROCESS_SYSCALLS: Tuple[str, ...] = ("fork", "vfork")
#: Metadata changes Landlock does not cover: they succeed without doing anything (see above).
IGNORED_SYSCALLS: Tuple[str, ...] = (
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "chown32", "fchown32",
    "lchown32", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lib: Optional[ctypes.CDLL] = None
_lib_error = ""


def _errno_action(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


def library() -> Optional[ctypes.CDLL]:
    """libseccomp (``libseccomp.so.2``), or None; loaded once."""
    global _lib, _lib_error
    if _lib is None and not _lib_error:
        for name in ("libseccomp.so.2", "libseccomp.so"):
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError as exc:
                _lib_error = str(exc)
        else:
            return None
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCmp)]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_load.argtypes = [ctypes.c_void_p]
        _lib, _lib_error = lib, ""
    return _lib


def _kernel_has_seccomp() -> bool:
    try:
        with open("/proc/self/status") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return True


def available() -> Tuple[bool, str]:
    if not _kernel_has_seccomp():
        return False, "the kernel has no seccomp filter support"
    if library() is None:
        return False, f"libseccomp.so.2 not found ({_lib_error}); install libseccomp2"
    return True, "seccomp filter through libseccomp"


class _Filter:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.ctx = lib.seccomp_init(ACT_ALLOW)
        if not self.ctx:
            raise OSError("seccomp_init failed")
        self.rules = 0

    def nr(self, name: str) -> int:
        return self.lib.seccomp_syscall_resolve_name(name.encode())

    def add(self, action: int, name: str, *conditions: Tuple[int, int, int, int]) -> None:
        nr = self.nr(name)
        if nr < 0:  # not a system call on this architecture (vm86 on x86_64, fork on aarch64)
            return
        args = (_ArgCmp * max(len(conditions), 1))(*[_ArgCmp(*c) for c in conditions])
        ret = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(conditions), args)
        if ret < 0:
            raise OSError(-ret, f"seccomp_rule_add({name}) failed")
        self.rules += 1

    def load(self) -> None:
        self.lib.seccomp_attr_set(self.ctx, FLTATR_CTL_NNP, 1)
        self.lib.seccomp_attr_set(self.ctx, FLTATR_CTL_TSYNC, 1)  # fails on very old libseccomp: this thread only
        ret = self.lib.seccomp_load(self.ctx)
        if ret < 0:
            raise OSError(-ret, "seccomp_load failed")

    def release(self) -> None:
        if self.ctx:
            self.lib.seccomp_release(self.ctx)
            self.ctx = None


def _denied_family_conditions(allowed: set, also_allowed: Tuple[int, ...] = (AF_UNIX,)) -> List[Tuple[int, int, int, int]]:
    """Conditions on argument 0 matching every address family outside ``allowed`` (libseccomp takes
    one comparison per argument and rule, so: single values, then ``>=`` for the open tail).
    ``also_allowed`` families get no condition here because a rule of their own covers them."""
    top = max(allowed) + 1
    conditions = [(0, CMP_EQ, family, 0) for family in range(top)
                  if family not in allowed and family not in also_allowed]
    return conditions + [(0, CMP_GE, top, 0)]


def _socket_rules(f: _Filter, policy: SandboxPolicy) -> List[str]:
    allowed = {AF_INET} | ({AF_INET6} if policy.allow_network else set())
    deny_family = _errno_action(EAFNOSUPPORT)
    for condition in _denied_family_conditions(allowed):
        f.add(deny_family, "socket", condition)
    f.add(_errno_action(EPERM), "socket", (0, CMP_EQ, AF_UNIX, 0))  # EPERM: "not allowed", not "no such family"
    for condition in _denied_family_conditions({AF_UNIX}):  # socketpair exists only for AF_UNIX
        f.add(deny_family, "socketpair", condition)
    notes = ["sockets limited to " + ("inet and inet6" if policy.allow_network else "inet")
             + " (no unix sockets but socketpair)"]
    if not policy.allow_network:
        for sock_type in range(SOCK_MAX):  # the type argument also carries NONBLOCK/CLOEXEC: mask it
            if sock_type != SOCK_STREAM:
                f.add(_errno_action(EPERM), "socket", (0, CMP_EQ, AF_INET, 0),
                      (1, CMP_MASKED_EQ, SOCK_TYPE_MASK, sock_type))
        notes.append("no UDP or raw inet sockets")
    return notes


def apply(policy: SandboxPolicy) -> str:
    lib = library()
    if lib is None:
        raise Unavailable(available()[1])
    f = _Filter(lib)
    try:
        deny = _errno_action(EPERM)
        for name in DENIED_SYSCALLS:
            f.add(deny, name)
        for flag in CLONE_NEW_FLAGS.values():
            f.add(deny, "clone", (0, CMP_MASKED_EQ, flag, flag))
        f.add(_errno_action(ENOSYS), "clone3")
        for name in IGNORED_SYSCALLS:
            f.add(_errno_action(0), name)  # "succeeds" without running
        f.add(deny, "prlimit64", (0, CMP_NE, 0, 0))  # pid 0 is itself: setrlimit/getrlimit keep working
        for name in EXEC_SYSCALLS:
            f.add(deny, name)
        notes = _socket_rules(f, policy) + ["file mode, owner and xattr changes ignored",
                                            "prlimit on other processes denied", "no exec"]
        if not policy.allow_subprocesses:
            for name in SUBPROCESS_SYSCALLS:
                f.add(deny, name)
            f.add(deny, "clone", (0, CMP_MASKED_EQ, CLONE_THREAD, 0))
            notes.append("no new processes")
        f.load()
        return f"{f.rules} rules: dangerous calls and new namespaces denied; " + "; ".join(notes)
    finally:
        f.release()
