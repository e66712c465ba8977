"""Lock a worker process down before it imports untrusted repository code.

One policy (:class:`SandboxPolicy`), several mechanisms, each in its own module with
``available() -> (bool, reason)`` and ``apply(policy) -> str``, run by :func:`apply` in this order:

=============== ===========================================================================
environment     allow-listed variables only; HOME/TMPDIR = scratch; /proc/self/environ zeroed
limits          rlimits (core, cpu, nofile, nproc, fsize, data) and an own process group
namespaces      new user, network, mount, IPC and PID namespace: no network, no other processes,
                every mount read-only but a size-capped tmpfs scratch, no host capabilities
privileges      no_new_privs, every capability dropped
landlock        filesystem allow-list, TCP connect denied / bind port 0 only, ptrace and
                signal scoping (closes /proc/<caller>/environ)
seccomp         deny-list of dangerous system calls and socket families (last: it forbids
                what the others use)
=============== ===========================================================================

A missing mechanism never raises: it is recorded in the :class:`SandboxReport`, whose
:meth:`~SandboxReport.strength` tells the caller whether to go on. Memory and process counts that
the kernel cannot enforce from inside are bounded from outside by :class:`limits.Watchdog`.

What the worker's caller has to do on its side, because no in-process step can:

* give sandboxed workers no secrets to begin with: spawn the zygote with
  ``environment.scrubbed_environ(policy)`` and send sandboxed workers neither the caller's ``env``
  nor a GitHub token in their settings (code in the worker can read its own heap);
* create the scratch folder per worker and remove it after the worker is reaped;
* watch each worker with ``Watchdog(max_rss=..., max_processes=...)`` (the only process cap for
  root, the only cap across a worker's subprocesses), and end it with :func:`kill_tree`, which
  reaches the subprocesses that share its process group.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

from flowhub.sandbox import environment, landlock, limits, namespaces, privileges, seccomp
from flowhub.sandbox._common import Skipped, Unavailable, errno_name, thread_count
from flowhub.sandbox.limits import Watchdog, kill_tree
from flowhub.sandbox.policy import DEFAULT_ENV_ALLOW, DEFAULT_ENV_DENY, SandboxPolicy
from flowhub.sandbox.report import MECHANISMS, SandboxReport, assess, format_report
from flowhub.errors import SandboxError  # noqa: F401  (re-exported: defined in errors.py)


_MODULES = {"environment": environment, "limits": limits, "namespaces": namespaces,
            "privileges": privileges, "landlock": landlock, "seccomp": seccomp}
#: Mechanisms that act on the calling thread only, or that the kernel refuses with several threads.
SINGLE_THREADED = ("namespaces", "landlock")


def apply(policy: SandboxPolicy, *, allow_threads: bool = False) -> SandboxReport:
    """Lock the current process down according to ``policy``; irreversible.

    The process must be single-threaded (a fork of the zygote, or a spawned worker before it imports
    oneflow), or :class:`SandboxError` is raised before anything changes. With
    ``allow_threads=True`` a multi-threaded process gets what still works (environment, limits,
    privileges of this thread, seccomp on every thread) and the rest is recorded as unavailable.
    """
    start = time.perf_counter()
    threads = thread_count()
    if threads > 1 and not allow_threads:
        raise SandboxError(f"sandbox.apply() needs a single-threaded process, this one has {threads} threads "
                           f"(apply it right after fork, or before importing oneflow)")
    abi = landlock.abi_version()
    uid = os.getuid()
    mechanisms: Dict[str, str] = {}
    details: Dict[str, str] = {}
    for name in MECHANISMS:
        module = _MODULES[name]
        if name in policy.skip_mechanisms:
            mechanisms[name] = "skipped: excluded by the policy"
            continue
        if threads > 1 and name in SINGLE_THREADED:
            mechanisms[name] = f"unavailable: the process has {threads} threads (needs a single thread)"
            continue
        ok, why = module.available()
        if not ok:
            mechanisms[name] = f"unavailable: {why}"
            continue
        try:
            details[name] = module.apply(policy)
            mechanisms[name] = "applied"
        except Skipped as exc:
            mechanisms[name] = f"skipped: {exc}"
        except Unavailable as exc:
            mechanisms[name] = f"unavailable: {exc}"
        except Exception as exc:  # recorded: the caller decides from the report
            mechanisms[name] = f"failed: {type(exc).__name__}: {exc}"
    if threads > 1 and mechanisms.get("privileges") == "applied":
        details["privileges"] += f" (this thread only: {threads} threads)"
    global _active
    _active = _active or any(status == "applied" for status in mechanisms.values())
    protections = assess(mechanisms, allow_network=policy.allow_network, landlock_abi=abi, uid=uid,
                         max_processes=policy.max_processes, max_memory=policy.max_memory, details=details)
    return SandboxReport(mechanisms=mechanisms, details=details, protections=protections,
                         elapsed_ms=(time.perf_counter() - start) * 1000)


_active = False


def active() -> bool:
    """True in a process that :func:`apply` has locked down (a sandboxed worker)."""
    return _active


def prepare() -> None:
    """Warm what every ``apply`` needs, in the zygote before it forks workers: the default path list
    (a scan of ``sys.modules``), libseccomp and the libc handle. Optional; it only saves time."""
    from flowhub.sandbox.policy import system_paths

    system_paths()
    seccomp.library()
    landlock.abi_version()


def _attempt(action: Callable[[], object], allowed_means: str = "allowed") -> str:
    try:
        action()
        return allowed_means
    except OSError as exc:
        return f"denied ({errno_name(exc)})"


def _probe_child(policy: SandboxPolicy, port: int, outside: str, unix_path: str, prober: int) -> dict:
    report = apply(policy)

    def connect() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            pass

    def unix_connect() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(unix_path)

    def write_outside() -> None:
        with open(os.path.join(outside, "probe"), "w") as f:
            f.write("x")

    def write_scratch() -> None:
        with open(os.path.join(policy.scratch, "probe"), "w") as f:
            f.write("x")

    def read_prober_environ() -> None:
        with open(f"/proc/{prober}/environ", "rb") as f:
            f.read()

    def udp() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"probe", ("127.0.0.2", 9))

    def ptrace() -> None:
        from flowhub.sandbox._common import libc, raise_errno

        if libc().ptrace(16, prober, None, None) != 0:  # PTRACE_ATTACH
            raise_errno("ptrace")

    def prlimit() -> None:
        import resource

        resource.prlimit(prober, resource.RLIMIT_NOFILE)  # only reads it: enough to show it is reachable

    def execute() -> None:
        pid = os.fork()
        if pid == 0:
            try:
                os.execv("/bin/true", ["/bin/true"])
            except OSError as exc:
                os._exit(exc.errno or 1)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code:
            raise OSError(code, os.strerror(code))

    def see_prober() -> None:
        os.stat(f"/proc/{prober}")

    report.checks = {
        "tcp connect to the caller's 127.0.0.1": _attempt(connect, "allowed (connected)"),
        "udp send to 127.0.0.2": _attempt(udp, "allowed (sent)"),
        "connect to the caller's unix socket": _attempt(unix_connect, "allowed (connected)"),
        "write outside scratch": _attempt(write_outside),
        "write inside scratch": _attempt(write_scratch),
        "set file times outside scratch": _attempt(lambda: os.utime(outside)),
        "see the caller in /proc": _attempt(see_prober, "allowed (visible)"),
        "read /proc/<caller>/environ": _attempt(read_prober_environ),
        "signal the caller": _attempt(lambda: os.kill(prober, 0), "allowed (signalled)"),
        "prlimit the caller": _attempt(prlimit),
        "ptrace the caller": _attempt(ptrace),
        "run a program": _attempt(execute, "allowed (ran)"),
    }
    return report.as_dict()


def probe(policy: Optional[SandboxPolicy] = None, timeout: float = 30.0) -> SandboxReport:
    """What this machine offers: fork a throwaway child, apply ``policy`` (by default the usual one,
    with a temporary scratch folder) there, try what the sandbox must deny (reaching the network, a
    unix socket, files outside scratch, the prober's process, running a program), and report how
    each attempt ended. This process is untouched."""
    with tempfile.TemporaryDirectory(prefix="flowhub-sandbox-probe-") as tmp:
        scratch, outside = os.path.join(tmp, "scratch"), os.path.join(tmp, "outside")
        os.makedirs(scratch)
        os.makedirs(outside)
        private = os.path.join(tmp, "private")
        os.makedirs(private, mode=0o700)
        policy = policy or SandboxPolicy(scratch=scratch)
        if policy.scratch != scratch:
            policy = dataclasses.replace(policy, scratch=scratch)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        unix_path = os.path.join(private, "probe.sock")
        unix_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix_listener.bind(unix_path)
        unix_listener.listen(1)
        prober = os.getpid()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the throwaway child: never returns
            code = 1
            try:
                os.close(read_end)
                data = json.dumps(_probe_child(policy, listener.getsockname()[1], outside, unix_path,
                                               prober)).encode()
                with os.fdopen(write_end, "wb") as out:
                    out.write(data)
                code = 0
            except BaseException as exc:  # report it instead of a silent exit
                try:
                    os.write(write_end, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        os.close(write_end)
        try:
            raw, status = _collect(pid, read_end, timeout)
        finally:
            os.close(read_end)
            listener.close()
            unix_listener.close()
    try:
        data = json.loads(raw.decode() or "{}")
    except ValueError:
        data = {}
    if "mechanisms" not in data:
        why = data.get("error") or f"probe child ended without a report ({status})"
        return SandboxReport(mechanisms={name: f"failed: {why}" for name in MECHANISMS})
    return SandboxReport.from_dict(data)


def _collect(pid: int, fd: int, timeout: float) -> Tuple[bytes, str]:
    """Read the child's report until EOF or ``timeout``, then reap it (killing it if still alive)."""
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    _, raw = os.waitpid(pid, 0)
    status = (f"killed by signal {os.WTERMSIG(raw)}" if os.WIFSIGNALED(raw)
              else f"exit code {os.WEXITSTATUS(raw)}")
    return b"".join(chunks), status


__all__ = [
    "SandboxPolicy", "SandboxReport", "SandboxError", "apply", "probe", "prepare", "format_report", "Watchdog",
    "kill_tree",
    "DEFAULT_ENV_ALLOW", "DEFAULT_ENV_DENY", "MECHANISMS", "environment", "landlock", "limits", "namespaces",
    "privileges", "seccomp",
]
