"""What is in a hub cache, whether it is intact, and removing what is old or too big.

Scanning never crashes on a damaged cache: what cannot be read is reported, not raised. Removal
goes entry by entry, each folder renamed into the trash first (so no reader sees half a folder).
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterable, List, Optional

from flowhub.cache import overlays, repos, store
from flowhub.cache.checkpoints import EXTRACTED_SUFFIX, SANDBOXED_DIR, file_record_path, file_sha256

STALE_TEMP_SECONDS = 3600.0


@dataclasses.dataclass
class Entry:
    """One cache entry: a repository checkout, a weight file (with its extracted folder) or a requirement overlay."""

    kind: str  # "repo", "weights" or "overlay"
    name: str
    path: str
    size: int
    last_used: float
    source: str = ""  # owner/repo:ref, URL, or an overlay's requirements
    sha: str = ""  # commit SHA (repo), SHA-256 (weights) or the overlay's key
    problem: str = ""  # set by verify()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _mtime(*paths: str) -> float:
    times = []
    for p in paths:
        try:
            times.append(os.stat(p).st_mtime)
        except OSError:
            pass
    return max(times) if times else 0.0


def scan(hub_dir: str) -> List[Entry]:
    """All repository checkouts, weight files (``checkpoints/``) and requirement overlays under ``hub_dir``."""
    entries: List[Entry] = []
    if not os.path.isdir(hub_dir):
        return entries
    for name in sorted(os.listdir(hub_dir)):
        path = os.path.join(hub_dir, name)
        if name.startswith(".") or name in ("checkpoints", overlays.OVERLAYS_DIR) or not os.path.isdir(path):
            continue
        record = repos.read_entry_record(hub_dir, name) or {}
        source = f"{record['repo']}:{record['ref']}" if record.get("repo") else ""
        entries.append(Entry("repo", name, path, _tree_size(path),
                             _mtime(path, repos.entry_record_path(hub_dir, name)), source, record.get("sha") or ""))
    checkpoints = os.path.join(hub_dir, "checkpoints")
    # weights fetched for sandboxed workers live apart (see flowhub.worker.host.sandbox): listed as
    # ".sandboxed/<file>", so they are counted, verified and pruned like the rest
    for model_dir, prefix in ((checkpoints, ""), (os.path.join(checkpoints, SANDBOXED_DIR), SANDBOXED_DIR + "/")):
        if not os.path.isdir(model_dir):
            continue
        for name in sorted(os.listdir(model_dir)):
            path = os.path.join(model_dir, name)
            if name.startswith(".") or name.endswith((EXTRACTED_SUFFIX, ".partial")) or not os.path.isfile(path):
                continue
            record = store.read_json(file_record_path(model_dir, name)) or {}
            extracted = path + EXTRACTED_SUFFIX
            size = _tree_size(path) + (_tree_size(extracted) if os.path.isdir(extracted) else 0)
            entries.append(Entry("weights", prefix + name, path, size, _mtime(path, file_record_path(model_dir, name)),
                                 record.get("url", ""), record.get("sha256", "")))
    for found in overlays.scan(hub_dir):
        manifest = os.path.join(found["path"], overlays.MANIFEST)
        installed = found["manifest"].get("installed") or found["manifest"].get("requirements") or []
        entries.append(Entry("overlay", f"{overlays.OVERLAYS_DIR}/{found['key']}", found["path"],
                             _tree_size(found["path"]), _mtime(manifest), ", ".join(map(str, installed)), found["key"]))
    return entries


def verify(hub_dir: str, entries: Optional[Iterable[Entry]] = None) -> List[Entry]:
    """Recompute what can be checked; return the entries with ``problem`` set where something is wrong."""
    checked = list(entries if entries is not None else scan(hub_dir))
    for entry in checked:
        if entry.kind == "weights":
            record = store.read_json(file_record_path(os.path.dirname(entry.path), os.path.basename(entry.path))) or {}
            size = os.path.getsize(entry.path)
            if record.get("size") is not None and record["size"] != size:
                entry.problem = f"size {size} differs from the {record['size']} bytes downloaded"
            elif record.get("sha256") and file_sha256(entry.path) != record["sha256"]:
                entry.problem = "SHA-256 differs from the downloaded file's"
        elif entry.kind == "overlay":
            if not os.path.isfile(os.path.join(entry.path, overlays.MANIFEST)):
                entry.problem = "its manifest is missing"
            elif not os.path.isdir(os.path.join(entry.path, overlays.SITE)):
                entry.problem = "its site folder is missing"
        else:
            record = repos.read_entry_record(hub_dir, entry.name) or {}
            if record.get("has_hubconf") and not os.path.isfile(os.path.join(entry.path, "hubconf.py")):
                entry.problem = "hubconf.py is missing"
            elif record.get("files") is not None:
                count = sum(len(files) for _r, _d, files in os.walk(entry.path))
                if count < record["files"]:
                    entry.problem = f"{record['files'] - count} of {record['files']} files are missing"
    return checked


def remove(hub_dir: str, entry: Entry) -> None:
    """Delete one entry and its records."""
    if entry.kind == "overlay":  # workers forked later no longer find it; running ones keep what they imported
        trash = os.path.join(store.meta_dir(hub_dir, "trash"), f"overlay-{os.path.basename(entry.path)}.{time.time_ns()}")
        os.rename(entry.path, trash)
        store.remove_tree(trash)
    elif entry.kind == "repo":
        trash = os.path.join(store.meta_dir(hub_dir, "trash"), f"{entry.name}.{time.time_ns()}")
        os.rename(entry.path, trash)
        store.remove_tree(trash)
        store.remove_tree(repos.entry_record_path(hub_dir, entry.name))
    else:
        model_dir = os.path.dirname(entry.path)
        store.remove_tree(entry.path + EXTRACTED_SUFFIX)
        store.remove_tree(entry.path)
        store.remove_tree(file_record_path(model_dir, os.path.basename(entry.path)))


def select_for_pruning(entries: List[Entry], older_than: Optional[float] = None,
                       max_size: Optional[int] = None, now: Optional[float] = None) -> List[Entry]:
    """Entries unused for ``older_than`` seconds, then least recently used ones until the rest fits ``max_size``."""
    now = time.time() if now is None else now
    chosen = [e for e in entries if older_than is not None and now - e.last_used > older_than]
    if max_size is not None:
        kept = sorted((e for e in entries if e not in chosen), key=lambda e: e.last_used)
        total = sum(e.size for e in kept)
        while kept and total > max_size:
            oldest = kept.pop(0)
            chosen.append(oldest)
            total -= oldest.size
    return chosen


def stale_temporaries(hub_dir: str, min_age: float = STALE_TEMP_SECONDS) -> List[str]:
    """Leftovers of killed processes: staging folders, trash, ``*.partial`` files older than ``min_age``."""
    found = []
    now = time.time()
    for root in (hub_dir, os.path.join(hub_dir, "checkpoints"), overlays.overlays_root(hub_dir)):
        for sub in ("tmp", "trash"):
            folder = os.path.join(root, store.META_DIR, sub)
            if os.path.isdir(folder):
                found += [os.path.join(folder, n) for n in os.listdir(folder)
                          if now - _mtime(os.path.join(folder, n)) > min_age]
        if os.path.isdir(root):
            found += [os.path.join(root, n) for n in os.listdir(root)
                      if n.endswith(".partial") and now - _mtime(os.path.join(root, n)) > min_age]
    return sorted(found)
