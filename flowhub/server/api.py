"""The REST API subset (``/api/...``): repository, branches, tags, commits, compare, API zipball.

As on GitHub, a commit is found in the repository's object store, which holds the objects of its
whole fork network: a commit pushed only to a fork is served by the parent's ``commits``,
``compare`` and archive URLs too. Only branches and tags say what belongs to the repository.
"""
from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, quote

from flowhub.server.git import AmbiguousRef, CommitInfo, GitRepo, RefNotFound, find_repo
from flowhub.server import web as web_routes
from flowhub.server.responses import Response, api_error, json_response
from flowhub.server.site import Site

DEFAULT_PER_PAGE = 30
MAX_PER_PAGE = 100
COMPARE_MAX_COMMITS = 250  # commits in an unpaged comparison (the most recent ones)
COMPARE_MAX_FILES = 300


def _int_param(query: Dict[str, List[str]], name: str, default: int) -> int:
    try:
        value = int(query.get(name, [""])[0])
    except ValueError:
        return default
    return value if value >= 1 else default


def _repo_json(repo: GitRepo, api: str, web: str) -> dict:
    full = repo.full_name
    return {
        "id": zlib.crc32(full.lower().encode()),
        "name": repo.name,
        "full_name": full,
        "owner": {"login": repo.owner, "type": "User", "url": f"{api}/users/{repo.owner}"},
        "private": False,
        "fork": False,
        "html_url": f"{web}/{full}",
        "url": f"{api}/repos/{full}",
        "branches_url": f"{api}/repos/{full}/branches{{/branch}}",
        "tags_url": f"{api}/repos/{full}/tags",
        "default_branch": repo.default_branch(),
    }


def _paged(items: List[dict], query: Dict[str, List[str]], url: str) -> Response:
    """One page of ``items`` with GitHub's ``per_page``/``page`` rules and ``Link`` header."""
    per_page = min(_int_param(query, "per_page", DEFAULT_PER_PAGE), MAX_PER_PAGE)
    page = _int_param(query, "page", 1)
    last = max(1, -(-len(items) // per_page))
    chunk = items[(page - 1) * per_page: page * per_page]
    links = []
    if page < last:
        links += [(page + 1, "next"), (last, "last")]
    if page > 1 and items:
        links += [(1, "first"), (min(page - 1, last), "prev")]
    headers: List[Tuple[str, str]] = []
    if links:
        headers.append(("Link", ", ".join(
            f'<{url}?per_page={per_page}&page={n}>; rel="{rel}"' for n, rel in links)))
    return json_response(200, chunk, headers)


def _commit_json(repo: GitRepo, sha: str, api: str, web: str, info: Optional[CommitInfo] = None) -> dict:
    info = info or repo.commit(sha)
    full = repo.full_name
    return {
        "sha": info.sha,
        "url": f"{api}/repos/{full}/commits/{info.sha}",
        "html_url": f"{web}/{full}/commit/{info.sha}",
        "commit": {
            "message": info.message,
            "tree": {"sha": info.tree},
            "author": {"name": info.author_name, "email": info.author_email,
                       "date": info.author_date},
            "committer": {"name": info.committer_name, "email": info.committer_email,
                          "date": info.committer_date},
        },
        "parents": [{"sha": p, "url": f"{api}/repos/{full}/commits/{p}"} for p in info.parents],
    }


_FILE_STATUS = {"A": "added", "D": "removed", "M": "modified", "T": "changed"}


def _compare(repo: GitRepo, basehead: str, qs: Dict[str, List[str]], api: str, web: str) -> Response:
    """``compare/{base}...{head}`` with GitHub's semantics: ``status`` is ``identical``, ``ahead`` (head has
    commits base lacks), ``behind`` (head is an ancestor of base) or ``diverged``; ``commits`` are
    ``git log base..head``, oldest first; ``files`` the diff from the merge base to head."""
    base_ref, sep, head_ref = basehead.partition("...")
    if not sep or not base_ref or not head_ref or ":" in base_ref + head_ref:  # cross-fork "user:ref": not served
        return api_error(404, "Not Found")
    try:
        base = repo.resolve(base_ref, ambiguous="branch").sha
        head = repo.resolve(head_ref, ambiguous="branch").sha
    except (AmbiguousRef, RefNotFound):
        return api_error(404, "Not Found")
    merge_base = repo.merge_base(base, head)
    if merge_base is None:
        return api_error(404, f"No common ancestor between {base_ref} and {head_ref}.")
    ahead = repo.commits_between(base, head)
    behind_by = repo.count_between(head, base)
    status = ("identical" if base == head else "behind" if not ahead else "ahead" if merge_base == base
              else "diverged")
    paged = "per_page" in qs or "page" in qs
    headers: List[Tuple[str, str]] = []
    if paged:
        per_page = min(_int_param(qs, "per_page", DEFAULT_PER_PAGE), MAX_PER_PAGE)
        page = _int_param(qs, "page", 1)
        shown = ahead[(page - 1) * per_page: page * per_page]
        last = max(1, -(-len(ahead) // per_page))
        url = f"{api}/repos/{repo.full_name}/compare/{quote(basehead, safe='/.')}"
        links = ([(page + 1, "next"), (last, "last")] if page < last else []) + \
                ([(1, "first"), (min(page - 1, last), "prev")] if page > 1 else [])
        if links:
            headers.append(("Link", ", ".join(f'<{url}?per_page={per_page}&page={n}>; rel="{rel}"' for n, rel in links)))
        with_files = page == 1
    else:
        shown, with_files = ahead[-COMPARE_MAX_COMMITS:], True
    infos = {info.sha: info for info in repo.commits([base, merge_base, *shown])}
    full = repo.full_name
    path = f"{full}/compare/{quote(base_ref, safe='/')}...{quote(head_ref, safe='/')}"
    data = {
        "url": f"{api}/repos/{path}",
        "html_url": f"{web}/{path}",
        "permalink_url": f"{web}/{full}/compare/{repo.owner}:{base}...{repo.owner}:{head}",
        "diff_url": f"{web}/{path}.diff",
        "patch_url": f"{web}/{path}.patch",
        "base_commit": _commit_json(repo, base, api, web, infos[base]),
        "merge_base_commit": _commit_json(repo, merge_base, api, web, infos[merge_base]),
        "status": status,
        "ahead_by": len(ahead),
        "behind_by": behind_by,
        "total_commits": len(ahead),
        "commits": [_commit_json(repo, sha, api, web, infos[sha]) for sha in shown],
    }
    if with_files:
        data["files"] = [{
            "sha": change.blob, "filename": change.path, "status": _FILE_STATUS.get(change.status, "changed"),
            "additions": change.additions, "deletions": change.deletions,
            "changes": change.additions + change.deletions,
            "blob_url": f"{web}/{full}/blob/{head}/{quote(change.path)}",
            "raw_url": f"{web}/{full}/raw/{head}/{quote(change.path)}",
            "contents_url": f"{api}/repos/{full}/contents/{quote(change.path)}?ref={head}",
        } for change in repo.changed_files(merge_base, head)[:COMPARE_MAX_FILES]]
    return json_response(200, data, headers)


def handle(site: Site, parts: List[str], raw_rest: str, query: str, web: str) -> Response:
    """Answer ``/api/<parts...>``; ``raw_rest`` is the still-encoded path after the action."""
    api = web + "/api"
    if len(parts) < 3 or parts[0] != "repos":
        return api_error(404, "Not Found")
    repo = find_repo(site.root, parts[1], parts[2])
    if repo is None:
        return api_error(404, "Not Found")
    full = repo.full_name
    action = parts[3] if len(parts) > 3 else ""
    rest = "/".join(parts[4:])
    qs = parse_qs(query)
    if not action:
        return json_response(200, _repo_json(repo, api, web))
    if action in ("branches", "tags") and not rest:
        branches, tags = repo.refs()
        refs = branches if action == "branches" else tags
        items = []
        for name, sha in sorted(refs.items()):
            item = {"name": name,
                    "commit": {"sha": sha, "url": f"{api}/repos/{full}/commits/{sha}"}}
            if action == "branches":
                item["protected"] = False
            else:
                item["zipball_url"] = f"{api}/repos/{full}/zipball/refs/tags/{quote(name)}"
                item["tarball_url"] = f"{api}/repos/{full}/tarball/refs/tags/{quote(name)}"
            items.append(item)
        return _paged(items, qs, f"{api}/repos/{full}/{action}")
    if action == "commits" and rest:
        try:
            resolved = repo.resolve(rest, ambiguous="branch")
        except AmbiguousRef:
            return api_error(422, f"No commit found for SHA: {rest} (ambiguous)")
        except RefNotFound:
            return api_error(404, f"No commit found for SHA: {rest}")
        return json_response(200, _commit_json(repo, resolved.sha, api, web))
    if action == "compare" and rest:
        return _compare(repo, rest, qs, api, web)
    if action == "zipball":
        return web_routes.zipball(repo, rest, raw_rest, parts[1], parts[2], web)
    return api_error(404, "Not Found")
