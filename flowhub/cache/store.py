"""Cache primitives shared by every kind of entry: locks, atomic publishing, metadata files.

Correctness never depends on a lock (NFS and Lustre may ignore them): every writer builds its entry
under a unique temp name in the same folder and publishes it with one atomic rename, and readers
only trust what exists under its final name. Locks only keep concurrent processes from downloading
the same thing twice. ``flock`` locks die with their holder, and a lock still held after
``FLOWHUB_LOCK_TIMEOUT`` seconds is ignored with a warning rather than waited on forever; sooner when
the holder file next to it (:mod:`flowhub.cache.holders`) shows its holder dead, as a lock left on a
shared filesystem by a host that died does.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import filelock

from flowhub.cache import holders
from flowhub.errors import CacheWaitTimeoutError
from flowhub.notices import notice

META_DIR = ".flowhub"
#: A deferring rank fetches itself when no holder shows up within this many seconds.
NO_HOLDER_GRACE = 30.0
_fetcher_gone = False


def meta_dir(root: str, *parts: str) -> str:
    """``<root>/.flowhub/<parts...>``, created if needed."""
    path = os.path.join(root, META_DIR, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def lock_name(text: str) -> str:
    """A file name for a lock keyed by ``text`` (case-folded, path separators removed)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text.lower())[:200] + ".lock"


@contextlib.contextmanager
def entry_lock(lock_path: str, timeout: float, what: str, *, done: Optional[Callable[[], bool]] = None,
               defer: bool = False, wait_timeout: Optional[float] = None, rank: Optional[int] = None) -> Iterator[bool]:
    """Hold the lock for one cache entry; yields False if we went on without it (or, with ``done``, if the
    entry appeared meanwhile: the caller checks again).

    The holder writes who it is next to the lock (:mod:`flowhub.cache.holders`), so waiters name it and
    go on at once when it died (on this host: its pid is gone; on any host: its heartbeat stopped),
    however the filesystem treats the lock. ``defer`` (a rank of a job whose cache another rank fills)
    first waits up to ``wait_timeout`` for ``done()`` without taking the lock, and raises
    :class:`~flowhub.errors.CacheWaitTimeoutError` naming the holder if it never comes.
    """
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    watch = holders.Watch(lock_path)
    if defer and done is not None:
        if _wait_for_holder(lock_path, watch, done, what, wait_timeout or timeout):
            yield False
            return
    lock = filelock.FileLock(lock_path, mode=0o664)
    got = _acquire(lock, lock_path, watch, timeout, what, done)
    if got is None:  # the entry appeared while we waited
        yield False
        return
    try:
        with holders.holding(lock_path, what, rank):
            yield got
    finally:
        if got:
            lock.release()


def _wait_for_holder(lock_path: str, watch: "holders.Watch", done: Callable[[], bool], what: str,
                     wait_timeout: float) -> bool:
    """Wait for another rank to finish ``what``: True when ``done()``, False to take over (holder dead)."""
    global _fetcher_gone
    start = time.monotonic()
    told = False
    while True:
        if done():
            return True
        if _fetcher_gone:  # this job's fetcher died before: fetch here rather than wait for it again
            return False
        info = watch.poll()
        if watch.stale(min(holders.STALE_AFTER, max(2.0, wait_timeout / 3))):
            _fetcher_gone = True
            warnings.warn(f"flowhub: {holders.describe(info)} stopped while {what} (its heartbeat next to {lock_path} "
                          "stopped); this process takes over.", stacklevel=4)
            return False
        waited = time.monotonic() - start
        if info is None and waited > min(NO_HOLDER_GRACE, wait_timeout):
            return False  # the rank meant to fetch never started: fetch it here
        if waited > wait_timeout:
            raise CacheWaitTimeoutError(lock_path, what, holders.describe(info), wait_timeout)
        if not told and waited > 1.0:
            notice(f"flowhub: waiting for {holders.describe(info)}, which is {what}...")
            told = True
        time.sleep(0.05)


def _acquire(lock: "filelock.FileLock", lock_path: str, watch: "holders.Watch", timeout: float, what: str,
             done: Optional[Callable[[], bool]]) -> Optional[bool]:
    """True: we hold the lock; False: going on without it; None: ``done()`` became true meanwhile."""
    try:
        lock.acquire(timeout=0)
        return True
    except filelock.Timeout:
        pass
    notice(f"flowhub: waiting for {holders.describe(watch.poll())}, which is {what}...")
    deadline = time.monotonic() + timeout
    while True:
        try:
            lock.acquire(timeout=max(0.0, min(0.25, deadline - time.monotonic())), poll_interval=0.05)
            return True
        except filelock.Timeout:
            pass
        if done is not None and done():
            return None
        watch.poll()
        if watch.stale():
            warnings.warn(f"flowhub: the lock {lock_path} is held by {holders.describe(watch.info)}, which is dead "
                          "or stalled (no heartbeat); going on without it.", stacklevel=4)
            return False
        if time.monotonic() >= deadline:
            warnings.warn(
                f"flowhub: {holders.describe(watch.info)} has been {what} for more than {timeout:g} s (lock "
                f"{lock_path}); going on without the lock. The result stays correct; at worst the work is done twice.",
                stacklevel=4)
            return False


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to ``path`` through a temp file and ``os.replace`` (readers see old or new, never half)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str) -> Optional[Any]:
    """The JSON in ``path``, or None if it is missing or unreadable (a corrupt record is not fatal)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def touch(path: str) -> None:
    """Mark a record as just used (its mtime is the entry's last use); best effort, never raises."""
    try:
        os.utime(path)
    except OSError:
        pass


def staging_dir(root: str) -> str:
    """A fresh, unique folder under ``<root>/.flowhub/tmp`` on the same filesystem as ``root``."""
    path = os.path.join(meta_dir(root, "tmp"), uuid.uuid4().hex)
    os.makedirs(path)
    return path


def remove_tree(path: str) -> None:
    """Remove a file or folder if it exists, ignoring errors (used for temp data and trash)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


def publish_dir(staged: str, final: str, root: str, replace: bool = False) -> bool:
    """Atomically move the finished folder ``staged`` to ``final``.

    If ``final`` already exists it is complete (it was published the same way); unless ``replace`` is
    set, ours is discarded and False returned. With ``replace``, the old folder is first renamed into
    the trash, so no reader ever sees a half-replaced folder.
    """
    if replace and os.path.lexists(final):
        trash = os.path.join(meta_dir(root, "trash"), uuid.uuid4().hex)
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, trash)
        remove_tree(trash)
    try:
        os.rename(staged, final)
        return True
    except OSError:
        if not os.path.isdir(final):
            raise
        remove_tree(staged)
        return False


def find_case_insensitive(parent: str, name: str) -> Optional[str]:
    """The path of ``parent/name`` whatever the case of ``name`` (exact spelling preferred), or None."""
    exact = os.path.join(parent, name)
    if os.path.exists(exact):
        return exact
    try:
        entries = os.listdir(parent)
    except OSError:
        return None
    lowered = name.lower()
    for entry in sorted(entries):
        if entry.lower() == lowered:
            return os.path.join(parent, entry)
    return None


def inside(path: str, roots: Sequence[str]) -> bool:
    """True if ``path`` (resolved) lies under one of ``roots`` (resolved)."""
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(root).rstrip(os.sep) + os.sep) for root in roots if root)
