"""A commit that only exists in a fork is not accepted under the parent's name (issue #9, item 5).

GitHub keeps one object store per fork network and serves any fork's commit through the parent's
archive, commits and compare URLs. The network is built here with real git: ``trusted-owner/repo``
and its fork ``attacker/repo``, whose extra commit is also in the parent's store under no ref, all
served by the loopback server. Request counts come from the server's request log.
"""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Dict, List

import pytest
import requests

import flowhub
from build_hub import git
from flowhub.net import github
from flowhub.errors import ResolveError
from flowhub.cache.provenance import LockfileDriftError

PARENT = "trusted-owner/repo"
FORK = "attacker/repo"


def _commit(work: Path, label: str) -> str:
    (work / "hubconf.py").write_text(f"def which():\n    return {label!r}\n")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", label)
    return git(work, "rev-parse", "HEAD")


@pytest.fixture(scope="module")
def net(hub_root, tmp_path_factory) -> Dict[str, str]:
    """``trusted-owner/repo``: main c1 - c2 - c3; branch ``release`` = c1 - r1; tag ``v1`` = c1 - t1 - t2.
    ``attacker/repo`` (its fork): main c3 - f1, with f1's objects also in the parent's store, under no ref."""
    tmp = tmp_path_factory.mktemp("network")
    work = tmp / "work"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    shas = {"c1": _commit(work, "c1"), "c2": _commit(work, "c2"), "c3": _commit(work, "c3")}
    git(work, "checkout", "-q", "-b", "release", shas["c1"])
    shas["r1"] = _commit(work, "r1")
    git(work, "checkout", "-q", "-b", "tagging", shas["c1"])
    shas["t1"], shas["t2"] = _commit(work, "t1"), _commit(work, "t2")
    git(work, "tag", "v1")
    git(work, "checkout", "-q", "main")
    git(work, "branch", "-q", "-D", "tagging")
    parent = hub_root / "trusted-owner" / "repo.git"
    fork = hub_root / "attacker" / "repo.git"
    for path in (parent, fork):
        if path.exists():
            shutil.rmtree(path)
    git(tmp, "clone", "-q", "--bare", str(work), str(parent))
    git(tmp, "clone", "-q", "--bare", str(parent), str(fork))
    fork_work = tmp / "fork-work"
    git(tmp, "clone", "-q", str(fork), str(fork_work))
    shas["f1"] = _commit(fork_work, "f1")
    git(fork_work, "push", "-q", "origin", "main")
    # GitHub's shared object network: the fork's commit is in the parent's store, reachable from no ref
    git(parent, "fetch", "-q", str(fork), "main:refs/network/fork")
    git(parent, "update-ref", "-d", "refs/network/fork")
    assert shas["f1"] not in git(parent, "for-each-ref")
    assert git(parent, "cat-file", "-t", shas["f1"]) == "commit"
    return shas


def api_requests(gh) -> List[str]:
    return [r.path for r in gh.requests if r.path.startswith("/api/")]


def assert_nothing_cached(hub_dir: Path) -> None:
    """No checkout folder, no ref/entry record, no staging folder for the parent."""
    assert not [p.name for p in hub_dir.glob("trusted-owner_repo*")]
    for sub in ("refs", "entries", "tmp"):
        folder = hub_dir / ".flowhub" / sub
        assert not folder.exists() or not list(folder.iterdir()), sub


# -- the server behaves like GitHub here ------------------------------------------------------
def test_parent_urls_serve_the_fork_commit(gh, net):
    api = f"{gh.api_url}/repos/{PARENT}"
    assert requests.get(f"{api}/commits/{net['f1']}", timeout=10).json()["sha"] == net["f1"]
    archive = requests.get(f"{gh.url}/{PARENT}/zipball/{net['f1']}", timeout=10)
    assert archive.status_code == 200
    with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
        assert zf.comment.decode() == net["f1"]
        assert zf.read(f"trusted-owner-repo-{net['f1'][:7]}/hubconf.py").decode().endswith("return 'f1'\n")
    listed = [e["commit"]["sha"] for kind in ("branches", "tags") for e in requests.get(f"{api}/{kind}", timeout=10).json()]
    assert net["f1"] not in listed  # only branches and tags say what belongs to the repo


def test_compare_api_statuses_and_shape(gh, net):
    api = f"{gh.api_url}/repos/{PARENT}/compare"

    def cmp(basehead: str, **params) -> dict:
        r = requests.get(f"{api}/{basehead}", params=params, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    behind = cmp(f"main...{net['c1']}")
    assert (behind["status"], behind["ahead_by"], behind["behind_by"], behind["total_commits"]) == ("behind", 0, 2, 0)
    assert behind["merge_base_commit"]["sha"] == net["c1"] and behind["base_commit"]["sha"] == net["c3"]
    assert behind["commits"] == [] and behind["files"] == []
    assert cmp(f"main...{net['c3'][:8]}")["status"] == "identical"
    ahead = cmp(f"{net['c1']}...main")
    assert (ahead["status"], ahead["ahead_by"], ahead["behind_by"]) == ("ahead", 2, 0)
    assert [c["sha"] for c in ahead["commits"]] == [net["c2"], net["c3"]]  # git log base..head, oldest first
    [changed] = ahead["files"]
    assert (changed["filename"], changed["status"], changed["additions"], changed["deletions"]) == \
        ("hubconf.py", "modified", 1, 1)
    diverged = cmp("main...release")
    assert (diverged["status"], diverged["ahead_by"], diverged["behind_by"]) == ("diverged", 1, 2)
    assert diverged["merge_base_commit"]["sha"] == net["c1"]
    assert diverged["url"].endswith(f"/repos/{PARENT}/compare/main...release")
    # a fork's commit is compared through the parent, as GitHub does (one object store per network)
    fork = cmp(f"main...{net['f1'][:10]}")
    assert (fork["status"], fork["commits"][-1]["sha"]) == ("ahead", net["f1"])
    # paging: chronological pages with a Link header; files only on page 1
    r = requests.get(f"{api}/{net['c1']}...main", params={"per_page": 1, "page": 2}, timeout=10)
    assert [c["sha"] for c in r.json()["commits"]] == [net["c3"]] and "files" not in r.json()
    assert 'rel="prev"' in r.headers["Link"] and 'rel="next"' not in r.headers["Link"]
    for missing in (f"main...{'0' * 40}", "main...nope", "nope...main", "main..release", f"main...attacker:{net['f1']}"):
        r = requests.get(f"{api}/{missing}", timeout=10)
        assert r.status_code == 404 and r.json()["message"] == "Not Found", missing


def test_compare_unrelated_histories_is_404(gh, hub_root, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    _commit(work, "one")
    git(work, "checkout", "-q", "--orphan", "other")
    _commit(work, "two")
    bare = hub_root / "unrelated" / "repo.git"
    if bare.exists():
        shutil.rmtree(bare)
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    r = requests.get(f"{gh.api_url}/repos/unrelated/repo/compare/main...other", timeout=10)
    assert r.status_code == 404 and r.json()["message"] == "No common ancestor between main and other."


# -- what flowhub accepts -------------------------------------------------------------------------
@pytest.mark.parametrize("length", [40, 10])
def test_fork_only_sha_is_refused_and_nothing_is_cached(gh, net, hub_dir, length):
    ref = net["f1"][:length]
    with pytest.raises(ValueError) as info:
        flowhub.load(f"{PARENT}:{ref}", "which", trust_repo=True)
    message = str(info.value)
    assert isinstance(info.value, ResolveError)
    assert PARENT in message and net["f1"] in message and "forked repo" in message and "skip_validation" in message
    assert_nothing_cached(hub_dir)
    assert gh.count("zipball") == gh.count("legacy.zip") == 0  # nothing downloaded
    # the repo, one compare with main, the branch and tag lists, one compare per other head (release, v1)
    assert api_requests(gh) == [
        f"/api/repos/{PARENT}", f"/api/repos/{PARENT}/compare/main...{ref}",
        f"/api/repos/{PARENT}/branches", f"/api/repos/{PARENT}/tags",
        f"/api/repos/{PARENT}/compare/{net['r1']}...{ref}", f"/api/repos/{PARENT}/compare/{net['t2']}...{ref}"]
    assert len(api_requests(gh)) <= 2 + 1 + 1 + github.MAX_HEAD_COMPARES
    # refused again (nothing remembered that would let it through), and by list/help too
    with pytest.raises(ResolveError):
        flowhub.list(f"{PARENT}:{ref}", trust_repo=True)
    assert_nothing_cached(hub_dir)


def test_skip_validation_loads_the_fork_sha(gh, net):
    assert flowhub.load(f"{PARENT}:{net['f1']}", "which", trust_repo=True, skip_validation=True) == "f1"
    assert api_requests(gh) == []


def test_sha_deep_on_the_default_branch_costs_two_requests_cold_none_warm(gh, net, hub_dir, tmp_path):
    c1 = net["c1"]
    assert flowhub.load(f"{PARENT}:{c1}", "which", trust_repo=True) == "c1"
    assert api_requests(gh) == [f"/api/repos/{PARENT}", f"/api/repos/{PARENT}/compare/main...{c1}"]
    assert gh.count(f"/{PARENT}/zipball/{c1}") == 1
    # warm: fetching the same commit again (force_reload, a folder removed) needs no API request
    for kwargs in ({"force_reload": True}, {}):
        shutil.rmtree(hub_dir / f"trusted-owner_repo_{c1}", ignore_errors=not kwargs)
        gh.clear_log()
        assert flowhub.list(f"{PARENT}:{c1}", **kwargs) == ["which"]
        assert api_requests(gh) == [] and gh.count("zipball") == 1
    # abbreviated: resolved to the full SHA of the named repo, fetched by it; cached under the reference's name
    hub = flowhub.Hub(hub_dir=tmp_path / "fresh")
    gh.clear_log()
    assert hub.load(f"{PARENT}:{c1[:8]}", "which", trust_repo=True) == "c1"
    assert hub.last_provenance.sha == c1
    assert (tmp_path / "fresh" / f"trusted-owner_repo_{c1[:8]}" / "hubconf.py").is_file()
    assert api_requests(gh) == [f"/api/repos/{PARENT}", f"/api/repos/{PARENT}/compare/main...{c1[:8]}"]
    assert [r.path for r in gh.requests if "/zipball/" in r.path] == [f"/{PARENT}/zipball/{c1}"]
    gh.clear_log()
    assert hub.load(f"{PARENT}:{c1[:10]}", "which") == "c1"  # another spelling of a checked commit
    assert api_requests(gh) == []


@pytest.mark.parametrize("name, via, expected", [
    ("r1", "release", ["branches"]),                             # head of another branch
    ("t2", "v1", ["branches", "tags"]),                          # head of a tag
    ("t1", "v1", ["branches", "tags", "compare:r1", "compare:t2"]),  # deep on a tag only
])
def test_sha_only_on_another_branch_or_a_tag_is_accepted(gh, net, hub_dir, name, via, expected):
    sha = net[name]
    assert flowhub.list(f"{PARENT}:{sha}", trust_repo=True) == ["which"]
    tail = [f"compare/{net[e[8:]]}...{sha}" if e.startswith("compare:") else e for e in expected]
    assert api_requests(gh) == [f"/api/repos/{PARENT}", f"/api/repos/{PARENT}/compare/main...{sha}"] + \
        [f"/api/repos/{PARENT}/{t}" for t in tail]
    record = json.loads(next((hub_dir / ".flowhub" / "refs").iterdir()).read_text())
    assert record["validated"][sha]["via"] == via


def test_branch_load_fetches_the_archive_by_its_sha(gh, net, hub_dir):
    assert flowhub.load(f"{PARENT}:release", "which", trust_repo=True) == "r1"
    archive = [r.path for r in gh.requests if not r.path.startswith("/api/")]
    assert archive == [f"/{PARENT}/zipball/{net['r1']}", f"/_codeload/{PARENT}/legacy.zip/{net['r1']}"]
    record = json.loads((hub_dir / ".flowhub" / "entries" / "trusted-owner_repo_release.json").read_text())
    assert (record["ref"], record["sha"]) == ("release", net["r1"])


# -- lockfiles --------------------------------------------------------------------------------------
def _lockfile(path: Path, key: str, sha: str) -> Path:
    path.write_text(json.dumps({"version": 1, "repos": {key: {"sha": sha}}, "weights": {}}))
    return path


@pytest.mark.parametrize("key", [PARENT, f"{PARENT}:main"])
def test_lockfile_pinning_a_fork_sha_is_refused(gh, net, hub_dir, tmp_path, key):
    lock = _lockfile(tmp_path / "flowhub.lock", key, net["f1"])
    with pytest.raises(ResolveError, match=net["f1"]):
        flowhub.Hub(lockfile=lock).load(key, "which", trust_repo=True)
    assert_nothing_cached(hub_dir)
    assert gh.count("zipball") == 0
    # skip_validation=True skips the check for pinned commits too
    assert flowhub.Hub(lockfile=lock).load(key, "which", trust_repo=True, skip_validation=True) == "f1"


def test_lockfile_pins_are_checked_on_first_fetch(gh, net, tmp_path):
    lock = tmp_path / "flowhub.lock"
    # pinned while skipping validation: a new machine with this lockfile checks the pin before fetching it
    flowhub.Hub(hub_dir=tmp_path / "a", lockfile=lock).load(f"{PARENT}:{net['f1']}", "which", trust_repo=True,
                                                            skip_validation=True)
    assert json.loads(lock.read_text())["repos"][f"{PARENT}:{net['f1']}"]["sha"] == net["f1"]
    with pytest.raises(ResolveError, match="forked repo"):
        flowhub.Hub(hub_dir=tmp_path / "b", lockfile=lock).load(f"{PARENT}:{net['f1']}", "which", trust_repo=True)
    # a pin deep on the default branch passes with two requests
    good = _lockfile(tmp_path / "good.lock", PARENT, net["c2"])
    gh.clear_log()
    assert flowhub.Hub(hub_dir=tmp_path / "c", lockfile=good).load(PARENT, "which", trust_repo=True) == "c2"
    assert api_requests(gh) == [f"/api/repos/{PARENT}", f"/api/repos/{PARENT}/compare/main...{net['c2']}"]
    # a pin that is no full SHA is refused before any request
    bad = _lockfile(tmp_path / "bad.lock", PARENT, "main")
    gh.clear_log()
    with pytest.raises(LockfileDriftError, match="not a full 40-hex-digit commit SHA"):
        flowhub.Hub(hub_dir=tmp_path / "d", lockfile=bad).load(PARENT, "which", trust_repo=True)
    assert gh.requests == []


def test_compares_with_other_heads_are_bounded(gh, hub_root, hub_dir, tmp_path):
    """A SHA off the default branch costs at most 2 + the list pages + MAX_HEAD_COMPARES requests."""
    work = tmp_path / "w"
    work.mkdir()
    git(work, "init", "-q", "-b", "main")
    base = _commit(work, "base")
    deep = {}
    count = github.MAX_HEAD_COMPARES + 2
    for i in range(count):
        git(work, "checkout", "-q", "-b", f"b{i:02d}", base)
        deep[i] = _commit(work, f"deep{i}")
        _commit(work, f"head{i}")
    git(work, "checkout", "-q", "main")
    bare = hub_root / "many-heads" / "repo.git"
    if bare.exists():
        shutil.rmtree(bare)
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    # deep on the 5th other branch: found by its 5th compare
    assert flowhub.list(f"many-heads/repo:{deep[4]}", trust_repo=True) == ["which"]
    assert len(api_requests(gh)) == 2 + 1 + 1 + 5
    # deep on the last branch, beyond the bound: refused, saying the other heads were not all checked
    gh.clear_log()
    with pytest.raises(ResolveError, match=f"first {github.MAX_HEAD_COMPARES} of its {count} other"):
        flowhub.list(f"many-heads/repo:{deep[count - 1]}", trust_repo=True)
    assert len(api_requests(gh)) == 2 + 1 + 1 + github.MAX_HEAD_COMPARES
    # skip_validation=True is the way out, as the message says
    assert flowhub.list(f"many-heads/repo:{deep[count - 1]}", skip_validation=True) == ["which"]
