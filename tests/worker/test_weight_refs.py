"""Weights by reference: a rebuilt model whose parameters are bytes of a cached checkpoint maps that
file (copy-on-write) instead of receiving a copy; so do in-process loads of cached checkpoints."""
from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np
import oneflow as flow
import pytest

import flowhub
from flowhub.cache import inventory
from flowhub.errors import TransferError
from flowhub.worker.host.pool import get_manager
from flowhub.worker.wire import weightrefs

from conftest import make_repo, publish_checkpoint

HUBCONF = '''
"""A pretrained model whose weights come from the hub's checkpoint cache."""
import oneflow as flow
import oneflow.hub

dependencies = ["oneflow"]


def net(url, pretrained=True):
    """Two big layers and a small one."""
    model = flow.nn.Sequential(flow.nn.Linear(256, 512), flow.nn.ReLU(), flow.nn.Linear(512, 256),
                               flow.nn.Linear(256, 4))
    if pretrained:
        model.load_state_dict(oneflow.hub.load_state_dict_from_url(url, progress=False))
    return model
'''


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def published(gh, hub_root, tmp_path):
    """A repository and its zipped checkpoint on the loopback server; returns (hub, url, expected)."""
    make_repo(hub_root, "refs", "pretrained", {"hubconf.py": HUBCONF})
    flow.manual_seed(11)
    model = flow.nn.Sequential(flow.nn.Linear(256, 512), flow.nn.ReLU(), flow.nn.Linear(512, 256),
                               flow.nn.Linear(256, 4))
    path = publish_checkpoint(hub_root, "refs", "pretrained", model.state_dict(), tmp_path)
    hub = flowhub.Hub(tmp_path / "hub", mode="rebuild")
    return hub, gh.url + path, model


def _mapped_paths() -> set:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def test_rebuilt_parameters_map_the_cached_checkpoint(published, tmp_path):
    hub, url, expected = published
    model = hub.load("refs/pretrained", "net", url, trust_repo=True)
    x = flow.randn(3, 256)
    assert np.array_equal(model(x).numpy(), expected(x).numpy())
    for (name, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
        assert np.array_equal(a.numpy(), b.numpy()), name
    extracted = str(tmp_path / "hub" / "checkpoints" / "net.zip.extracted")
    mapped = {p for p in _mapped_paths() if p.startswith(os.path.realpath(extracted))}
    assert len(mapped) == 2, mapped  # the two big weight matrices; small tensors travel as bytes
    # training the rebuilt model changes its copy-on-write pages, never the cached files
    before = {p: _sha(p) for p in mapped}
    opt = flow.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    opt.step()
    assert not np.array_equal(model[0].weight.numpy(), expected[0].weight.numpy())
    assert {p: _sha(p) for p in before} == before


def test_mapped_model_survives_its_cache_entry_being_removed(published, tmp_path):
    hub, url, expected = published
    model = hub.load("refs/pretrained", "net", url, trust_repo=True)
    hub_dir = str(tmp_path / "hub")
    entries = [e for e in inventory.scan(hub_dir) if e.kind == "weights"]
    assert [e.name for e in entries] == ["net.zip"]
    inventory.remove(hub_dir, entries[0])  # flowhub cache rm
    assert not os.path.exists(os.path.join(hub_dir, "checkpoints", "net.zip.extracted"))
    x = flow.randn(2, 256)
    assert np.array_equal(model(x).numpy(), expected(x).numpy())
    again = hub.load("refs/pretrained", "net", url, force_reload=True)  # downloads and extracts it again
    assert np.array_equal(again(x).numpy(), model(x).numpy())


def test_in_process_loads_of_cached_checkpoints_are_mapped(published, tmp_path):
    hub, url, expected = published
    state = hub.load_state_dict_from_url(url, progress=False)
    extracted = os.path.realpath(str(tmp_path / "hub" / "checkpoints" / "net.zip.extracted"))
    assert len({p for p in _mapped_paths() if p.startswith(extracted)}) == 2
    for name, tensor in expected.state_dict().items():
        assert np.array_equal(state[name].numpy(), tensor.numpy()), name
    with flow.no_grad():
        state["0.weight"].add_(1.0)  # writable (copy-on-write), the file unchanged
    assert float(state["0.weight"].numpy()[0, 0]) == pytest.approx(float(expected[0].weight.numpy()[0, 0]) + 1)
    fresh = hub.load_state_dict_from_url(url, progress=False)
    assert np.array_equal(fresh["0.weight"].numpy(), expected.state_dict()["0.weight"].numpy())


def test_references_outside_the_cache_or_of_the_wrong_size_are_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 4096)
    inside = tmp_path / "hub" / "checkpoints" / "a"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(b"\0" * 4096)
    roots = [str(tmp_path / "hub")]
    good = {"dtype": "float32", "shape": [1024], "nbytes": 4096, "offset": 0, "file": str(inside)}
    assert weightrefs.open_reference(good, roots).shape == (1024,)
    for bad, why in (({"file": str(outside)}, "outside the hub cache"),
                     ({"file": str(tmp_path / "hub" / "checkpoints" / ".." / ".." / "secret.bin")}, "outside"),
                     ({"shape": [2048], "nbytes": 8192}, "not a regular file of 8192"),
                     ({"nbytes": 4000}, "does not make"), ({"dtype": "object"}, "malformed")):
        with pytest.raises(TransferError, match=why):
            weightrefs.open_reference(dict(good, **bad), roots)
    os.symlink(str(outside), str(inside.parent / "link"))
    with pytest.raises(TransferError, match="outside the hub cache"):
        weightrefs.open_reference(dict(good, file=str(inside.parent / "link")), roots)


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    get_manager().shutdown()


def _mapped_inodes(prefix: str) -> dict:
    """path -> inode of the files under ``prefix`` this process maps (from /proc/self/maps)."""
    found = {}
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip().startswith(prefix):
                found[parts[5].strip().replace(" (deleted)", "")] = int(parts[4])
    return found


def test_replacing_a_mapped_entry_renames_it_and_never_rewrites_it(published, tmp_path, hub_root):
    """A cache entry a model maps is replaced by a new file under the same name, never written over:
    the model keeps its weights, the new load gets the new ones, and the two are different inodes."""
    hub, url, expected = published
    model = hub.load("refs/pretrained", "net", url, trust_repo=True)
    extracted = os.path.realpath(str(tmp_path / "hub" / "checkpoints" / "net.zip.extracted"))
    old = _mapped_inodes(extracted)
    assert len(old) == 2
    # the server now publishes other weights under the same name; prune the cache and load again
    flow.manual_seed(12)
    newer = flow.nn.Sequential(flow.nn.Linear(256, 512), flow.nn.ReLU(), flow.nn.Linear(512, 256),
                               flow.nn.Linear(256, 4))
    folder = tmp_path / "saved2" / "net"
    flow.save(newer.state_dict(), str(folder))
    asset = hub_root / "refs" / "pretrained" / "releases" / "download" / "v1" / "net.zip"
    with zipfile.ZipFile(asset, "w") as z:
        for root, _, files in os.walk(folder):
            for name in files:
                full = os.path.join(root, name)
                z.write(full, os.path.relpath(full, folder.parent))
    hub_dir = str(tmp_path / "hub")
    for entry in inventory.select_for_pruning(inventory.scan(hub_dir), max_size=0):  # flowhub cache prune --max-size 0
        inventory.remove(hub_dir, entry)
    again = hub.load("refs/pretrained", "net", url, force_reload=True)
    x = flow.randn(2, 256)
    assert np.array_equal(model(x).numpy(), expected(x).numpy())  # the old mapping is intact
    assert np.array_equal(again(x).numpy(), newer(x).numpy())
    now = _mapped_inodes(extracted)
    fresh = {p: inode for p, inode in now.items() if os.path.exists(p) and os.stat(p).st_ino == inode}
    assert len(fresh) == 2 and not set(fresh.values()) & set(old.values())
