"""Map a request path to a response: API, codeload, web routes, then static files."""
from __future__ import annotations

from typing import Mapping
from urllib.parse import unquote

from flowhub.server import api, web
from flowhub.server.git import find_repo
from flowhub.server.responses import Response, api_error, not_found
from flowhub.server.site import Site
from flowhub.server.static import file_response, lookup


def route(site: Site, raw_path: str, query: str, req: Mapping[str, str], base: str,
          reject_tokens: bool = False) -> Response:
    """The response to a GET/HEAD of ``raw_path`` (still percent-encoded, no query).

    ``base`` is the server's own URL as the client reached it (used in redirects and links).
    """
    if reject_tokens and "Authorization" in req:
        return api_error(401, "Bad credentials")
    raw = raw_path.lstrip("/").split("/")
    dec = [unquote(s) for s in raw]
    if dec[0] == "api":
        parts = dec[1:]
        while parts and not parts[-1]:
            parts.pop()
        return api.handle(site, parts, "/".join(raw[5:]).strip("/"), query, base)
    if dec[0] == "_codeload" and len(dec) >= 4 and dec[3] == "legacy.zip":
        repo = find_repo(site.root, dec[1], dec[2])
        if repo is None:
            return not_found()
        return web.codeload(site, repo, "/".join(dec[4:]).strip("/"), req, base)
    if len(dec) >= 2:
        repo = find_repo(site.root, dec[0], dec[1])
        if repo is not None:
            if len(dec) == 2 or (len(dec) == 3 and not dec[2]):
                return web.repo_page(repo)
            if dec[2] == "tree":
                return web.tree(repo, "/".join(dec[3:]))
            if dec[2] == "zipball":
                return web.zipball(repo, "/".join(dec[3:]).strip("/"),
                                   "/".join(raw[3:]).strip("/"), raw[0], raw[1], base)
    path = lookup(site.root, raw_path)
    if path is None:
        return not_found()
    return file_response(path, req)
