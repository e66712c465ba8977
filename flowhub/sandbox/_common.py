"""Small helpers every mechanism shares: the libc handle, errno-checked calls, the thread count."""
from __future__ import annotations

import ctypes
import os
from typing import Optional

_libc: Optional[ctypes.CDLL] = None


class Unavailable(Exception):
    """A mechanism this kernel or machine does not offer (recorded, never raised out of ``apply``)."""


class Skipped(Exception):
    """A mechanism the policy does not ask for (recorded as ``skipped: <why>``)."""


def libc() -> ctypes.CDLL:
    """The C library of this process (loaded once; ``use_errno`` so failures carry their errno)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.prctl.restype = ctypes.c_int
        lib.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        _libc = lib
    return _libc


def raise_errno(what: str) -> None:
    """Raise ``OSError`` for the errno the last libc call left."""
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0, what: str = "prctl") -> int:
    ret = libc().prctl(option, arg2, arg3, arg4, arg5)
    if ret < 0:
        raise_errno(what)
    return ret


def thread_count() -> int:
    """Threads of this process as the kernel sees them (native threads included)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def errno_name(exc: BaseException) -> str:
    """``EACCES`` for a ``PermissionError``, the class name for anything without an errno."""
    import errno

    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, type(exc).__name__) if code else type(exc).__name__


def syscall(number: int, *args) -> int:
    """``syscall(2)`` with every integer widened to ``long`` (variadic ints are 32-bit in ctypes)."""
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return int(libc().syscall(ctypes.c_long(number), *wide))
