"""What a sandbox actually did: one status per mechanism and what each protection rests on."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

#: The mechanisms, in the order ``apply`` runs them.
MECHANISMS = ("environment", "limits", "namespaces", "privileges", "landlock", "seccomp")

NONE = "none"


@dataclasses.dataclass
class SandboxReport:
    """Per mechanism: ``"applied"``, ``"skipped: <why>"``, ``"unavailable: <why>"`` or ``"failed: <err>"``
    (``details`` says what an applied one did). ``protections`` says, per thing a hostile repository
    could try, which mechanism stops it, or ``"none"``."""

    mechanisms: Dict[str, str]
    details: Dict[str, str] = dataclasses.field(default_factory=dict)
    protections: Dict[str, str] = dataclasses.field(default_factory=dict)
    checks: Dict[str, str] = dataclasses.field(default_factory=dict)  # probe(): what was tried, and how it ended
    elapsed_ms: float = 0.0

    def status(self, name: str) -> str:
        """The first word of a mechanism's status: applied, skipped, unavailable, failed or missing."""
        return self.mechanisms.get(name, "missing").split(":", 1)[0]

    def applied(self, name: str) -> bool:
        return self.status(name) == "applied"

    def strength(self) -> str:
        """``"strong"`` (network, filesystem, system calls and environment all closed), ``"partial"``
        (some of them) or ``"weak"`` (neither network nor filesystem)."""
        core = [self.protections.get(k, NONE) for k in ("network", "filesystem", "syscalls", "environment")]
        if all(v != NONE and not v.startswith(("partial", NONE)) for v in core):
            return "strong"
        if all(v == NONE or v.startswith(NONE) for v in core[:2]):
            return "weak"
        return "partial"

    def strength_reason(self) -> str:
        """One line: why :meth:`strength` is what it is."""
        missing = [k for k in ("network", "filesystem", "syscalls", "environment")
                   if self.protections.get(k, NONE).startswith(("partial", NONE))]
        if not missing:
            return "network, filesystem, system calls and environment are all restricted"
        return "not restricted: " + ", ".join(f"{k} ({self.protections.get(k, NONE)})" for k in missing)

    def as_dict(self) -> dict:
        return {"strength": self.strength(), "reason": self.strength_reason(),
                "mechanisms": dict(self.mechanisms), "details": dict(self.details),
                "protections": dict(self.protections), "checks": dict(self.checks),
                "elapsed_ms": round(self.elapsed_ms, 3)}

    @classmethod
    def from_dict(cls, data: dict) -> "SandboxReport":
        return cls(mechanisms=dict(data.get("mechanisms", {})), details=dict(data.get("details", {})),
                   protections=dict(data.get("protections", {})), checks=dict(data.get("checks", {})),
                   elapsed_ms=float(data.get("elapsed_ms", 0.0)))


def assess(mechanisms: Dict[str, str], *, allow_network: bool, landlock_abi: int, uid: int,
           max_processes: Optional[int], max_memory: Optional[int],
           details: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Which mechanism provides each protection, given what took effect (and, for the namespaces,
    which of them: ``details``)."""
    ok = {name: mechanisms.get(name, "").startswith("applied") for name in MECHANISMS}
    ns_detail = (details or {}).get("namespaces", "") if ok["namespaces"] else ""
    pid_ns, ro_mounts = "PID namespace" in ns_detail, "every other mount read-only" in ns_detail
    prot: Dict[str, str] = {}
    if allow_network:
        prot["network"] = "allowed by the policy"
    elif ok["namespaces"]:
        prot["network"] = "namespaces" + (" + landlock (TCP)" if ok["landlock"] and landlock_abi >= 4 else "")
    elif ok["landlock"] and landlock_abi >= 4:
        prot["network"] = ("landlock (TCP) + seccomp (UDP, raw, inet6)" if ok["seccomp"]
                           else "partial: landlock blocks TCP, UDP stays open")
    elif ok["seccomp"]:
        prot["network"] = "partial: seccomp blocks UDP and inet6, TCP stays open"
    else:
        prot["network"] = NONE
    prot["filesystem"] = "landlock" if ok["landlock"] else NONE
    # /proc/<caller>/environ and /proc/<caller>/mem pass the kernel's ptrace access check; each of
    # these fails it: Landlock's scoping, another user namespace, or (for a root caller) lacking the
    # capabilities the caller holds.
    closers = [why for name, why in (("landlock", "landlock (ptrace scoping)"),
                                     ("namespaces", "namespaces (another user namespace)"),
                                     ("privileges", "privileges (a root caller's capabilities)"))
               if ok[name] and (name != "privileges" or uid == 0)]
    prot["caller environ and memory"] = (" + ".join(closers) if closers else
                                         "partial: seccomp blocks ptrace, /proc/<pid>/environ stays readable"
                                         if ok["seccomp"] else NONE)
    prot["syscalls"] = "seccomp" if ok["seccomp"] else NONE
    prot["environment"] = "environment" if ok["environment"] else NONE
    prot["capabilities"] = ("privileges" + (" + namespaces" if ok["namespaces"] else "")
                            if ok["privileges"] else "namespaces" if ok["namespaces"] else NONE)
    prot["other processes"] = ("namespaces (own PID namespace and /proc: nothing outside can be named)" if pid_ns
                               else "partial: seccomp denies prlimit and ptrace; other pids stay visible"
                               if ok["seccomp"] else NONE)
    prot["file metadata and times"] = ("namespaces (every mount but scratch read-only)" if ro_mounts else
                                       "partial: seccomp ignores mode/owner changes; file times stay settable"
                                       if ok["seccomp"] else NONE)
    prot["programs"] = "seccomp (execve denied)" if ok["seccomp"] else NONE
    if max_processes is None:
        prot["processes"] = "not limited by the policy"
    elif not ok["limits"]:
        prot["processes"] = NONE
    elif uid == 0:
        prot["processes"] = ("the caller's watchdog (RLIMIT_NPROC is not enforced for uid 0)"
                             + ("; the PID namespace ends every process with the worker" if pid_ns else ""))
    else:
        prot["processes"] = "limits (RLIMIT_NPROC, counts every process of the uid) + the caller's watchdog"
    if max_memory is None:
        prot["memory"] = "not limited by the policy: run limits.Watchdog"
    else:
        prot["memory"] = ("limits (RLIMIT_DATA and RLIMIT_FSIZE, per process) + the caller's watchdog (memory and "
                          "memfds of every process)" if ok["limits"] else NONE)
    return prot


def format_report(report: SandboxReport) -> str:
    """A few aligned lines for ``flowhub doctor`` and logs."""
    lines = [f"sandbox: {report.strength()} - {report.strength_reason()}"]
    width = max(len(n) for n in list(report.mechanisms) + ["mechanism"])
    for name, status in report.mechanisms.items():
        detail = report.details.get(name)
        lines.append(f"  {name:<{width}}  {status}" + (f"  ({detail})" if detail else ""))
    if report.protections:
        lines.append("  protections:")
        pwidth = max(len(k) for k in report.protections)
        for key, value in report.protections.items():
            lines.append(f"    {key:<{pwidth}}  {value}")
    if report.checks:
        lines.append("  checks:")
        cwidth = max(len(k) for k in report.checks)
        for key, value in report.checks.items():
            lines.append(f"    {key:<{cwidth}}  {value}")
    if report.elapsed_ms:
        lines.append(f"  setup took {report.elapsed_ms:.1f} ms")
    return "\n".join(lines)
