"""Deferred initialisation (``Hub(deferred_init=...)``): a pretrained load in a worker never draws the
weights its checkpoint overwrites, and gives exactly what a plain load gives; anything the speculation
cannot vouch for runs the entrypoint again the usual way. Real workers, a real loopback server, real
checkpoint files in the hub cache."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import oneflow as flow
import pytest

import flowhub
from flowhub.worker.host.pool import get_manager

from conftest import make_repo, publish_checkpoint

HUBCONF = '''
"""Entrypoints that load a cached checkpoint in the usual ways, and some unusual ones."""
import oneflow as flow
import oneflow.hub

dependencies = ["oneflow"]
CALLS = []


def _body():
    return flow.nn.Sequential(flow.nn.Linear(256, 512), flow.nn.ReLU(), flow.nn.Linear(512, 256),
                              flow.nn.Linear(256, 4))


def calls():
    """How often an entrypoint body ran in this worker."""
    return len(CALLS)


def net(url, pretrained=True, head=None, noise=False, say=False, check_init=False):
    """The body, its checkpoint, and optionally: a new head, a drawn buffer, a message, an init check."""
    CALLS.append(1)
    if say:
        print("building the net")
    model = _body()
    if check_init:  # a model that refuses weights that were never initialised
        assert float(model[0].weight.abs().sum()) > 0
    if noise:
        model.register_buffer("noise", flow.randn(8), persistent=False)
    if pretrained:
        model.load_state_dict(oneflow.hub.load_state_dict_from_url(url, progress=False))
    if head:
        model = flow.nn.Sequential(model, flow.nn.Linear(4, head))
    return model


def viewed(url):
    """A view taken before the load must show the loaded weights, as with a copy."""
    CALLS.append(1)
    model = _body()
    flat = model[0].weight.view(-1)
    model.load_state_dict(oneflow.hub.load_state_dict_from_url(url, progress=False))
    return model, flat.numpy().copy()


def trained(url):
    """One SGD step inside the entrypoint, after the load."""
    CALLS.append(1)
    model = _body()
    model.load_state_dict(oneflow.hub.load_state_dict_from_url(url, progress=False))
    opt = flow.optim.SGD(model.parameters(), lr=0.1)
    model(flow.ones(2, 256)).sum().backward()
    opt.step()
    return model


def read_before_load(url):
    """Copies a parameter's initial value before loading over it."""
    CALLS.append(1)
    model = _body()
    initial = flow.zeros(4, 256)
    initial.copy_(model[3].weight)
    model.load_state_dict(oneflow.hub.load_state_dict_from_url(url, progress=False))
    return model, initial
'''


def _body() -> flow.nn.Module:
    return flow.nn.Sequential(flow.nn.Linear(256, 512), flow.nn.ReLU(), flow.nn.Linear(512, 256),
                              flow.nn.Linear(256, 4))


@pytest.fixture
def published(gh, hub_root, tmp_path):
    """The repository and its zipped checkpoint on the loopback server: (url, the saved model)."""
    make_repo(hub_root, "deferred", "zoo", {"hubconf.py": HUBCONF})
    flow.manual_seed(21)
    model = _body()
    path = publish_checkpoint(hub_root, "deferred", "zoo", model.state_dict(), tmp_path)
    return gh.url + path, model


def _hub(tmp_path, name: str, **kwargs) -> flowhub.Hub:
    return flowhub.Hub(tmp_path / name, **kwargs)


def _load(hub: flowhub.Hub, entry: str, *args, seed: int = 7, **kwargs):
    flow.manual_seed(seed)
    return hub.load("deferred/zoo", entry, *args, trust_repo=True, **kwargs)


def _state(model) -> dict:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _same_state(a, b) -> None:
    a, b = _state(a), _state(b)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name


def _calls(hub) -> int:
    return hub.load("deferred/zoo", "calls", trust_repo=True)


def _worker_maps(hub_dir: str) -> list:
    """The files of ``hub_dir``'s checkpoint cache that this process's workers map."""
    extracted = os.path.realpath(os.path.join(hub_dir, "checkpoints"))
    found = []
    for pid in get_manager().service_workers():
        try:
            with open(f"/proc/{pid}/maps") as f:
                lines = f.read().splitlines()
        except OSError:  # a worker that has just exited
            continue
        found += [line.split(None, 5)[5] for line in lines if len(line.split(None, 5)) == 6]
    return sorted(p for p in found if p.startswith(extracted))


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_pretrained_load_runs_once_and_equals_a_plain_load(published, tmp_path):
    url, saved = published
    fast, plain = _hub(tmp_path, "fast"), _hub(tmp_path, "plain", deferred_init=False)
    model, reference = _load(fast, "net", url), _load(plain, "net", url)
    _same_state(model, saved)
    _same_state(model, reference)
    x = flow.randn(3, 256)
    assert np.array_equal(model(x).numpy(), reference(x).numpy())
    assert _calls(fast) == 1 and _calls(plain) == 1  # kept: the entrypoint ran once


def test_kept_parameters_are_the_checkpoint_files_in_the_worker(published, tmp_path):
    url, saved = published
    hub_dir = str(tmp_path / "fast")
    proxy = _load(flowhub.Hub(hub_dir, mode="proxy"), "net", url)
    mapped = _worker_maps(hub_dir)
    # the two big weight matrices are the cached files' pages (the state dict itself is gone by now)
    assert len(mapped) == 2 and all(p.endswith("/out") for p in mapped), mapped
    x = flow.randn(2, 256)
    assert np.array_equal(proxy(x).numpy(), saved(x).numpy())
    plain_dir = str(tmp_path / "plain")
    plain = _load(flowhub.Hub(plain_dir, mode="proxy", deferred_init=False), "net", url)
    assert _worker_maps(plain_dir) == []  # a plain load copies them into its own memory
    assert np.array_equal(plain(x).numpy(), proxy(x).numpy())


def test_a_head_the_checkpoint_does_not_cover_runs_again_and_matches_a_plain_load(published, tmp_path, capfd):
    url, _ = published
    fast, plain = _hub(tmp_path, "fast"), _hub(tmp_path, "plain", deferred_init=False)
    capfd.readouterr()
    model = _load(fast, "net", url, head=10, say=True, seed=3)
    assert capfd.readouterr().out.count("building the net") == 1  # shown once, though it ran twice
    assert _calls(fast) == 2
    _same_state(model, _load(plain, "net", url, head=10, seed=3))  # the new head's draws included


@pytest.mark.parametrize("kwargs", [{"pretrained": False}, {"noise": True}, {"check_init": True}],
                         ids=["random-init", "drawn-buffer", "init-checked-before-load"])
def test_what_the_speculation_cannot_vouch_for_runs_plainly(published, tmp_path, kwargs):
    url, _ = published
    fast, plain = _hub(tmp_path, "fast"), _hub(tmp_path, "plain", deferred_init=False)
    model, reference = _load(fast, "net", url, seed=4, **kwargs), _load(plain, "net", url, seed=4, **kwargs)
    _same_state(model, reference)
    if kwargs.get("noise"):
        assert np.array_equal(model.noise.numpy(), reference.noise.numpy())
    assert _calls(fast) == 2


def test_a_value_read_from_a_deferred_parameter_runs_plainly(published, tmp_path):
    url, _ = published
    (model, initial), (reference, initial_ref) = (
        _load(_hub(tmp_path, "fast"), "read_before_load", url, seed=9),
        _load(_hub(tmp_path, "plain", deferred_init=False), "read_before_load", url, seed=9))
    _same_state(model, reference)
    assert np.array_equal(initial.numpy(), initial_ref.numpy()) and float(initial.abs().sum()) > 0
    assert _calls(_hub(tmp_path, "fast")) == 2


def test_views_see_the_loaded_weights_and_training_leaves_the_cache_alone(published, tmp_path):
    url, saved = published
    fast, plain = _hub(tmp_path, "fast"), _hub(tmp_path, "plain", deferred_init=False)
    (_, flat), (_, flat_ref) = _load(fast, "viewed", url), _load(plain, "viewed", url)
    assert np.array_equal(flat, saved[0].weight.numpy().reshape(-1)) and np.array_equal(flat, flat_ref)
    assert _calls(fast) == 1
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "fast" / "checkpoints")
             for name in names if name == "out"]
    before = {p: _sha(p) for p in files}
    trained, trained_ref = _load(fast, "trained", url), _load(plain, "trained", url)
    _same_state(trained, trained_ref)
    assert not np.array_equal(trained[0].weight.numpy(), saved[0].weight.numpy())
    assert {p: _sha(p) for p in files} == before  # copy-on-write: the cached files never change


def test_the_generator_moves_on_reproducibly_after_a_kept_load(published, tmp_path):
    url, _ = published
    hub = _hub(tmp_path, "fast")
    _load(hub, "net", url, seed=5)
    after = flow.rand(4).numpy()
    _load(hub, "net", url, seed=5)
    assert np.array_equal(flow.rand(4).numpy(), after)
    flow.manual_seed(5)
    assert not np.array_equal(flow.rand(4).numpy(), after)  # not a repeat of the seeded start


def test_the_setting_comes_from_the_environment(monkeypatch):
    assert flowhub.Hub().settings().deferred_init is True
    monkeypatch.setenv("FLOWHUB_DEFERRED_INIT", "0")
    assert flowhub.Hub().settings().deferred_init is False
    assert flowhub.Hub(deferred_init=True).settings().deferred_init is True

