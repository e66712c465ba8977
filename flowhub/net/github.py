"""What flowhub asks a GitHub-compatible server: default branch, ref validation, archive URLs.

Hosts come from the settings (``FLOWHUB_GITHUB_URL``, ``FLOWHUB_GITHUB_API_URL``), never from
constants, so GitHub Enterprise, a mirror or the loopback test server all work the same way.

Ref validation (:func:`validate_ref`) is what keeps a commit that only exists in a fork from being
loaded under the parent's name: GitHub serves every commit of a fork network through the parent's
archive and commits URLs, so "the server has this commit" proves nothing. A ref must be a branch or
tag of the repo, or a commit reachable from one. API requests it makes on a cold cache:

- a branch or tag name: the branch list until found (⌈(B+1)/100⌉ pages for B branches) plus, for a
  branch, the tag list (to warn when a tag has the same name), as the reference pages them;
- a commit SHA (7 to 40 hex digits) on the default branch, at any depth: 2 (the repo, one compare);
- a commit SHA only on another branch or a tag: at most 2 + ⌈(B+1)/100⌉ + ⌈(T+1)/100⌉ +
  :data:`MAX_HEAD_COMPARES` (the lists, then one compare per other branch or tag head, stopping at
  the first that holds it). A commit on none of those heads is refused, with what to do.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Optional, Tuple
from urllib.parse import quote

from flowhub.errors import NetworkError, ResolveError
from flowhub.net.http import HttpClient, check_status
from flowhub.spec import RepoSpec

_API_HEADERS = {"Accept": "application/vnd.github.v3+json"}
PER_PAGE = 100
MAX_HEAD_COMPARES = 10  # heads of other branches and tags compared with a SHA not on the default branch
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
_FULL_SHA = re.compile(r"^[0-9a-f]{40}$")
_REACHABLE = ("identical", "behind")  # compare/{base}...{head}: head is base or one of its ancestors


@dataclasses.dataclass(frozen=True)
class ResolvedRef:
    """A ref checked against the repo: its full commit SHA and the branch or tag whose history holds it.

    ``ambiguous`` is True when a branch and a tag share the name ``ref``; the branch was chosen, as
    GitHub's archive URL does after its "300 Multiple Choices".
    """

    sha: str
    via: str
    ambiguous: bool = False


def is_commit_ref(ref: str) -> bool:
    """True if ``ref`` is written like a commit SHA (7 to 40 lower-case hex digits)."""
    return bool(_COMMIT.match(ref))


def is_full_sha(text: object) -> bool:
    """True for a full 40-hex-digit commit SHA."""
    return isinstance(text, str) and bool(_FULL_SHA.match(text))


def repo_web_url(client: HttpClient, spec: RepoSpec) -> str:
    return f"{client.settings.github_url}/{spec.owner}/{spec.repo}"


def _api_url(client: HttpClient, spec: RepoSpec, tail: str = "") -> str:
    return f"{client.settings.github_api_url}/repos/{spec.owner}/{spec.repo}" + (f"/{tail}" if tail else "")


def archive_url(client: HttpClient, spec: RepoSpec, ref: str) -> str:
    """``{base}/{owner}/{repo}/zipball/{ref}``, as GitHub serves it (the ref keeps its slashes)."""
    return f"{repo_web_url(client, spec)}/zipball/{quote(ref, safe='/')}"


def probe_default_branch(client: HttpClient, spec: RepoSpec) -> str:
    """The reference's guess: ``main`` if ``tree/main`` exists, else ``master``."""
    url = f"{repo_web_url(client, spec)}/tree/main/"
    response = client.get(url, what=f"Looking up the default branch of {spec.owner}/{spec.repo}")
    response.close()
    if response.status_code == 404:
        return "master"
    check_status(response, f"Looking up the default branch of {spec.owner}/{spec.repo}")
    return "main"


def _not_found(client: HttpClient, spec: RepoSpec) -> ResolveError:
    return ResolveError(f"Repository {spec.owner}/{spec.repo} was not found at {client.settings.github_api_url} "
                        "(check the spelling, or set GITHUB_TOKEN for a private repository).")


def _json(client: HttpClient, url: str, what: str):
    """The JSON answer to a GET of ``url``, or None on 404/422 (no such thing)."""
    response = client.get(url, what=what, headers=_API_HEADERS)
    if response.status_code in (404, 422):
        response.close()
        return None
    check_status(response, what)
    try:
        return response.json()
    except ValueError:
        raise NetworkError(f"{what}: {url} did not return JSON.") from None


def api_default_branch(client: HttpClient, spec: RepoSpec) -> str:
    """The repo's default branch as the API reports it (``GET /repos/{owner}/{repo}``)."""
    data = _json(client, _api_url(client, spec), f"Looking up {spec.owner}/{spec.repo}")
    if data is None:
        raise _not_found(client, spec)
    branch = data.get("default_branch") if isinstance(data, dict) else None
    if not isinstance(branch, str) or not branch:
        raise NetworkError(f"{_api_url(client, spec)} did not say which branch is the default of "
                           f"{spec.owner}/{spec.repo}; pass a branch or tag name, or skip_validation=True.")
    return branch


def compare(client: HttpClient, spec: RepoSpec, base: str, head: str) -> Optional[dict]:
    """``GET /repos/{owner}/{repo}/compare/{base}...{head}``, or None if the server cannot compare them
    (404: one of them is unknown, or they have no common ancestor)."""
    url = _api_url(client, spec, f"compare/{quote(base, safe='/')}...{quote(head, safe='/')}")
    data = _json(client, url, f"Checking that {head} is on {base} of {spec.owner}/{spec.repo}")
    return data if isinstance(data, dict) else None


def _sha_of(entry: object, key: str) -> str:
    value = entry.get(key) if isinstance(entry, dict) else None
    sha = value.get("sha") if isinstance(value, dict) else None
    return sha if is_full_sha(sha) else ""


def _reached(comparison: Optional[dict], ref: str) -> Optional[str]:
    """The full SHA of ``ref`` if the comparison says it is the base or one of its ancestors."""
    if not comparison or comparison.get("status") not in _REACHABLE:
        return None
    sha = _sha_of(comparison, "merge_base_commit")  # head itself when head is reachable from base
    return sha if sha.startswith(ref) else None


def _refs(client: HttpClient, spec: RepoSpec, kind: str) -> Iterator[Tuple[str, str]]:
    """``(name, head SHA)`` of every branch or tag (``kind``), paged like the reference does."""
    page = 1
    while True:
        url = f"{_api_url(client, spec, kind)}?per_page={PER_PAGE}&page={page}"
        what = f"Listing the {kind} of {spec.owner}/{spec.repo}"
        response = client.get(url, what=what, headers=_API_HEADERS)
        if response.status_code == 404:
            response.close()
            raise _not_found(client, spec)
        check_status(response, what)
        try:
            entries = response.json()
        except ValueError:
            raise NetworkError(f"{what}: {url} did not return JSON.") from None
        if not isinstance(entries, list):
            raise NetworkError(f"{what}: {url} did not return a JSON list.")
        for entry in entries:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                yield entry["name"], _sha_of(entry, "commit")
        last = len(entries) < PER_PAGE or (response.headers.get("Link") and "next" not in response.links)
        if last:
            return
        page += 1


def _refused(client: HttpClient, spec: RepoSpec, ref: str, detail: str = "") -> ResolveError:
    return ResolveError(
        f"Cannot find {ref} in {repo_web_url(client, spec)}{detail}. If it's a commit from a forked repo, "
        f"please call hub.load() with forked repo directly ('<fork owner>/{spec.repo}:{ref}'). If you trust this "
        "commit anyway, pass skip_validation=True.")


def _validate_name(client: HttpClient, spec: RepoSpec, ref: str) -> ResolvedRef:
    """A branch or tag name, or (the reference's rule) a prefix of at least 4 hex digits of one's head."""
    prefix_ok = len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref)
    for name, sha in _refs(client, spec, "branches"):
        if name == ref and sha:
            ambiguous = any(tag == ref for tag, _ in _refs(client, spec, "tags"))
            return ResolvedRef(sha, name, ambiguous)
        if prefix_ok and sha.startswith(ref):
            return ResolvedRef(sha, name)
    for name, sha in _refs(client, spec, "tags"):
        if sha and (name == ref or (prefix_ok and sha.startswith(ref))):
            return ResolvedRef(sha, name)
    raise _refused(client, spec, ref)


def _validate_commit(client: HttpClient, spec: RepoSpec, ref: str) -> ResolvedRef:
    """A commit SHA: reachable from the default branch, else from another branch or tag head."""
    default = api_default_branch(client, spec)
    first = compare(client, spec, default, ref)
    sha = _reached(first, ref)
    if sha:
        return ResolvedRef(sha, default)
    commits = (first or {}).get("commits")
    full = commits[-1].get("sha") if isinstance(commits, list) and commits and isinstance(commits[-1], dict) else None
    checked = {_sha_of(first, "base_commit")} if first else set()
    heads = []
    for kind in ("branches", "tags"):
        for name, head in _refs(client, spec, kind):
            if head and (name == ref or head.startswith(ref)):
                return ResolvedRef(head, name)
            if head and head not in checked:
                checked.add(head)
                heads.append((name, head))
    if first is None:  # the server does not know the commit at all: no head can hold it
        raise _refused(client, spec, ref)
    for name, head in heads[:MAX_HEAD_COMPARES]:
        sha = _reached(compare(client, spec, head, ref), ref)
        if sha:
            return ResolvedRef(sha, name)
    what = f"commit {full}" if is_full_sha(full) and full.startswith(ref) else f"commit {ref}"
    if len(heads) > MAX_HEAD_COMPARES:
        detail = (f": {what} is not on the default branch of {spec.owner}/{spec.repo} nor on the first "
                  f"{MAX_HEAD_COMPARES} of its {len(heads)} other branch and tag heads (the others were not checked, "
                  "to bound the API requests)")
    else:
        detail = f": {what} is on no branch or tag of {spec.owner}/{spec.repo}"
    raise _refused(client, spec, ref, detail)


def validate_ref(client: HttpClient, spec: RepoSpec, ref: str) -> ResolvedRef:
    """Check that ``ref`` is a branch or tag of the repo, or a commit reachable from one; return its full SHA.

    This is the reference's rule ("published models should be at least in a branch/tag"), extended
    to commits deep in a branch's history; see the module docstring for the requests it costs.
    Raises :class:`ResolveError` (a ``ValueError``) naming the repo and the ref otherwise.
    """
    spec = spec.with_ref(ref)
    if is_commit_ref(ref):
        return _validate_commit(client, spec, ref)
    return _validate_name(client, spec, ref)
