"""Safe extraction, member by member, with hand-made hostile zips."""
import os
import stat
import zipfile

import pytest

from flowhub.cache.archive import extract_zip
from flowhub.errors import ArchiveError


def _link(zf, name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


def _zip(tmp_path, build):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        build(zf)
    out = tmp_path / "out"
    out.mkdir()
    return path, out


def test_link_created_through_an_outside_link_is_refused_before_it_exists(tmp_path):
    path, out = _zip(tmp_path, lambda zf: (_link(zf, "d", ".."), _link(zf, "d/x", "y"), _link(zf, "d/sub/z", "y")))
    with pytest.raises(ArchiveError, match="outside"):
        extract_zip(str(path), str(out))
    assert sorted(os.listdir(tmp_path)) == ["a.zip", "out"]  # nothing was created next to 'out'


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_duplicate_member_is_refused(tmp_path):
    def build(zf):
        zf.writestr("f", b"one")
        zf.writestr("f", b"two")
    path, out = _zip(tmp_path, build)
    with pytest.raises(ArchiveError, match="twice"):
        extract_zip(str(path), str(out))


def test_links_inside_and_executable_bits_are_kept(tmp_path):
    def build(zf):
        info = zipfile.ZipInfo("pkg/run.sh")
        info.external_attr = (stat.S_IFREG | 0o755) << 16
        zf.writestr(info, b"#!/bin/sh\n")
        zf.writestr("pkg/data.txt", b"data")
        _link(zf, "pkg/alias.txt", "data.txt")
    path, out = _zip(tmp_path, build)
    assert sorted(extract_zip(str(path), str(out))) == ["pkg/alias.txt", "pkg/data.txt", "pkg/run.sh"]
    assert (out / "pkg" / "alias.txt").read_text() == "data"
    assert os.stat(out / "pkg" / "run.sh").st_mode & 0o100
