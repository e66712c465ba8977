"""The REST API subset (``/api/...``): repository, branches, tags, commits, API zipball."""
from __future__ import annotations

import zlib
from typing import Dict, List, Tuple
from urllib.parse import parse_qs, quote

from flowhub.server.git import AmbiguousRef, GitRepo, RefNotFound, find_repo
from flowhub.server import web as web_routes
from flowhub.server.responses import Response, api_error, json_response
from flowhub.server.site import Site

DEFAULT_PER_PAGE = 30
MAX_PER_PAGE = 100


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


def _commit_json(repo: GitRepo, sha: str, api: str, web: str) -> dict:
    info = repo.commit(sha)
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
    if action == "zipball":
        return web_routes.zipball(repo, rest, raw_rest, parts[1], parts[2], web)
    return api_error(404, "Not Found")
