"""Static files under ROOT: safe path lookup, ETag/Last-Modified, conditional and Range requests."""
from __future__ import annotations

import email.utils
import mimetypes
import os
import re
import stat
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union
from urllib.parse import unquote

from flowhub.server.git import is_git_dir
from flowhub.server.responses import FileBody, Response

_RANGE = re.compile(r"^(\d*)-(\d*)$")
UNSATISFIABLE = "unsatisfiable"


def lookup(root: Path, raw_path: str) -> Optional[Path]:
    """The regular file ``raw_path`` names under ``root``, or None if it is missing or unsafe.

    Rejects ``..`` (also percent-encoded), NUL bytes, anything inside a ``.git`` or bare
    repository directory, and symlinks that resolve outside ``root``.
    """
    parts = []
    for raw in raw_path.split("/"):
        seg = unquote(raw, errors="surrogateescape") if "%" in raw else raw
        if not seg or seg == ".":
            continue
        if seg == ".." or "/" in seg or "\0" in seg or seg.casefold() == ".git":
            return None
        parts.append(seg)
    if not parts:
        return None
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(real_root.joinpath(*parts)))
    try:
        rel = real.relative_to(real_root)
    except ValueError:
        return None
    folder = real_root
    for seg in rel.parts[:-1]:
        folder = folder / seg
        if seg.casefold() == ".git" or is_git_dir(folder):
            return None
    try:
        if not stat.S_ISREG(real.stat().st_mode):
            return None
    except OSError:
        return None
    return real


def etag_for(st: os.stat_result) -> str:
    """A strong validator that changes whenever the file is replaced or rewritten."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def parse_range(value: str, size: int) -> Union[None, str, Tuple[int, int]]:
    """``(first, last)`` inclusive for one satisfiable byte range; ``UNSATISFIABLE``; or None.

    None means "ignore the header and send everything": bad syntax, other units, or several
    ranges (which this server does not serve as multipart).
    """
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _RANGE.match(spec.strip())
    if not match or match.group(0) == "-":
        return None
    first, last = match.groups()
    if not first:
        suffix = int(last)
        if suffix == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - suffix), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return start, min(end, size - 1)


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def _not_modified(req: Mapping[str, str], etag: str, mtime: float) -> bool:
    inm = req.get("If-None-Match")
    if inm is not None:
        return _etag_matches(inm, etag)
    ims = req.get("If-Modified-Since")
    if ims:
        try:
            since = email.utils.parsedate_to_datetime(ims).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
        return int(mtime) <= since
    return False


def _if_range_ok(value: Optional[str], etag: str, last_modified: str) -> bool:
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag  # strong comparison: a weak tag never matches
    return value == last_modified


def file_response(path: Path, req: Mapping[str, str], etag: Optional[str] = None,
                  content_type: Optional[str] = None,
                  extra: Tuple[Tuple[str, str], ...] = ()) -> Response:
    """200, 206, 304 or 416 for a GET/HEAD of ``path``, honouring Range and validators."""
    st = path.stat()
    size = st.st_size
    etag = etag or etag_for(st)
    last_modified = email.utils.formatdate(st.st_mtime, usegmt=True)
    ctype = content_type or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = [("Content-Type", ctype), ("Accept-Ranges", "bytes"), ("ETag", etag),
               ("Last-Modified", last_modified), *extra]
    if _not_modified(req, etag, st.st_mtime):
        return Response(304, [("ETag", etag), ("Last-Modified", last_modified)], no_body=True)
    wanted = req.get("Range")
    span = None
    if wanted and _if_range_ok(req.get("If-Range"), etag, last_modified):
        span = parse_range(wanted, size)
    if span == UNSATISFIABLE:
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Accept-Ranges", "bytes"),
                   ("ETag", etag), ("Content-Range", f"bytes */{size}")]
        return Response(416, headers, b"Requested range not satisfiable\n")
    if span is None:
        return Response(200, headers, file=FileBody(str(path), 0, size))
    start, end = span
    headers.append(("Content-Range", f"bytes {start}-{end}/{size}"))
    return Response(206, headers, file=FileBody(str(path), start, end - start + 1))
