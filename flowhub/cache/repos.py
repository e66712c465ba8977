"""Repository checkouts in the hub cache: resolve the ref, check trust, fetch once, publish atomically.

Layout (the reference's, so an existing oneflow.hub cache keeps working)::

    <hub>/<owner>_<repo>_<ref with / as _>/    the extracted repository
    <hub>/trusted_list
    <hub>/.flowhub/refs/<owner>_<repo>.json     default branch, the commit SHA each ref resolved to, and the
                                                commits checked to be on a branch or tag of the repo
    <hub>/.flowhub/entries/<folder>.json        completion record of a checkout (written last)
    <hub>/.flowhub/locks/, tmp/, trash/         locks, staging folders, replaced folders

A cache hit makes no network request: with an explicit ref, and without one once the default branch
has been remembered on disk. A download first checks the ref (:func:`flowhub.net.github.validate_ref`)
unless ``skip_validation``, then fetches the archive by the commit SHA the check found, so what is
published is exactly the commit that was checked. A commit SHA checked once is remembered, so
fetching it again (``force_reload``, another folder, a lockfile pin) needs no request.
"""
from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Optional, Tuple

from flowhub.cache import archive, store, trust
from flowhub.net import github
from flowhub.net.download import download
from flowhub.errors import ArchiveError, HTTPStatusError, NetworkError, OfflineError, RateLimitError, ResolveError
from flowhub.net.http import HttpClient
from flowhub.cache.provenance import LockfileDriftError
from flowhub.settings import ENV_OFFLINE
from flowhub.spec import RepoSpec
from flowhub.notices import notice


@dataclasses.dataclass(frozen=True)
class Checkout:
    """A repository folder in the cache and what it was resolved from."""

    path: str
    spec: RepoSpec
    sha: Optional[str]


class RefIndex:
    """``<hub>/.flowhub/refs/<owner>_<repo>.json``: the remembered default branch, ref → SHA, and the
    commit SHAs checked to be on a branch or tag of the repo (``validated``: SHA → the branch or tag)."""

    def __init__(self, hub_dir: str, spec: RepoSpec) -> None:
        self.path = os.path.join(hub_dir, store.META_DIR, "refs", store.lock_name(spec.key)[:-5] + ".json")

    def load(self) -> dict:
        data = store.read_json(self.path)
        return data if isinstance(data, dict) else {}

    def default_branch(self) -> Optional[str]:
        return self.load().get("default_branch")

    def sha(self, ref: str) -> Optional[str]:
        return (self.load().get("refs") or {}).get(ref, {}).get("sha")

    def validated(self, ref: str) -> Optional[github.ResolvedRef]:
        """Commit ref ``ref`` as checked before: itself, or the one checked SHA it abbreviates; else None."""
        validated = self.load().get("validated")
        if not isinstance(validated, dict):
            return None
        matches = [sha for sha in validated if github.is_full_sha(sha) and sha.startswith(ref)]
        if len(matches) != 1:
            return None
        via = (validated[matches[0]] or {}).get("via") if isinstance(validated[matches[0]], dict) else None
        return github.ResolvedRef(matches[0], via if isinstance(via, str) else "?")

    def update(self, *, default_branch: Optional[str] = None, ref: Optional[str] = None,
               sha: Optional[str] = None, validated_via: Optional[str] = None) -> None:
        """Best effort: a read-only or contended cache must not make a load fail.

        ``validated_via`` (the branch or tag found to hold ``sha``) records that ``sha`` passed the ref check.
        """
        try:
            data = self.load()
            if default_branch:
                data["default_branch"] = default_branch
            if ref and sha:
                data.setdefault("refs", {})[ref] = {"sha": sha, "resolved_at": time.time()}
            if sha and validated_via:
                data.setdefault("validated", {})[sha] = {"via": validated_via, "validated_at": time.time()}
            store.write_json_atomic(self.path, data)
        except OSError:
            pass


def entry_record_path(hub_dir: str, folder: str) -> str:
    return os.path.join(hub_dir, store.META_DIR, "entries", folder.lower() + ".json")


def read_entry_record(hub_dir: str, folder: str) -> Optional[dict]:
    record = store.read_json(entry_record_path(hub_dir, folder))
    return record if isinstance(record, dict) else None


def _is_complete(hub_dir: str, path: str) -> bool:
    """A folder under its final name is complete unless its record says files have since vanished."""
    if not os.path.isdir(path):
        return False
    record = read_entry_record(hub_dir, os.path.basename(path))
    if record and record.get("has_hubconf") and not os.path.isfile(os.path.join(path, "hubconf.py")):
        return False
    return True


def resolve_default_branch(client: HttpClient, hub_dir: str, spec: RepoSpec, force: bool) -> str:
    """The branch to use when the user gave none: remembered on disk, else probed like the reference."""
    index = RefIndex(hub_dir, spec)
    remembered = None if force else index.default_branch()
    if remembered:
        return remembered
    if client.settings.offline:
        for branch in ("main", "master"):
            if store.find_case_insensitive(hub_dir, spec.dir_name(branch)):
                return branch
        client.check_online(f"Finding the default branch of {spec.owner}/{spec.repo}")
    try:
        branch = github.probe_default_branch(client, spec)
    except (NetworkError, RateLimitError):
        for branch in ("main", "master"):
            if store.find_case_insensitive(hub_dir, spec.dir_name(branch)):
                warnings.warn(f"Could not reach {client.settings.github_url} to find the default branch of "
                              f"{spec.owner}/{spec.repo}; using the cached '{branch}'.")
                return branch
        raise
    index.update(default_branch=branch)
    return branch


def _folder_sha(hub_dir: str, path: str) -> Optional[str]:
    record = read_entry_record(hub_dir, os.path.basename(path)) or {}
    return record.get("sha")


def check_ref(client: HttpClient, index: RefIndex, spec: RepoSpec, ref: str) -> github.ResolvedRef:
    """The full commit SHA ``ref`` names, checked to be on a branch or tag of the repo.

    A commit SHA checked before (recorded in ``index``) costs no request; branch and tag names are
    always looked up, since they move. Raises :class:`ResolveError` (a ``ValueError``) otherwise.
    """
    if github.is_commit_ref(ref):
        known = index.validated(ref)
        if known:
            return known
    resolved = github.validate_ref(client, spec, ref)
    if resolved.ambiguous:
        warnings.warn(_AMBIGUOUS.format(ref), stacklevel=3)
    return resolved


_AMBIGUOUS = ("The ref {0} is ambiguous. Perhaps it is both a tag and a branch in the repo? "
              "flowhub will now assume that it's a branch. You can disambiguate tags and branches "
              "by explicitly passing refs/heads/<ref> or refs/tags/<ref>.")


def get_checkout(client: HttpClient, spec: RepoSpec, *, force_reload: bool = False, skip_validation: bool = False,
                 trust_repo: trust.TrustArg = None, calling_fn: str = "load", verbose: bool = True,
                 pinned_sha: Optional[str] = None, untrusted_ok: bool = False,
                 resolved_sha: Optional[str] = None) -> Checkout:
    """Return the cached checkout of ``spec``, downloading and publishing it first if needed.

    With ``pinned_sha`` (from a lockfile) the result is exactly that commit: the ref's folder if it
    holds that commit, else a folder named after the SHA, fetched by SHA after the same check as a
    SHA ref (a lockfile cannot pin a commit that only exists in a fork, unless ``skip_validation``).
    ``untrusted_ok``: see :func:`flowhub.cache.trust.check_trust` (a sandboxed call).
    ``resolved_sha`` (a job's ranks agreed on it, see :mod:`flowhub.distributed`): the ref's folder if it
    holds that commit, else that commit fetched by SHA into it; with ``settings.job_role == "wait"`` another
    rank fetches it and this one waits for it (bounded, see :func:`flowhub.cache.store.entry_lock`).
    """
    hub_dir = client.settings.hub_dir
    os.makedirs(hub_dir, exist_ok=True)
    if pinned_sha and not spec.ref:
        ref = RefIndex(hub_dir, spec).default_branch()  # no request needed: the SHA is known
    else:
        ref = spec.ref or resolve_default_branch(client, hub_dir, spec, force_reload)
    trust.check_trust(hub_dir, spec, ref or pinned_sha, trust_repo, calling_fn, untrusted_ok=untrusted_ok)
    if pinned_sha:
        existing = store.find_case_insensitive(hub_dir, spec.dir_name(ref)) if ref else None
        if existing and not force_reload and _is_complete(hub_dir, existing) \
                and _folder_sha(hub_dir, existing) == pinned_sha:
            return Checkout(existing, spec.with_ref(ref), pinned_sha)
        ref = pinned_sha
    spec = spec.with_ref(ref)

    folder = spec.dir_name(ref)
    index = RefIndex(hub_dir, spec)
    if resolved_sha:
        return _agreed_checkout(client, spec, ref, folder, index, resolved_sha, force_reload, verbose)
    existing = store.find_case_insensitive(hub_dir, folder)
    if existing and not force_reload and _is_complete(hub_dir, existing):
        if verbose:
            notice(f"Using cache found in {existing}")
        store.touch(entry_record_path(hub_dir, os.path.basename(existing)))
        return Checkout(existing, spec, _folder_sha(hub_dir, existing) or index.sha(ref))
    if client.settings.offline:
        raise OfflineError(
            f"{spec} is not in the cache at {hub_dir} and offline mode is on ({ENV_OFFLINE}=1). "
            f"Load it once with network access, or unset {ENV_OFFLINE}.")

    lock = os.path.join(store.meta_dir(hub_dir, "locks"), store.lock_name(f"repo-{spec.key}-{ref}"))
    with store.entry_lock(lock, client.settings.lock_timeout, f"downloading {spec}"):
        existing = store.find_case_insensitive(hub_dir, folder)
        if existing and not force_reload and _is_complete(hub_dir, existing):  # fetched while we waited
            return Checkout(existing, spec, _folder_sha(hub_dir, existing) or index.sha(ref))
        checked = None if skip_validation else check_ref(client, index, spec, ref)
        final = existing or os.path.join(hub_dir, folder)
        sha = _fetch_and_publish(client, spec, ref, final, replace=bool(existing),
                                 checked_sha=checked.sha if checked else None, pinned_sha=pinned_sha)
        sha = sha or (checked.sha if checked else None)
    index.update(ref=ref, sha=sha, validated_via=checked.via if checked else None)
    return Checkout(final, spec, sha)


def resolve_commit(client: HttpClient, spec: RepoSpec, *, force_reload: bool = False, skip_validation: bool = False,
                   trust_repo: trust.TrustArg = None, calling_fn: str = "load",
                   untrusted_ok: bool = False) -> Tuple[str, Optional[str]]:
    """``(ref, commit SHA)`` a load of ``spec`` would use, without fetching: the cached folder's commit on a
    hit (the reference reuses a cached branch), else the ref checked against the server. The SHA is None
    when only the archive can tell (``skip_validation`` on a cold cache)."""
    hub_dir = client.settings.hub_dir
    os.makedirs(hub_dir, exist_ok=True)
    ref = spec.ref or resolve_default_branch(client, hub_dir, spec, force_reload)
    trust.check_trust(hub_dir, spec, ref, trust_repo, calling_fn, untrusted_ok=untrusted_ok)
    spec = spec.with_ref(ref)
    index = RefIndex(hub_dir, spec)
    existing = store.find_case_insensitive(hub_dir, spec.dir_name(ref))
    if existing and not force_reload and _is_complete(hub_dir, existing):
        sha = _folder_sha(hub_dir, existing) or index.sha(ref)
        if sha:
            return ref, sha
    if skip_validation:
        return ref, None
    checked = check_ref(client, index, spec, ref)
    index.update(ref=ref, sha=checked.sha, validated_via=checked.via)
    return ref, checked.sha


def _agreed_checkout(client: HttpClient, spec: RepoSpec, ref: str, folder: str, index: RefIndex, sha: str,
                     force_reload: bool, verbose: bool) -> Checkout:
    """The ref's folder holding commit ``sha`` (see ``resolved_sha`` in :func:`get_checkout`)."""
    hub_dir = client.settings.hub_dir
    fetcher = client.settings.job_role != "wait"

    def done() -> Optional[str]:
        existing = store.find_case_insensitive(hub_dir, folder)
        if existing and _is_complete(hub_dir, existing) and _folder_sha(hub_dir, existing) == sha:
            return existing
        return None

    found = None if (force_reload and fetcher) else done()
    if found:
        if verbose:
            notice(f"Using cache found in {found}")
        return Checkout(found, spec, sha)
    if client.settings.offline:
        raise OfflineError(f"{spec} at commit {sha} is not in the cache at {hub_dir} and offline mode is on "
                           f"({ENV_OFFLINE}=1). Load it once with network access, or unset {ENV_OFFLINE}.")
    lock = os.path.join(store.meta_dir(hub_dir, "locks"), store.lock_name(f"repo-{spec.key}-{ref}"))
    with store.entry_lock(lock, client.settings.lock_timeout, f"downloading {spec} ({sha[:12]})",
                          done=lambda: done() is not None and not (force_reload and fetcher), defer=not fetcher,
                          wait_timeout=client.settings.job_timeout):
        found = None if (force_reload and fetcher) else done()
        if found:
            return Checkout(found, spec, sha)
        existing = store.find_case_insensitive(hub_dir, folder)
        final = existing or os.path.join(hub_dir, folder)
        _fetch_and_publish(client, spec, ref, final, replace=bool(existing), checked_sha=sha)
    index.update(ref=ref, sha=sha)
    return Checkout(final, spec, sha)


def _fetch_and_publish(client: HttpClient, spec: RepoSpec, ref: str, final: str, replace: bool,
                       checked_sha: Optional[str] = None, pinned_sha: Optional[str] = None) -> Optional[str]:
    """Download the archive (by ``checked_sha`` when the ref was checked, else by ``ref``), verify the commit
    it says it is, extract it and publish it as ``final``; return the archive's commit SHA."""
    hub_dir = client.settings.hub_dir
    stage = store.staging_dir(hub_dir)
    try:
        zip_path = os.path.join(stage, "archive.zip")
        url = github.archive_url(client, spec, checked_sha or ref)
        notice(f'Downloading: "{url}" to {zip_path}')
        try:
            download(client, url, zip_path, progress=False)
        except HTTPStatusError as exc:
            if exc.status == 300 and not checked_sha:
                warnings.warn(_AMBIGUOUS.format(ref))
                download(client, github.archive_url(client, spec, "refs/heads/" + ref), zip_path, progress=False)
            elif exc.status == 404:
                raise ResolveError(f"Cannot find {ref} in {github.repo_web_url(client, spec)} "
                                   f"(the archive URL answered 404). Check the branch, tag or commit name.") from None
            else:
                raise
        sha = archive.commit_sha_of(zip_path)
        if pinned_sha and sha and sha != pinned_sha:
            raise LockfileDriftError(f"The archive of {spec} from {url} is commit {sha}, not the pinned {pinned_sha}.")
        if checked_sha and sha and sha != checked_sha:
            raise ArchiveError(f"The archive of {spec} from {url} is commit {sha}, not {checked_sha} that {ref} "
                               "resolved to; refusing to use it. The server or a proxy served other content than asked: "
                               "retry, or check FLOWHUB_GITHUB_URL.")
        extracted = os.path.join(stage, "x")
        os.makedirs(extracted)
        members = archive.extract_zip(zip_path, extracted, f"Extracting the archive of {spec}")
        top = archive.top_folder(members)
        if top is None:
            raise ArchiveError(f"The archive of {spec} from {url} does not have the single top folder GitHub "
                               "archives have; refusing to use it.")
        source = os.path.join(extracted, top)
        has_hubconf = os.path.isfile(os.path.join(source, "hubconf.py"))
        store.publish_dir(source, final, hub_dir, replace=replace)
        store.write_json_atomic(entry_record_path(hub_dir, os.path.basename(final)), {
            "repo": f"{spec.owner}/{spec.repo}", "ref": ref, "sha": sha, "url": url, "files": len(members),
            "has_hubconf": has_hubconf, "fetched_at": time.time()})
        return sha
    finally:
        store.remove_tree(stage)
