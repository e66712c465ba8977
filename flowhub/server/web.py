"""The github.com web routes: repo page, ``tree/<ref>``, ``zipball/<ref>`` and codeload archives."""
from __future__ import annotations

import html
from typing import Mapping
from urllib.parse import quote

from flowhub.server.git import AmbiguousRef, GitRepo, RefNotFound
from flowhub.server.responses import HTML_TYPE, Response, html_response, not_found, redirect
from flowhub.server.site import Site
from flowhub.server.static import file_response


def repo_page(repo: GitRepo) -> Response:
    """200 for ``/<owner>/<repo>``."""
    return html_response(200, repo.full_name, f"default branch: {repo.default_branch()}")


def tree(repo: GitRepo, ref: str) -> Response:
    """200 if ``ref`` (optionally followed by a path inside it) exists, else 404."""
    ref = ref.strip("/")
    if not ref:
        return not_found()
    try:
        resolved = repo.resolve(ref, ambiguous="branch")
        return html_response(200, f"{repo.full_name} at {ref}", resolved.sha)
    except (RefNotFound, AmbiguousRef):
        pass
    # GitHub also accepts tree/<ref>/<path>: try each split of the ref, longest first.
    pieces = ref.split("/")
    for cut in range(len(pieces) - 1, 0, -1):
        head, path = "/".join(pieces[:cut]), "/".join(pieces[cut:])
        try:
            resolved = repo.resolve(head, ambiguous="branch")
        except (RefNotFound, AmbiguousRef):
            continue
        if repo.has_path(resolved.sha, path):
            return html_response(200, f"{repo.full_name} at {head}: {path}", resolved.sha)
    return not_found()


def _multiple_choices(repo: GitRepo, ref: str, base: str) -> Response:
    choices = "".join(
        f'<li><a href="{html.escape(base)}/{quote(kind)}/{quote(ref)}">'
        f"{kind}/{html.escape(ref)}</a></li>"
        for kind in ("refs/heads", "refs/tags")
    )
    page = (
        f"<!DOCTYPE html>\n<html><head><title>Multiple Choices</title></head><body>"
        f"<p>{html.escape(ref)} is both a branch and a tag of {html.escape(repo.full_name)}:</p>"
        f"<ul>{choices}</ul></body></html>\n"
    )
    return Response(300, [("Content-Type", HTML_TYPE)], page.encode())


def zipball(repo: GitRepo, ref: str, raw_ref: str, owner_seg: str, repo_seg: str,
            web: str) -> Response:
    """302 to the codeload URL; 300 if ``ref`` is both a branch and a tag; 404 if unknown.

    ``raw_ref`` is the ref as it appeared (still percent-encoded) in the request path; an
    empty ref means the default branch.
    """
    if not ref:
        ref = repo.default_branch()
        raw_ref = quote(ref)
    try:
        repo.resolve(ref)
    except AmbiguousRef as exc:
        if exc.kind == "name":
            return _multiple_choices(repo, ref, f"{web}/{owner_seg}/{repo_seg}/zipball")
        return not_found()
    except RefNotFound:
        return not_found()
    return redirect(f"{web}/_codeload/{owner_seg}/{repo_seg}/legacy.zip/{raw_ref}")


def codeload(site: Site, repo: GitRepo, ref: str, req: Mapping[str, str], web: str) -> Response:
    """The zip of ``ref``: top folder ``{owner}-{repo}-{sha7}/``, comment = full SHA."""
    if not ref:
        ref = repo.default_branch()
    try:
        resolved = repo.resolve(ref)
    except AmbiguousRef as exc:
        if exc.kind == "name":
            return _multiple_choices(repo, ref, f"{web}/_codeload/{repo.full_name}/legacy.zip")
        return not_found()
    except RefNotFound:
        return not_found()
    path = site.archives.zip_path(repo, resolved.sha)
    name = repo.archive_prefix(resolved.sha).rstrip("/") + ".zip"
    return file_response(
        path, req, etag=f'"{resolved.sha}"', content_type="application/zip",
        extra=(("Content-Disposition", f"attachment; filename={name}"),),
    )
