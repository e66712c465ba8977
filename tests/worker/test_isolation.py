"""Isolation through the public API: the default mode runs each repo@ref in its own worker."""
from __future__ import annotations

import sys
from pathlib import Path

import oneflow as flow
import pytest

import flowhub
from conftest import make_repo

REPO = "flowhub-examples/tiny-models"
REPOS = Path(__file__).parent / "worker_repos"


def test_default_mode_is_rebuild_and_loads_two_refs_side_by_side(gh):
    assert flowhub.Hub().settings().mode == "rebuild"
    modules_before, path_before = set(sys.modules), list(sys.path)
    old = flowhub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    new = flowhub.load(f"{REPO}:v0.2", "tinynet", pretrained=True, trust_repo=True)
    assert old.features[4].weight.shape == (16, 8, 3, 3) and new.features[4].weight.shape == (16, 8, 5, 5)
    assert flowhub.load(f"{REPO}:v0.1", "version") == "0.1" and flowhub.load(f"{REPO}:v0.2", "version") == "0.2"
    added = set(sys.modules) - modules_before
    assert not any(name == "tinymodels" or name.startswith("tinymodels.") or "hubconf" in name for name in added)
    assert sys.path == path_before
    x = flow.ones(1, 3, 32, 32)
    assert old(x).shape == new(x).shape == (1, 10)


def test_mode_from_environment_and_inprocess_keeps_the_reference_behaviour(gh, monkeypatch):
    monkeypatch.setenv("FLOWHUB_MODE", "inprocess")
    assert flowhub.Hub().settings().mode == "inprocess"
    make_repo(gh.root, "iso", "where", {"hubconf.py": "import os\ndef pid():\n    return os.getpid()\n"})
    import os

    assert flowhub.load("iso/where", "pid", trust_repo=True) == os.getpid()
    monkeypatch.setenv("FLOWHUB_MODE", "rebuild")
    assert flowhub.load("iso/where", "pid") != os.getpid()


def test_worker_errors_keep_types_and_name_the_call(gh, tmp_path):
    make_repo(gh.root, "iso", "errors", {"hubconf.py": (
        "def bad_value():\n    raise ValueError('no good value')\n"
        "def crash():\n    import os\n    os._exit(7)\n"
        "def hang():\n    import time\n    time.sleep(60)\n")})
    hub = flowhub.Hub(worker_timeout=3)
    with pytest.raises(ValueError, match="no good value") as info:
        hub.load("iso/errors", "bad_value", trust_repo=True)
    assert "iso/errors" in str(info.value) and "bad_value" in str(info.value)
    with pytest.raises(flowhub.WorkerCrashedError, match="exited with code 7"):
        hub.load("iso/errors", "crash")
    with pytest.raises(flowhub.WorkerTimeoutError, match="hang"):
        hub.load("iso/errors", "hang")
    with pytest.raises(RuntimeError, match="Cannot find callable nope"):
        hub.load("iso/errors", "nope")
    assert hub.load(str(REPOS / "v1"), "version", source="local") is not None  # the caller is fine


def test_worker_timeout_from_environment(gh, monkeypatch):
    make_repo(gh.root, "iso", "slow", {"hubconf.py": "def hang():\n    import time\n    time.sleep(60)\n"})
    monkeypatch.setenv("FLOWHUB_WORKER_TIMEOUT", "2")
    with pytest.raises(flowhub.WorkerTimeoutError, match="FLOWHUB_WORKER_TIMEOUT"):
        flowhub.load("iso/slow", "hang", trust_repo=True)


def test_mock_torch_hub_setting(monkeypatch):
    hub = flowhub.Hub(mock_torch=True)
    model = hub.load(str(REPOS / "torchstyle"), "tiny", source="local")
    assert type(model).__name__ == "TinyNet" and model(flow.ones(3, 4)).shape == (3, 2)
    assert "torch" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        flowhub.Hub().load(str(REPOS / "torchstyle"), "tiny", source="local")


def test_weights_fetched_in_the_worker_use_the_shared_cache(gh, hub_dir, example):
    hub = flowhub.Hub()
    hub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    name = example["weights"]["v0.1"]["tinynet"]
    assert (hub_dir / "checkpoints" / name).is_file()
    assert [w["file"] for w in hub.last_provenance.weights] == [name]
    gh.clear_log()
    hub.load(f"{REPO}:v0.1", "tinynet", pretrained=True)
    assert gh.requests == []
