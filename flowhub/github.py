"""What flowhub asks a GitHub-compatible server: default branch, ref validation, archive URLs.

Hosts come from the settings (``FLOWHUB_GITHUB_URL``, ``FLOWHUB_GITHUB_API_URL``), never from
constants, so GitHub Enterprise, a mirror or the loopback test server all work the same way.
"""
from __future__ import annotations

import re
from typing import Optional
from urllib.parse import quote

from flowhub.errors import NetworkError, ResolveError
from flowhub.network import HttpClient, check_status
from flowhub.spec import RepoSpec

_API_HEADERS = {"Accept": "application/vnd.github.v3+json"}
PER_PAGE = 100
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


def repo_web_url(client: HttpClient, spec: RepoSpec) -> str:
    return f"{client.settings.github_url}/{spec.owner}/{spec.repo}"


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


def _pages(client: HttpClient, spec: RepoSpec, kind: str):
    page = 1
    while True:
        url = (f"{client.settings.github_api_url}/repos/{spec.owner}/{spec.repo}/{kind}"
               f"?per_page={PER_PAGE}&page={page}")
        what = f"Checking that {spec.ref} belongs to {spec.owner}/{spec.repo}"
        response = client.get(url, what=what, headers=_API_HEADERS)
        if response.status_code == 404:
            response.close()
            raise ResolveError(f"Repository {spec.owner}/{spec.repo} was not found at {client.settings.github_api_url} "
                               "(check the spelling, or set GITHUB_TOKEN for a private repository).")
        check_status(response, what)
        try:
            entries = response.json()
        except ValueError:
            raise NetworkError(f"{what}: {url} did not return JSON.") from None
        if not entries:
            return
        yield from entries
        page += 1


def resolve_commit(client: HttpClient, spec: RepoSpec, ref: str) -> Optional[str]:
    """The full SHA of commit ``ref`` (``GET /repos/{o}/{r}/commits/{ref}``), or None if the server has no such commit."""
    url = f"{client.settings.github_api_url}/repos/{spec.owner}/{spec.repo}/commits/{quote(ref, safe='')}"
    what = f"Resolving commit {ref} of {spec.owner}/{spec.repo}"
    response = client.get(url, what=what, headers=_API_HEADERS)
    if response.status_code in (404, 422):
        response.close()
        return None
    check_status(response, what)
    try:
        sha = response.json().get("sha")
    except ValueError:
        raise NetworkError(f"{what}: {url} did not return JSON.") from None
    return sha if isinstance(sha, str) and _COMMIT.match(sha) and sha.startswith(ref) else None


def validate_ref(client: HttpClient, spec: RepoSpec, ref: str) -> Optional[str]:
    """Check that ``ref`` is a branch or tag of the repo, or a prefix of one's head commit; return that SHA.

    This is the reference's rule ("published models should be at least in a branch/tag") and what
    keeps a commit that only exists in a fork from being loaded under the parent's name.
    """
    spec = spec.with_ref(ref)
    for kind in ("branches", "tags"):
        for entry in _pages(client, spec, kind):
            sha = (entry.get("commit") or {}).get("sha") or ""
            if entry.get("name") == ref or (len(ref) >= 4 and sha.startswith(ref)):
                return sha or None
    if _COMMIT.match(ref):  # an explicit commit (full or abbreviated SHA) that is not a branch or tag head
        sha = resolve_commit(client, spec, ref)
        if sha:
            return sha
    raise ResolveError(
        f"Cannot find {ref} in {repo_web_url(client, spec)}. If it's a commit from a forked repo, "
        "please call hub.load() with forked repo directly.")
