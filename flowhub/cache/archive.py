"""Safe zip extraction: every member checked before a byte is written.

Rejected: absolute paths, drive letters, ``..`` components, and symbolic links whose target leaves
the extraction folder. Zip CRCs are checked while extracting, so a corrupt archive fails here and
is never published.
"""
from __future__ import annotations

import os
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


def check_expansion(infos: List[zipfile.ZipInfo], path: str, max_bytes: Optional[int] = None,
                    max_ratio: Optional[float] = None) -> int:
    """The bytes ``infos`` expand to; :class:`ArchiveError` (a zip bomb) if over ``max_bytes`` or more
    than ``max_ratio`` times the archive's size. The sizes a zip declares bind: ``zipfile`` never
    yields more than a member's declared size, and fails on a CRC mismatch."""
    total = sum(info.file_size for info in infos)
    if max_bytes is not None and total > max_bytes:
        raise ArchiveError(f"{path} would expand to {total} bytes, over the limit of {max_bytes}; refusing it.")
    packed = max(os.path.getsize(path), 1)
    if max_ratio is not None and total > max_ratio * packed and total > 1 << 20:
        raise ArchiveError(f"{path} would expand {total / packed:.0f}-fold ({packed} -> {total} bytes), over "
                           f"the limit of {max_ratio:g}x; refusing it (a zip bomb?).")
    return total


def extract_zip(path: str, dest: str, what: str = "Extracting", max_bytes: Optional[int] = None,
                max_ratio: Optional[float] = None) -> List[str]:
    """Extract ``path`` into the existing folder ``dest``; return the member paths written.

    Folders and files first, each opened with ``O_NOFOLLOW | O_EXCL`` (never through a link, never twice),
    then the links; once all exist, every link must resolve inside ``dest``. Checking each link only when
    it is made is not enough: a link through a name that a later link fills in changes meaning.
    ``max_bytes`` / ``max_ratio`` bound what it expands to (see :func:`check_expansion`).
    """
    dest_real = os.path.realpath(dest)
    written: List[str] = []
    links = []
    with open_zip(path, what) as zf:
        infos = zf.infolist()
        for info in infos:
            _safe_member_path(info.filename, path)  # validate every name before writing anything
        check_expansion(infos, path, max_bytes, max_ratio)
        try:
            for info in infos:
                rel = _safe_member_path(info.filename, path)
                if not rel:
                    continue
                target = os.path.join(dest_real, *rel.split("/"))
                if info.is_dir():
                    os.makedirs(target, exist_ok=True)
                    continue
                if _is_symlink(info):
                    link = zf.read(info).decode("utf-8")
                    if link.startswith("/") or re.match(r"^[A-Za-z]:", link):
                        raise ArchiveError(f"{path}: link {info.filename!r} -> {link!r} is absolute; refusing it.")
                    links.append((rel, target, link))
                    continue
                os.makedirs(os.path.dirname(target), exist_ok=True)
                mode = 0o777 if (info.external_attr >> 16) & 0o111 else 0o666
                try:
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
                except FileExistsError:
                    raise ArchiveError(f"{path}: member {info.filename!r} appears twice; refusing the archive.") from None
                with zf.open(info) as src, os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written.append(rel)
        except zipfile.BadZipFile as exc:
            raise ArchiveError(f"{what}: {path} is corrupt ({exc}).") from None
    for rel, target, link in links:
        if not _inside(os.path.realpath(os.path.dirname(target)), dest_real):  # through an earlier link
            raise ArchiveError(f"{path}: link {rel!r} would be created outside the archive's folder; refusing it.")
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(link, target)
        except FileExistsError:
            raise ArchiveError(f"{path}: link {rel!r} collides with another member; refusing the archive.") from None
        written.append(rel)
    for rel, target, link in links:
        if not _inside(os.path.realpath(target), dest_real):
            raise ArchiveError(f"{path}: link {rel!r} -> {link!r} leads outside the archive's folder; refusing it.")
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
