"""Reproducible loads: what each load was made of, and a lockfile that pins it.

A :class:`Provenance` is recorded for every ``Hub.load``: the commit SHA the ref resolved to, the
entrypoint and its arguments, every weight file used (URL, size, SHA-256), and the flowhub and
oneflow versions. ``Hub(lockfile="flowhub.lock")`` writes the first resolution of each repo spec
and each weight file's hash to a JSON file, and from then on loads exactly those commits and
verifies exactly those hashes, failing on any drift, offline or not.

A pinned commit is trusted no more than a commit SHA written in the ref: before it is first fetched
it must be on a branch or tag of the named repo (:func:`flowhub.cache.repos.check_ref`), so a lockfile
cannot smuggle in a commit that only exists in a fork (``skip_validation=True`` skips the check).
A pin must be a full 40-hex-digit SHA.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Dict, List, Optional

from flowhub._version import __version__
from flowhub.cache import store
from flowhub.net.github import is_full_sha
from flowhub.spec import RepoSpec
from flowhub.errors import LockfileDriftError  # noqa: F401  (re-exported: defined in errors.py)

LOCKFILE_VERSION = 1


def _jsonable(value: Any) -> Any:
    """Arguments as they will be recorded: JSON values kept, anything else by its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def oneflow_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("oneflow")
    except Exception:  # noqa: BLE001 - metadata may be missing in odd installs
        return None


@dataclasses.dataclass
class Provenance:
    """Everything one load was made of."""

    repo: str
    ref: Optional[str]
    sha: Optional[str]
    entrypoint: Optional[str]
    args: List[Any]
    kwargs: Dict[str, Any]
    weights: List[Dict[str, Any]]
    source: str = "github"
    flowhub_version: str = __version__
    oneflow_version: Optional[str] = dataclasses.field(default_factory=oneflow_version)
    loaded_at: float = dataclasses.field(default_factory=time.time)

    @classmethod
    def of_call(cls, repo: str, ref: Optional[str], sha: Optional[str], entrypoint: Optional[str],
                args: tuple, kwargs: dict, weights: List[Dict[str, Any]], source: str = "github") -> "Provenance":
        return cls(repo, ref, sha, entrypoint, _jsonable(list(args)), _jsonable(dict(kwargs)), list(weights), source)

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def lock_key(spec: RepoSpec) -> str:
    """The lockfile key of a repo spec as the user wrote it (owner/repo case-folded, ref kept)."""
    return spec.key + (f":{spec.ref}" if spec.ref else "")


class Lockfile:
    """``flowhub.lock``: repo spec → commit SHA, weight URL → size and SHA-256."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))

    def read(self) -> Dict[str, Any]:
        if not os.path.exists(self.path):
            return {"version": LOCKFILE_VERSION, "repos": {}, "weights": {}}
        data = store.read_json(self.path)
        if not isinstance(data, dict) or data.get("version") != LOCKFILE_VERSION:
            raise LockfileDriftError(f"{self.path} is not a flowhub lockfile (version {LOCKFILE_VERSION}); "
                                     "fix or delete it, then load again to recreate it.")
        data.setdefault("repos", {})
        data.setdefault("weights", {})
        return data

    def pinned_sha(self, spec: RepoSpec) -> Optional[str]:
        """The commit SHA pinned for ``spec``, or None; a pin that is not a full commit SHA is refused."""
        key = lock_key(spec)
        entry = self.read()["repos"].get(key)
        if entry is None:
            return None
        sha = entry.get("sha") if isinstance(entry, dict) else None
        if not is_full_sha(sha):
            raise LockfileDriftError(
                f"{self.path} pins {sha!r} for {key}, which is not a full 40-hex-digit commit SHA. Fix that entry, "
                "or delete it and load again to pin the current commit.")
        return sha

    def expected_weights(self) -> Dict[str, Dict[str, Any]]:
        return self.read()["weights"]

    def record(self, spec: RepoSpec, sha: Optional[str], weights: List[Dict[str, Any]]) -> None:
        """Add what this load used and the lockfile does not know yet (never changes a pinned entry)."""
        data = self.read()
        changed = False
        key = lock_key(spec)
        if sha and key not in data["repos"]:
            data["repos"][key] = {"sha": sha, "locked_at": time.time()}
            changed = True
        for w in weights:
            if w.get("url") and w["url"] not in data["weights"] and w.get("sha256"):
                data["weights"][w["url"]] = {"sha256": w["sha256"], "size": w.get("size")}
                changed = True
        if changed:
            data["generated_by"] = f"flowhub {__version__}"
            store.write_json_atomic(self.path, data)


def check_weight(url: str, sha256: Optional[str], size: Optional[int], expected: Optional[Dict[str, Any]]) -> None:
    """Raise :class:`LockfileDriftError` if a weight file differs from what the lockfile pinned."""
    if not expected:
        return
    if expected.get("sha256") != sha256 or (expected.get("size") is not None and expected["size"] != size):
        raise LockfileDriftError(
            f"The weights at {url} do not match the lockfile: expected SHA-256 {expected.get('sha256')} "
            f"({expected.get('size')} bytes), got {sha256} ({size} bytes). The file changed on the server or in "
            "the cache. Run 'flowhub cache verify'; if the new weights are intended, remove this URL from the "
            "lockfile to pin them again.")
