"""Safe zip extraction: every member checked before a byte is written.

Rejected: absolute paths, drive letters, ``..`` components, and symbolic links whose target leaves
the extraction folder. Zip CRCs are checked while extracting, so a corrupt archive fails here and
is never published.
"""
from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import zipfile
from typing import List, Optional

from flowhub.errors import ArchiveError

_SHA1 = re.compile(r"^[0-9a-f]{40}$")


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _safe_member_path(name: str, archive: str) -> str:
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refusing to extract it.")
    parts = [p for p in normalized.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"{archive}: member {name!r} would be written outside its folder ('..'); refusing to extract it.")
    return "/".join(parts)


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def open_zip(path: str, what: str) -> zipfile.ZipFile:
    """Open a zip archive, with an error that says what was expected when it is not one."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        with open(path, "rb") as f:
            head = f.read(256).lstrip().lower()
        hint = " The server sent an HTML page (a proxy, captive portal or error page?)." \
            if head.startswith((b"<!doctype", b"<html")) else ""
        raise ArchiveError(f"{what}: {path} is not a valid zip archive.{hint}") from None


def extract_zip(path: str, dest: str, what: str = "Extracting") -> List[str]:
    """Extract ``path`` into the existing folder ``dest``; return the member paths written."""
    dest_real = os.path.realpath(dest)
    written: List[str] = []
    with open_zip(path, what) as zf:
        infos = zf.infolist()
        for info in infos:
            _safe_member_path(info.filename, path)  # validate everything before writing anything
        try:
            for info in infos:
                rel = _safe_member_path(info.filename, path)
                if not rel:
                    continue
                target = os.path.join(dest_real, *rel.split("/"))
                # Resolve through links extracted earlier: 'd -> .' then 'd/e -> ../..' must not lead outside.
                if not _inside(os.path.realpath(os.path.dirname(target)), dest_real):
                    raise ArchiveError(f"{path}: member {info.filename!r} would be written through a link "
                                       "outside the archive's folder; refusing it.")
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if _is_symlink(info):
                    link = zf.read(info).decode("utf-8")
                    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), link))
                    real = os.path.realpath(os.path.join(os.path.dirname(target), link))
                    if link.startswith("/") or resolved == ".." or resolved.startswith("../") \
                            or not _inside(real, dest_real):
                        raise ArchiveError(f"{path}: link {info.filename!r} -> {link!r} points outside the archive; refusing it.")
                    os.symlink(link, target)
                else:
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                    mode = (info.external_attr >> 16) & 0o777
                    if mode & 0o111:
                        os.chmod(target, os.stat(target).st_mode | 0o111)
                written.append(rel)
        except zipfile.BadZipFile as exc:
            raise ArchiveError(f"{what}: {path} is corrupt ({exc}).") from None
    return written


def top_folder(members: List[str]) -> Optional[str]:
    """The single top-level folder that every member lives in, or None."""
    tops = {m.split("/", 1)[0] for m in members}
    if len(tops) == 1 and all("/" in m for m in members):
        return tops.pop()
    return None


def commit_sha_of(path: str) -> Optional[str]:
    """The commit SHA that ``git archive`` (and so GitHub) stores as the zip comment, if present."""
    try:
        with zipfile.ZipFile(path) as zf:
            comment = zf.comment.decode("ascii", "replace").strip()
    except (OSError, zipfile.BadZipFile):
        return None
    return comment if _SHA1.match(comment) else None
