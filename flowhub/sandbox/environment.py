"""Environment scrubbing: the worker keeps an allow-list of variables, HOME and TMPDIR move to scratch.

A forked worker inherits its variables in two places, and both are cleaned in-process:

* ``os.environ`` (its storage is ``posix.environ``, the snapshot Python took at startup) and libc's
  ``environ``: cleared and refilled with the allowed variables;
* the strings the kernel copied onto the stack at ``execve`` time, which ``/proc/<pid>/environ``
  shows for the whole life of the process: overwritten with zeros (after the refill, so libc no
  longer points into them).

Values of removed variables may still sit in freed heap memory of the worker (Python strings that
held them); only a zygote spawned with an already-scrubbed environment avoids that, see
:func:`scrubbed_environ`. Other processes' ``/proc/<pid>/environ`` (the caller's, the zygote's) are
not this module's: the kernel's ptrace access check guards them, and Landlock's scoping, the user
namespace and (for a root caller) the dropped capabilities each make that check fail. A caller could
add ``prctl(PR_SET_DUMPABLE, 0)`` on its side as well.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Dict, Mapping, Optional, Tuple

from flowhub.sandbox.policy import SandboxPolicy


def available() -> Tuple[bool, str]:
    return True, "always"


def scrubbed_environ(policy: SandboxPolicy, source: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment a sandboxed process should start with: for spawning a zygote or worker, or for
    the ``env`` a worker spec carries."""
    return policy.environ(dict(os.environ if source is None else source))


def _stack_environ_region() -> Optional[Tuple[int, int]]:
    """``(env_start, env_end)`` from ``/proc/self/stat`` (fields 50 and 51), or None."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # fields 3.. (comm may hold spaces and parens)
    if len(fields) < 49:
        return None
    start, end = int(fields[47]), int(fields[48])
    return (start, end) if 0 < start < end else None


def clear_proc_environ() -> int:
    """Zero the stack copy of the start-up environment; returns how many bytes were cleared.

    Only safe once libc's ``environ`` no longer points into it, i.e. after every variable was set
    again through ``setenv`` (which copies), as :func:`apply` does.
    """
    region = _stack_environ_region()
    if region is None:
        return 0
    start, end = region
    ctypes.memset(start, 0, end - start)
    return end - start


def apply(policy: SandboxPolicy) -> str:
    before = len(os.environ)
    env = scrubbed_environ(policy)
    # os.environ's storage *is* posix.environ (the start-up snapshot), so this cleans both.
    os.environ.clear()  # unsetenv for every name: libc's environ array drops its stack pointers
    os.environ.update(env)  # setenv copies each string to the heap
    cleared = clear_proc_environ()
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        tempfile.tempdir = None  # recomputed from the new TMPDIR on next use
    made = ""
    if not os.path.isdir(policy.scratch):
        try:
            os.makedirs(policy.scratch, mode=0o700, exist_ok=True)
        except OSError as exc:  # the scrub above stands; the worker will see a missing HOME
            made = f"; the scratch folder could not be created ({exc.strerror})"
    return (f"kept {len(env)} of {before} variables, HOME and TMPDIR set to the scratch folder, "
            f"/proc/self/environ {'cleared' if cleared else 'not found'}{made}")
