"""A torchvision-style repo, written for torch.hub, loads on OneFlow with its real pretrained ``.pth``:
``Hub(mock_torch=True)`` runs its hubconf in a worker where ``torch.hub.load_state_dict_from_url`` and
``torch.load`` read torch files without torch, and the rebuilt model's big weights come back as
references to the cached ``.pth`` (mapped copy-on-write here), not as copies."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys

import numpy as np
import oneflow as flow
import pytest

import flowhub
from flowhub.worker.host.pool import get_manager

from conftest import make_repo

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "formats", "fixtures")
TINYNET = os.path.join(os.path.dirname(FIXTURES), "tinynet.py")

HUBCONF = '''
"""A torchvision-style zoo: torch code, weights published as a .pth."""
import torch
from torch.hub import load_state_dict_from_url

from tinynet import TinyNet

dependencies = ["torch"]
URL = "{url}"


def tinynet(pretrained=False, **kwargs):
    """TinyNet, optionally with its pretrained weights."""
    model = TinyNet(**kwargs)
    if pretrained:
        model.load_state_dict(load_state_dict_from_url(URL, progress=False, map_location="cpu"))
    return model.eval()


def state_of(path):
    """What torch.load gives a hubconf for a .pth file."""
    return torch.load(path, map_location=lambda storage, loc: storage, weights_only=True)
'''


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def zoo(gh, hub_root, tmp_path):
    assets = hub_root / "torchstyle" / "zoo" / "releases" / "download" / "v1"
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(FIXTURES, "tinynet.pth"), assets / "tinynet.pth")
    with open(TINYNET) as f:
        tinynet = f.read()
    url = f"{gh.url}/torchstyle/zoo/releases/download/v1/tinynet.pth"
    make_repo(hub_root, "torchstyle", "zoo", {"hubconf.py": HUBCONF.format(url=url), "tinynet.py": tinynet})
    return flowhub.Hub(tmp_path / "hub", mock_torch=True)


def test_pretrained_torch_weights_give_torchs_output(zoo, tmp_path):
    model = zoo.load("torchstyle/zoo", "tinynet", pretrained=True, trust_repo=True)
    x = flow.from_numpy(np.load(os.path.join(FIXTURES, "tinynet_input.npy")))
    want = np.load(os.path.join(FIXTURES, "tinynet_output.npy"))
    assert np.allclose(model(x).detach().numpy(), want, atol=1e-5)
    assert int(model.features[1].num_batches_tracked) == 5
    assert "torch" not in sys.modules
    cached = os.path.realpath(tmp_path / "hub" / "checkpoints" / "tinynet.pth")
    assert [w["file"] for w in zoo.last_provenance.weights] == ["tinynet.pth"]
    # the big matrix (80 KiB) came back as a reference to the cached .pth, mapped here; training it
    # writes copy-on-write pages, never the file
    with open("/proc/self/maps") as f:
        assert cached in f.read()
    before = _sha(cached)
    opt = flow.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    opt.step()
    assert _sha(cached) == before
    again = zoo.load("torchstyle/zoo", "tinynet", pretrained=True)
    assert np.allclose(again(x).detach().numpy(), want, atol=1e-5)


def test_torch_load_in_a_hubconf_reads_pth_files(zoo):
    for name in ("tinynet.pth", "checkpoint.pth", "checkpoint_legacy.pth"):
        state = zoo.load("torchstyle/zoo", "state_of", os.path.join(FIXTURES, name), trust_repo=True)
        if name == "tinynet.pth":
            assert tuple(state["fc.weight"].shape) == (160, 128)
        else:
            want = np.load(os.path.join(FIXTURES, "expected", "int64.npy"))
            assert np.array_equal(state["model"]["int64"].numpy(), want)
            assert state["epoch"] == 7


SANDBOXED = '''
"""An untrusted repo: its .pth is fetched by the caller and read in the sandboxed worker."""
import oneflow.hub

dependencies = ["oneflow"]


def sums(url):
    """Per tensor: its shape and the sum of its values."""
    state = oneflow.hub.load_state_dict_from_url(url, progress=False)
    return {name: [list(t.shape), float(t.double().sum())] for name, t in state.items()}
'''


def test_a_sandboxed_worker_reads_pth_files(gh, hub_root, tmp_path):
    assets = hub_root / "torchstyle" / "untrusted" / "releases" / "download" / "v1"
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(FIXTURES, "tinynet.pth"), assets / "tinynet.pth")
    make_repo(hub_root, "torchstyle", "untrusted", {"hubconf.py": SANDBOXED})
    url = f"{gh.url}/torchstyle/untrusted/releases/download/v1/tinynet.pth"
    got = flowhub.Hub(tmp_path / "hub", sandbox=True).load("torchstyle/untrusted", "sums", url)
    want = flowhub.load_weights(os.path.join(FIXTURES, "tinynet.pth"))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name][0] == list(tensor.shape)
        assert got[name][1] == pytest.approx(float(tensor.double().sum()), rel=1e-9, abs=1e-9), name


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    get_manager().shutdown()


def test_load_weights_called_by_a_hubconf_in_its_worker(tmp_path):
    """``flowhub.load_weights`` inside a worker runs with the caller's settings for that call (all of
    them, a job role included, even those that are no ``Hub`` argument)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text("def names(path):\n    import flowhub\n    return sorted(flowhub.load_weights(path))\n")
    path = os.path.join(FIXTURES, "tinynet.pth")
    got = flowhub.Hub(tmp_path / "hub", mode="rebuild").load(str(repo), "names", path, source="local")
    assert got == sorted(flowhub.load_weights(path)) and got
