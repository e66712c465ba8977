"""Reproducible loads: provenance of every load, and a lockfile that pins commits and weight hashes."""
from __future__ import annotations

import json
import shutil

import pytest

import flowhub
from conftest import make_repo, push_commit
from flowhub.cache.provenance import LockfileDriftError

REPO = "flowhub-examples/tiny-models"

HUBCONF = """
import os
dependencies = ["oneflow"]
WHICH = {which!r}

def which():
    return WHICH

def weights():
    import oneflow.hub
    base = os.environ["FLOWHUB_GITHUB_URL"]
    return oneflow.hub.load_state_dict_from_url(base + "/lock/files/w.zip", progress=False)
"""


@pytest.fixture
def moving_repo(gh, hub_root, example):
    """lock/moving: main says 'one'; a release file w.zip (a copy of the example's tinymlp weights)."""
    make_repo(hub_root, "lock", "moving", {"hubconf.py": HUBCONF.format(which="one")})
    files = hub_root / "lock" / "files"
    files.mkdir(parents=True, exist_ok=True)
    shutil.copy(hub_root / REPO / "releases" / "download" / "v0.1" / example["weights"]["v0.1"]["tinymlp"],
                files / "w.zip")
    return hub_root


def test_provenance_of_a_load(gh, example):
    hub = flowhub.Hub()
    hub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    prov = hub.last_provenance
    assert (prov.repo, prov.ref, prov.sha, prov.entrypoint) == (REPO, "v0.1", example["tags"]["v0.1"], "tinynet")
    assert prov.kwargs == {"pretrained": True} and prov.args == []
    [w] = prov.weights
    name = example["weights"]["v0.1"]["tinynet"]
    assert w["url"].endswith(f"/releases/download/v0.1/{name}") and w["sha256"].startswith(name[8:16])
    assert prov.flowhub_version == flowhub.__version__ and prov.oneflow_version == "0.9.0"
    json.dumps(prov.as_dict())  # serialisable as is


def test_lockfile_pins_the_commit_after_the_branch_moves(moving_repo, tmp_path):
    lock = tmp_path / "flowhub.lock"
    hub = flowhub.Hub(lockfile=lock)
    assert hub.load("lock/moving", "which", trust_repo=True) == "one"
    pinned = json.loads(lock.read_text())["repos"]["lock/moving"]["sha"]
    new_sha = push_commit(moving_repo, "lock", "moving", {"hubconf.py": HUBCONF.format(which="two")})
    assert new_sha != pinned
    # A new machine (cold cache) with the lockfile still gets the pinned commit; without it, the new one.
    fresh = flowhub.Hub(hub_dir=tmp_path / "other_hub", lockfile=lock)
    assert fresh.load("lock/moving", "which", trust_repo=True) == "one"
    assert fresh.last_provenance.sha == pinned
    assert flowhub.Hub(hub_dir=tmp_path / "third_hub").load("lock/moving", "which", trust_repo=True) == "two"
    assert json.loads(lock.read_text())["repos"]["lock/moving"]["sha"] == pinned  # never rewritten


def test_lockfile_load_offline_makes_no_request(moving_repo, tmp_path, monkeypatch, gh):
    lock = tmp_path / "flowhub.lock"
    hub = flowhub.Hub(lockfile=lock)
    assert hub.load("lock/moving:main", "which", trust_repo=True) == "one"
    assert len(hub.load("lock/moving:main", "weights")) > 0
    gh.clear_log()
    monkeypatch.setenv("FLOWHUB_OFFLINE", "1")
    assert flowhub.Hub(lockfile=lock).load("lock/moving:main", "which") == "one"
    assert len(flowhub.Hub(lockfile=lock).load("lock/moving:main", "weights")) > 0
    assert gh.requests == []


def test_tampered_weights_fail_verification(moving_repo, tmp_path):
    lock = tmp_path / "flowhub.lock"
    hub = flowhub.Hub(lockfile=lock)
    hub.load("lock/moving", "weights", trust_repo=True)
    assert len(json.loads(lock.read_text())["weights"]) == 1
    # the file changes on the server: a new machine with the lockfile refuses it
    (moving_repo / "lock" / "files" / "w.zip").write_bytes(
        (moving_repo / REPO / "releases" / "download" / "v0.2" / sorted(
            p.name for p in (moving_repo / REPO / "releases" / "download" / "v0.2").iterdir())[0]).read_bytes())
    with pytest.raises(LockfileDriftError, match="do not match the lockfile"):
        flowhub.Hub(hub_dir=tmp_path / "other_hub", lockfile=lock).load("lock/moving", "weights", trust_repo=True)
    # the cached file is changed on disk: detected too
    cached = next((tmp_path / "oneflow_home" / "hub" / "checkpoints").glob("w.zip"))
    data = bytearray(cached.read_bytes())
    data[-30] ^= 0x01
    cached.write_bytes(bytes(data))
    with pytest.raises(LockfileDriftError):
        hub.load("lock/moving", "weights")


def test_ref_may_be_a_commit_sha(moving_repo, gh):
    first = make_repo(moving_repo, "lock", "shas", {"hubconf.py": HUBCONF.format(which="first")})["main"]
    push_commit(moving_repo, "lock", "shas", {"hubconf.py": HUBCONF.format(which="second")})
    # an older commit that is no branch or tag head: full and abbreviated
    assert flowhub.load(f"lock/shas:{first}", "which", trust_repo=True) == "first"
    assert flowhub.load(f"lock/shas:{first[:8]}", "which", trust_repo=True) == "first"
    assert flowhub.load("lock/shas", "which", trust_repo=True) == "second"
