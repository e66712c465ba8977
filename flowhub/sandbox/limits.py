"""Resource limits: rlimits set inside the worker, and a watchdog the caller runs from outside.

Inside (``apply``): ``RLIMIT_CORE`` 0, ``RLIMIT_CPU`` (soft limit sends SIGXCPU, one second later
the hard limit sends SIGKILL), ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, ``RLIMIT_FSIZE`` and
``RLIMIT_DATA`` for memory. ``RLIMIT_DATA`` counts heap and private writable mappings, so it caps
numpy/oneflow buffers without breaking ``import oneflow`` the way ``RLIMIT_AS`` < 5 GiB does (the
mapped CUDA libraries make VmPeak 4.4 GB; VmData is ~0.55 GiB). The worker also starts its own
session, so every process it creates shares its process group and can be killed as one.

Two limits the kernel cannot enforce from inside, both handled by :class:`Watchdog` outside:

* ``RLIMIT_NPROC`` is never enforced for real uid 0 (``fork`` skips the check for the root user,
  with or without capabilities, and a user namespace does not change the real uid);
* ``RLIMIT_DATA`` is per process: a worker that spawns processes gets one budget per process.
"""
from __future__ import annotations

import dataclasses
import os
import resource
import signal
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from flowhub.sandbox.policy import SandboxPolicy

_PAGE = os.sysconf("SC_PAGE_SIZE")


def available() -> Tuple[bool, str]:
    return True, "always"


def nproc_enforced() -> bool:
    """False for real uid 0: the kernel's fork path does not check RLIMIT_NPROC for the root user."""
    return os.getuid() != 0


def _set(which: int, soft: int, hard: Optional[int] = None) -> None:
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY and os.geteuid() != 0:
        hard = min(hard, current_hard)  # an unprivileged process can only lower its hard limit
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def apply(policy: SandboxPolicy) -> str:
    notes: List[str] = []
    _set(resource.RLIMIT_CORE, 0)
    if policy.cpu_seconds is not None:
        _set(resource.RLIMIT_CPU, int(policy.cpu_seconds), int(policy.cpu_seconds) + 1)
    _set(resource.RLIMIT_NOFILE, int(policy.max_open_files))
    if policy.max_file_size is not None:
        _set(resource.RLIMIT_FSIZE, int(policy.max_file_size))
    if policy.max_memory is not None:
        data = _vm_data()
        if data is not None and data >= policy.max_memory:
            notes.append(f"max_memory {policy.max_memory >> 20} MiB is below the data already mapped "
                         f"({data >> 20} MiB): every new allocation will fail")
        _set(resource.RLIMIT_DATA, int(policy.max_memory))
    if policy.max_processes is not None:
        _set(resource.RLIMIT_NPROC, int(policy.max_processes))
        if not nproc_enforced():
            notes.append("RLIMIT_NPROC is not enforced for uid 0: bound processes with "
                         "Watchdog(max_processes=...) from the caller")
    try:
        os.setsid()  # its own process group: Watchdog and kill_tree reach every descendant
    except OSError:
        pass  # already a group leader (a spawned worker started with start_new_session)
    summary = (f"core=0 cpu={policy.cpu_seconds} nofile={policy.max_open_files} nproc={policy.max_processes} "
               f"fsize={policy.max_file_size} data={policy.max_memory}; own process group")
    return "; ".join([summary] + notes)


def _vm_data() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the caller's side ----------------------------------------------------------------------------

def _processes() -> Dict[int, Tuple[int, int, int]]:
    """``{pid: (ppid, pgid, rss_bytes)}`` for every process visible in /proc."""
    table: Dict[int, Tuple[int, int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(b")") + 2:].split()
        # fields[0] is state (field 3): ppid is field 4, pgrp 5, rss (pages) field 24
        try:
            table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[21]) * _PAGE)
        except (IndexError, ValueError):
            continue
    return table


def tree(pid: int, table: Optional[Dict[int, Tuple[int, int, int]]] = None) -> List[int]:
    """``pid`` and every process descended from it or sharing its process group (when it leads one:
    a double fork that re-parents to init still shares the group)."""
    table = _processes() if table is None else table
    if pid not in table:
        return []
    children: Dict[int, List[int]] = {}
    for p, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(p)
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo.extend(children.get(p, ()))
    if table[pid][1] == pid:
        found.update(p for p, (_, pgid, _) in table.items() if pgid == pid)
    return sorted(found)


def _pss(pid: int) -> Optional[int]:
    """Proportional set size (shared pages divided among their sharers); ~5 ms for a oneflow process."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_SHMEM_LINKS = ("/memfd:", "/dev/shm/")


def held_shmem(members: List[int]) -> int:
    """Bytes of memfds and ``/dev/shm`` files the processes hold open: memory that no RSS shows until
    it is mapped (a worker can fill memfds with ``write`` and keep only the descriptors). Each file
    counts once, however many descriptors or processes hold it."""
    seen: Dict[Tuple[int, int], int] = {}
    for pid in members:
        folder = f"/proc/{pid}/fd"
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = f"{folder}/{name}"
            try:
                if not os.readlink(path).startswith(_SHMEM_LINKS):
                    continue
                st = os.stat(path)
            except OSError:
                continue
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def memory(members: List[int], table: Dict[int, Tuple[int, int, int]]) -> int:
    """Memory charged to a tree: the RSS of a lone process, else the sum of PSS (forked processes
    share copy-on-write pages that a sum of RSS would count once per process); plus the memfds and
    shared-memory files they hold (:func:`held_shmem`)."""
    if len(members) == 1:
        return table[members[0]][2] + held_shmem(members)
    total = 0
    for p in members:
        pss = _pss(p)
        total += table[p][2] if pss is None else pss
    return total + held_shmem(members)


def usage(pid: int) -> Tuple[int, int]:
    """``(bytes, processes)`` of ``pid``'s tree, bytes as in :func:`memory`."""
    table = _processes()
    members = tree(pid, table)
    return (memory(members, table) if members else 0), len(members)


def rss(pid: int) -> Optional[int]:
    """Resident set size of one process in bytes (``/proc/<pid>/statm``), None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> int:
    """Signal ``pid``'s process group (if it leads one) and every descendant; returns how many were found."""
    members = tree(pid)
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)  # atomic for the group: a fork racing with it is aborted by the kernel
    except (ProcessLookupError, PermissionError):
        pass
    for p in members:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return len(members)


@dataclasses.dataclass
class Kill:
    """One intervention of the watchdog."""

    pid: int
    reason: str  # "memory" or "processes"
    rss: int  # bytes charged to the tree when it was killed (a sum of RSS for "processes")
    processes: int


def enforce(pid: int, max_rss: Optional[int] = None, max_processes: Optional[int] = None,
            table: Optional[Dict[int, Tuple[int, int, int]]] = None) -> Optional[Kill]:
    """Kill ``pid``'s tree if its summed RSS is over ``max_rss`` or it has more than ``max_processes``
    processes; returns what was done (None if within limits or gone). One check, no thread."""
    table = _processes() if table is None else table
    members = tree(pid, table)
    if not members:
        return None
    if max_processes is not None and len(members) > max_processes:  # first: a fork bomb is cheap to see
        reason, total = "processes", sum(table[p][2] for p in members)
    elif max_rss is not None:
        total = memory(members, table)
        if total <= max_rss:
            return None
        reason = "memory"
    else:
        return None
    kill_tree(pid)
    return Kill(pid, reason, total, len(members))


class Watchdog:
    """Caller-side memory and process cap for worker processes (and everything they start).

    Every ``interval`` seconds it counts the processes of each watched pid's tree (see :func:`tree`)
    and measures its memory (see :func:`memory`), and kills the tree with SIGKILL when either is over
    its limit. It bounds
    memory to roughly ``max_rss`` plus what the worker can allocate in one interval, it is not a hard
    cap; and it is the only process cap that works when workers run as root. Kills are recorded in
    ``kills`` and passed to ``on_kill`` (called on the watchdog's thread).

    The caller must keep each watched pid un-reaped while it is watched (the zygote does: it waits
    for a worker only when asked), or a recycled pid could be killed.
    """

    def __init__(self, max_rss: Optional[int] = None, max_processes: Optional[int] = None,
                 interval: float = 0.1, on_kill: Optional[Callable[[Kill], None]] = None) -> None:
        self.max_rss, self.max_processes, self.interval, self.on_kill = max_rss, max_processes, interval, on_kill
        self.kills: List[Kill] = []
        self._pids: Dict[int, bool] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, pid: int) -> None:
        with self._lock:
            self._pids[pid] = True

    def unwatch(self, pid: int) -> None:
        with self._lock:
            self._pids.pop(pid, None)

    def check(self) -> List[Kill]:
        """One pass over every watched pid (also usable without the thread)."""
        with self._lock:
            pids = list(self._pids)
        if not pids:
            return []
        table = _processes()
        done: List[Kill] = []
        for pid in pids:
            if pid not in table:
                self.unwatch(pid)
                continue
            kill = enforce(pid, self.max_rss, self.max_processes, table)
            if kill is not None:
                self.kills.append(kill)
                done.append(kill)
                self.unwatch(pid)
                if self.on_kill is not None:
                    self.on_kill(kill)
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # never let a transient /proc race end the watchdog
                time.sleep(self.interval)

    def start(self) -> "Watchdog":
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="flowhub-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
