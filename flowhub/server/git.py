"""Read git repositories through the ``git`` command: find, list refs, resolve, compare, archive.

Everything is read at request time, so repositories (and new commits, branches or tags) added
while the server runs are served. Only archives are cached, keyed by commit SHA, because the
zip of one commit never changes.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

_HEX = re.compile(r"^[0-9a-fA-F]{4,40}$")
_ENV = {
    **os.environ,
    "LC_ALL": "C",
    "GIT_TERMINAL_PROMPT": "0",
    "GIT_CONFIG_NOSYSTEM": "1",
}


class GitError(RuntimeError):
    """A ``git`` command failed unexpectedly."""


class RefNotFound(LookupError):
    """The ref names no branch, tag or commit of the repository."""


class AmbiguousRef(LookupError):
    """The ref matches more than one thing.

    ``kind`` is ``"name"`` (a branch and a tag share the name) or ``"sha"`` (an abbreviated
    SHA matches several commits); ``candidates`` lists what matched.
    """

    def __init__(self, ref: str, kind: str, candidates: List[str]) -> None:
        super().__init__(f"{ref!r} is ambiguous ({kind}): {', '.join(candidates)}")
        self.ref = ref
        self.kind = kind
        self.candidates = candidates


@dataclass(frozen=True)
class Resolved:
    """A ref resolved to a commit: ``kind`` is ``"branch"``, ``"tag"`` or ``"commit"``."""

    sha: str
    kind: str
    name: str


@dataclass(frozen=True)
class CommitInfo:
    """The fields of a commit the API reports."""

    sha: str
    tree: str
    parents: Tuple[str, ...]
    author_name: str
    author_email: str
    author_date: str
    committer_name: str
    committer_email: str
    committer_date: str
    message: str


@dataclass(frozen=True)
class FileChange:
    """One file of a diff: ``status`` is git's letter (A, D, M, T), ``blob`` the file's object SHA."""

    path: str
    status: str
    blob: str
    additions: int
    deletions: int


def _run(path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["git", "-c", "safe.directory=*", "-C", str(path), *args]
    proc = subprocess.run(cmd, capture_output=True, env=_ENV)
    if check and proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitError(f"git {args[0]} failed in {path}: {msg[-1] if msg else proc.returncode}")
    return proc


def is_git_dir(path: Path) -> bool:
    """True for a bare repository or a ``.git`` directory (``HEAD`` + ``objects`` + ``refs``)."""
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


def _is_repo(path: Path) -> bool:
    return path.is_dir() and (is_git_dir(path) or (path / ".git").exists())


def _pick(entries: List[Path], wanted: str) -> Optional[Path]:
    """The entry spelled exactly ``wanted`` if any, else the first case-insensitive match."""
    for entry in entries:
        if entry.name == wanted:
            return entry
    return entries[0] if entries else None


def _listdir(path: Path) -> List[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


class GitRepo:
    """One repository served as ``owner/name`` (the on-disk spelling, without ``.git``)."""

    def __init__(self, path: Path, owner: str, name: str) -> None:
        self.path = path
        self.owner = owner
        self.name = name

    def __repr__(self) -> str:
        return f"GitRepo({self.owner}/{self.name} at {self.path})"

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"

    def refs(self) -> Tuple[Dict[str, str], Dict[str, str]]:
        """``(branches, tags)``: name -> commit SHA (annotated tags are peeled)."""
        fmt = "%(refname)%00%(objectname)%00%(*objectname)"
        out = _run(self.path, "for-each-ref", f"--format={fmt}", "refs/heads", "refs/tags").stdout
        branches: Dict[str, str] = {}
        tags: Dict[str, str] = {}
        for line in out.decode("utf-8", "surrogateescape").splitlines():
            refname, obj, peeled = line.split("\0")
            if refname.startswith("refs/heads/"):
                branches[refname[len("refs/heads/"):]] = obj
            elif refname.startswith("refs/tags/"):
                tags[refname[len("refs/tags/"):]] = peeled or obj
        return branches, tags

    def default_branch(self) -> str:
        """The branch HEAD points at (``main`` if HEAD is detached or unreadable)."""
        proc = _run(self.path, "symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        name = proc.stdout.decode().strip()
        return name if proc.returncode == 0 and name else "main"

    def commits_with_prefix(self, prefix: str) -> List[str]:
        """Full SHAs of all commits whose SHA starts with ``prefix`` (4 to 40 hex digits)."""
        prefix = prefix.lower()
        if len(prefix) == 40:
            candidates = [prefix]
        else:
            proc = _run(self.path, "rev-parse", f"--disambiguate={prefix}", check=False)
            candidates = proc.stdout.decode().split()
        if not candidates:
            return []
        proc = subprocess.run(
            ["git", "-c", "safe.directory=*", "-C", str(self.path), "cat-file",
             "--batch-check=%(objectname) %(objecttype)"],
            input="".join(c + "\n" for c in candidates).encode(), capture_output=True, env=_ENV,
        )
        found = []
        for line in proc.stdout.decode().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == "commit":
                found.append(parts[0])
        return sorted(found)

    def resolve(self, ref: str, ambiguous: str = "error") -> Resolved:
        """Resolve a branch, tag, ``refs/heads/x``, ``refs/tags/x`` or (abbreviated) SHA.

        A name that is both a branch and a tag raises :class:`AmbiguousRef` when
        ``ambiguous == "error"`` and resolves to the branch when ``ambiguous == "branch"``.
        Names win over SHAs, as on GitHub.
        """
        branches, tags = self.refs()
        if ref.startswith("refs/heads/") and ref[len("refs/heads/"):] in branches:
            name = ref[len("refs/heads/"):]
            return Resolved(branches[name], "branch", name)
        if ref.startswith("refs/tags/") and ref[len("refs/tags/"):] in tags:
            name = ref[len("refs/tags/"):]
            return Resolved(tags[name], "tag", name)
        if ref in branches and ref in tags:
            if ambiguous != "branch":
                raise AmbiguousRef(ref, "name", [f"refs/heads/{ref}", f"refs/tags/{ref}"])
            return Resolved(branches[ref], "branch", ref)
        if ref in branches:
            return Resolved(branches[ref], "branch", ref)
        if ref in tags:
            return Resolved(tags[ref], "tag", ref)
        if _HEX.match(ref):
            found = self.commits_with_prefix(ref)
            if len(found) == 1:
                return Resolved(found[0], "commit", found[0])
            if len(found) > 1:
                raise AmbiguousRef(ref, "sha", found)
        raise RefNotFound(ref)

    def has_path(self, sha: str, path: str) -> bool:
        """True if ``path`` exists in the tree of commit ``sha``."""
        return _run(self.path, "cat-file", "-e", f"{sha}:{path}", check=False).returncode == 0

    def commit(self, sha: str) -> CommitInfo:
        """Metadata and message of commit ``sha``."""
        return self.commits([sha])[0]

    def commits(self, shas: List[str]) -> List[CommitInfo]:
        """Metadata and message of each commit in ``shas`` (full SHAs), in that order (one ``git`` call)."""
        if not shas:
            return []
        fmt = "%H%x00%T%x00%P%x00%an%x00%ae%x00%aI%x00%cn%x00%ce%x00%cI%x00%B%x1e"
        unique = list(dict.fromkeys(shas))
        out = _run(self.path, "show", "-s", f"--format={fmt}", *unique, "--").stdout
        infos: Dict[str, CommitInfo] = {}
        for record in out.decode("utf-8", "replace").split("\x1e"):
            fields = record.lstrip("\n").split("\0", 9)
            if len(fields) < 10:
                continue
            infos[fields[0]] = (CommitInfo(
                sha=fields[0], tree=fields[1], parents=tuple(fields[2].split()),
                author_name=fields[3], author_email=fields[4], author_date=fields[5],
                committer_name=fields[6], committer_email=fields[7], committer_date=fields[8],
                message=fields[9].rstrip("\n"),
            ))
        return [infos[sha] for sha in shas]

    def merge_base(self, a: str, b: str) -> Optional[str]:
        """The best common ancestor of commits ``a`` and ``b``, or None if their histories are unrelated."""
        proc = _run(self.path, "merge-base", a, b, check=False)
        sha = proc.stdout.decode().strip()
        return sha if proc.returncode == 0 and sha else None

    def commits_between(self, base: str, head: str) -> List[str]:
        """``git log base..head``: the commits reachable from ``head`` and not from ``base``, oldest first."""
        out = _run(self.path, "rev-list", "--reverse", "--date-order", f"{base}..{head}", "--").stdout
        return out.decode().split()

    def count_between(self, base: str, head: str) -> int:
        """How many commits ``git log base..head`` lists."""
        return int(_run(self.path, "rev-list", "--count", f"{base}..{head}", "--").stdout.decode().strip() or 0)

    def changed_files(self, old: str, new: str) -> List[FileChange]:
        """The files that differ between commits ``old`` and ``new`` (no rename detection)."""
        raw = _run(self.path, "diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", old, new).stdout
        num = _run(self.path, "diff-tree", "-r", "-z", "--no-renames", "--no-commit-id", "--numstat",
                   old, new).stdout
        counts: Dict[str, Tuple[int, int]] = {}
        for item in num.decode("utf-8", "surrogateescape").split("\0"):
            parts = item.split("\t", 2)
            if len(parts) == 3:
                added, deleted, path = parts
                counts[path] = (int(added) if added.isdigit() else 0, int(deleted) if deleted.isdigit() else 0)
        fields = raw.decode("utf-8", "surrogateescape").split("\0")
        changes = []
        for meta, path in zip(fields[0::2], fields[1::2]):
            parts = meta.lstrip(":").split()
            if len(parts) != 5:
                continue
            _, _, old_blob, new_blob, status = parts
            added, deleted = counts.get(path, (0, 0))
            changes.append(FileChange(path, status[0], new_blob if status[0] != "D" else old_blob, added, deleted))
        return changes

    def archive_prefix(self, sha: str) -> str:
        """GitHub's top folder for a zipball: ``{owner}-{repo}-{sha7}/``."""
        return f"{self.owner}-{self.name}-{sha[:7]}/"


def find_repo(root: Path, owner: str, name: str) -> Optional[GitRepo]:
    """The repository ``ROOT/<owner>/<name>[.git]``, matched case-insensitively, or None."""
    if not owner or not name or owner.startswith(".") or name.startswith("."):
        return None
    owners = [p for p in _listdir(root) if p.name.casefold() == owner.casefold() and p.is_dir()]
    for owner_dir in sorted(owners, key=lambda p: p.name != owner):
        wanted = name.casefold()
        entries = [
            p for p in _listdir(owner_dir)
            if p.name.casefold() in (wanted, wanted + ".git") and _is_repo(p)
        ]
        exact = [p for p in entries if p.name in (name, name + ".git")]
        path = _pick(exact or entries, name)
        if path is not None:
            repo_name = path.name[:-4] if path.name.lower().endswith(".git") else path.name
            return GitRepo(path, owner_dir.name, repo_name)
    return None


class ArchiveCache:
    """Zip archives built with ``git archive``, kept as files in a private temp dir.

    ``git archive`` writes the full commit SHA as the zip comment and lists each directory
    before its contents, so the first entry is the top folder, as on GitHub.
    """

    def __init__(self) -> None:
        self._dir: Optional[tempfile.TemporaryDirectory] = None
        self._lock = threading.Lock()
        self._key_locks: Dict[Tuple[str, str, str], threading.Lock] = {}
        self._files: Dict[Tuple[str, str, str], Path] = {}
        self._counter = 0

    def _tmpdir(self) -> Path:
        with self._lock:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="flowhub-server-")
            return Path(self._dir.name)

    def zip_path(self, repo: GitRepo, sha: str) -> Path:
        """Path of the zip of commit ``sha`` (built on first use; later calls are free)."""
        prefix = repo.archive_prefix(sha)
        key = (str(repo.path.resolve()), sha, prefix)
        with self._lock:
            if key in self._files and self._files[key].exists():
                return self._files[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._files and self._files[key].exists():
                    return self._files[key]
            folder = self._tmpdir()
            with self._lock:
                self._counter += 1
                final = folder / f"{self._counter}-{sha}.zip"
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".partial")
            os.close(fd)
            try:
                _run(repo.path, "archive", "--format=zip", f"--prefix={prefix}", "-o", tmp, sha)
                os.replace(tmp, final)
            except BaseException:
                os.unlink(tmp)
                raise
            with self._lock:
                self._files[key] = final
            return final

    def close(self) -> None:
        """Delete every cached archive."""
        with self._lock:
            if self._dir is not None:
                self._dir.cleanup()
                self._dir = None
            self._files.clear()
            self._key_locks.clear()
