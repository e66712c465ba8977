"""Proxy mode (flowhub.worker.host.proxy): real models in real worker processes, no mocks.

The repository ``tests/worker/worker_repos/proxied`` holds ``Net``, a small CNN with a dataclass config, a
0-d buffer and methods that return structured values, crash, sleep or stream; ``scale`` doubles its
input. Each result is checked against the same model rebuilt in this process (mode="rebuild").
"""
from __future__ import annotations

import gc
import hashlib
import os
import pickle
import sys
import threading
import time

import flowhub  # noqa: F401  (makes `import oneflow` work)
import numpy as np
import oneflow as flow
import pytest

from flowhub.errors import HubconfError, TransferError, WorkerCrashedError, WorkerTimeoutError
from flowhub.worker.host.proxy import Proxy
from flowhub.errors import ProxyError, StaleProxyError
from flowhub.worker.host.pool import WorkerManager, get_manager
from flowhub.worker.wire import codec, transfer
from flowhub.worker.host.proxy import remote_type, worker_stats

REPOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_repos")
PROXIED = os.path.join(REPOS, "proxied")
REPO = "flowhub-examples/tiny-models"


def load(model, *args, key="test:proxied", mgr=None, mode="proxy", timeout=None, **kwargs):
    return (mgr or get_manager()).call(repo_dir=PROXIED, key=key, op="load", model=model, args=args, kwargs=kwargs,
                                       mode=mode, label="test/proxied", timeout=timeout)


def digest(tensor):
    return hashlib.sha256(tensor.detach().numpy().tobytes()).hexdigest()


@pytest.fixture
def pair():
    """The same model twice: a proxy (kept in the worker) and a rebuilt copy (in this process), both in eval mode."""
    p, m = load("net", seed=5), load("net", seed=5, mode="rebuild")
    assert p.eval() is p
    return p, m.eval()


# -- forwarding -----------------------------------------------------------------------------------
def test_outputs_and_state_dict_match_the_rebuilt_model_bit_for_bit(pair):
    p, m = pair
    assert isinstance(p, Proxy) and not isinstance(p, flow.nn.Module)
    x = flow.randn(4, 3, 16, 16)
    out = p(x)
    assert isinstance(out, flow.Tensor) and out.shape == (4, 16) and out.dtype == flow.float32
    assert digest(out) == digest(m(x))
    assert digest(p(x, bias=0.5)) == digest(m(x, bias=0.5))
    assert digest(p(x, flow.tensor(0.25))) == digest(m(x, flow.tensor(0.25)))  # a 0-d tensor argument
    sd, expected = p.state_dict(), m.state_dict()
    assert list(sd) == list(expected)
    assert {k: digest(v) for k, v in sd.items()} == {k: digest(v) for k, v in expected.items()}
    assert sd["scale"].shape == () and sd["features.1.num_batches_tracked"].dtype == flow.int64
    names = [name for name, _ in p.named_parameters()]
    assert names == [name for name, _ in m.named_parameters()]
    assert all(flow.equal(a, b) for a, b in zip(p.parameters(), m.parameters()))
    assert [n for n, _ in p.named_buffers()] == [n for n, _ in m.named_buffers()]


def test_attributes_sub_objects_and_identity(pair):
    p, m = pair
    assert p.training is False and p.train().training is True and p.eval().training is False
    assert p.to("cpu") is p
    assert p.fc.out_features == 16 and p.cfg.width == 16 and p.cfg.name == "net"
    assert repr(p.cfg) == "Config(width=16, name='net')" and not callable(p.cfg)
    assert repr(p) == repr(m) and "Sequential" in repr(p)
    assert remote_type(p) == "proxpkg.models.Net" and remote_type(p.fc).endswith(".Linear")
    assert callable(p) and callable(p.fc) and isinstance(p.fc, Proxy)
    assert p.fc is p.fc  # one proxy per remote object while it lives
    first, second = p.pair()
    assert first is second is p.fc
    weight = p.fc.weight
    assert isinstance(weight, flow.Tensor) and not isinstance(weight, flow.nn.Parameter)
    assert flow.equal(weight, m.fc.weight) and not weight.requires_grad
    assert len(p.features) == 3 and bool(p.features)
    conv = p.features[0]
    assert remote_type(conv).endswith(".Conv2d") and conv.in_channels == 3 and conv.kernel_size == (3, 3)
    assert [remote_type(layer).rsplit(".", 1)[1] for layer in p.features] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert "0" in p.features._modules and {"cfg", "forward", "embed"} <= set(dir(p))
    assert [remote_type(c) for c in p.children()] == [remote_type(p.features), remote_type(p.fc)]
    assert list(p.stream(3)) == [0, 1, 2]  # a generator stays in the worker and is iterated remotely
    assert p.features.training is False and p.fc.bias.shape == (16,)


def test_method_calls_with_kwargs_and_values_both_ways(pair):
    p, m = pair
    x = flow.randn(2, 3, 8, 8)
    got, expected = p.embed(x, normalize=True, scale=2.0), m.embed(x, normalize=True, scale=2.0)
    assert set(got) == {"emb", "norm", "shape", "pair"}
    assert digest(got["emb"]) == digest(expected["emb"]) and got["norm"].shape == ()
    assert float(got["norm"]) == float(expected["norm"])
    assert got["shape"] == [2, 8] and got["pair"] == (1, "two")
    assert digest(p.run(p.fc, flow.ones(1, 8))) == digest(m.fc(flow.ones(1, 8)))  # a proxy passed back
    assert p.total(np.arange(10, dtype=np.int64)) == 45  # numpy in, numpy scalar back as a number
    other = load("net", key="test:proxied-other")
    with pytest.raises(ProxyError, match="another worker"):
        p.run(other.fc, flow.ones(1, 8))
    sd = {k: v.detach() * 0 for k, v in m.state_dict().items()}
    p.load_state_dict(sd)  # caller-side tensors into the worker's model
    assert float(p.fc.weight.abs().sum()) == 0.0
    assert float(p(x).abs().sum()) == 0.0
    p.load_state_dict(m.state_dict())  # parameters cross as plain data
    assert digest(p(x)) == digest(m(x))


def test_large_and_zero_dim_tensors_both_ways():
    s = load("scale")
    x = flow.randn(64, 3, 224, 224)
    y = s(x)
    assert y.shape == x.shape and flow.equal(y, x * 2)
    assert float(s(flow.tensor(1.5))) == 3.0 and s(flow.tensor(1.5)).shape == ()
    assert flow.equal(s(flow.ones(0, 3)), flow.ones(0, 3))
    echo = load("echo")
    half = echo(flow.full((4,), 1.5).to(flow.bfloat16))  # crosses as fp32, both ways
    assert half.dtype == flow.bfloat16 and half.float().tolist() == [1.5] * 4
    ints = echo([flow.arange(5), np.arange(3, dtype=np.uint8), b"raw", flow.int8, flow.device("cpu")])
    assert ints[0].dtype == flow.int64 and ints[0].tolist() == [0, 1, 2, 3, 4]
    assert ints[1].dtype == np.uint8 and ints[2:] == [b"raw", flow.int8, flow.device("cpu")]


# -- errors ----------------------------------------------------------------------------------------
def test_remote_exceptions_keep_their_type_or_become_hubconf_errors(pair):
    p, _ = pair
    with pytest.raises(ValueError) as info:
        p(flow.ones(3))
    text = str(info.value)
    assert "expected a 4-d input" in text and "test/proxied" in text and "models.py" in text
    with pytest.raises(HubconfError) as info:
        p(flow.ones(1, 3, 4, 4), bias=13)
    assert "proxpkg.errors.RepoError" in str(info.value) and "unlucky bias" in str(info.value)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        p.no_such_attribute
    assert not hasattr(p, "nope") and hasattr(p, "fc")
    with pytest.raises(KeyError) as info:
        p.lookup("missing")  # the worker's KeyError, its args kept
    assert info.value.args == ("missing",) and "lookup" in str(info.value.__cause__)
    with pytest.raises(TypeError, match="not callable"):
        p.training()  # a value, not a method
    with pytest.raises(AttributeError, match="cannot set"):
        p.x = 1
    with pytest.raises(AttributeError, match="cannot delete"):
        del p.fc
    with pytest.raises(TypeError, match="cannot assign"):
        p.features[0] = None
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(p)
    assert p.fc.out_features == 16  # the worker carries on


def test_no_autograd_across_the_boundary(pair):
    p, m = pair
    x = flow.randn(2, 3, 8, 8)
    out = p(x)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(Exception, match="does not require grad"):
        out.sum().backward()
    needs_grad = x.clone().requires_grad_()
    with pytest.raises(ProxyError, match="no_grad"):
        p(needs_grad)
    with pytest.raises(ProxyError):
        p(m.fc.weight * 2)  # part of a graph
    with flow.no_grad():
        assert flow.equal(p(needs_grad), out)
    assert all(not t.requires_grad for t in p.parameters())
    with pytest.raises(TypeError):
        flow.optim.SGD(p, lr=0.1)  # a proxy is not a module, nor a list of parameters


# -- object lifetime ----------------------------------------------------------------------------------
def test_released_proxies_free_the_workers_objects():
    p = load("net", key="test:proxied-release")
    x = flow.randn(1, 3, 8, 8)
    gc.collect()
    base = worker_stats(p)
    assert base == {"objects": 1, "handouts": 1}
    for _ in range(200):
        assert p.fc.out_features == 16 and p.cfg.width == 16
        assert p.features[0].in_channels == 3
        assert p.eval() is p
        p(x)
    gc.collect()
    assert worker_stats(p)["objects"] == 1  # p itself: every sub-object proxy was released
    keep = [p.fc for _ in range(5)]  # one proxy, five handouts of it
    assert len({id(k) for k in keep}) == 1
    assert worker_stats(p)["objects"] == 2
    del keep
    gc.collect()
    assert worker_stats(p)["objects"] == 1
    q = load("net", key="test:proxied-release")
    assert worker_stats(q)["objects"] == 2
    del p
    gc.collect()
    assert worker_stats(q) == {"objects": 1, "handouts": 1}


def test_release_during_another_call_does_not_deadlock():
    p = load("net", key="test:proxied-release-busy")
    subs = [p.features[i] for i in range(3)]
    assert worker_stats(p)["objects"] == 4
    busy = threading.Thread(target=p.sleep, args=(0.5,))
    busy.start()
    time.sleep(0.1)  # the worker's lock is held by the sleeping call: the finalizers only queue
    del subs
    gc.collect()
    busy.join(timeout=10)
    assert not busy.is_alive()
    assert worker_stats(p)["objects"] == 1


def test_proxies_shared_between_threads(pair):
    p, m = pair
    x = flow.randn(2, 3, 8, 8)
    expected = digest(m(x))
    results, errors = [], []

    def work():
        try:
            for _ in range(30):
                results.append(digest(p(x)) == expected and p.features[0].in_channels == 3)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 120 and all(results)
    gc.collect()
    assert worker_stats(p)["objects"] == 1


def test_worker_holding_proxies_is_not_reaped_when_idle():
    own = WorkerManager(idle_timeout=0.3)
    try:
        p = load("net", key="test:proxied-idle", mgr=own)
        time.sleep(1.2)
        assert p.fc.out_features == 16
        pid = own.worker_pid("test:proxied-idle")
        del p
        gc.collect()
        deadline = time.monotonic() + 5
        while own.worker_pid("test:proxied-idle") == pid and time.monotonic() < deadline:
            time.sleep(0.1)
        assert own.worker_pid("test:proxied-idle") is None  # reaped once nothing refers to it
    finally:
        own.shutdown()


# -- crashes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how, error, expected", [
    ("crash", WorkerCrashedError, "exited with code 3"),
    ("segfault", WorkerCrashedError, "SIGSEGV"),
    ("sleep", WorkerTimeoutError, "1 s"),
])
def test_worker_crash_during_a_call_makes_proxies_stale(how, error, expected):
    key = f"test:proxied-crash-{how}"
    p = load("net", key=key, timeout=1)
    fc = p.fc
    with pytest.raises(error, match=expected):
        getattr(p, how)(30) if how == "sleep" else getattr(p, how)()
    for use in (lambda: p.fc, lambda: fc(flow.ones(1, 8)), lambda: p(flow.ones(1, 3, 4, 4)), lambda: len(p.features)):
        with pytest.raises(StaleProxyError, match="load it again"):
            use()
    assert "unavailable" in repr(p)
    fresh = load("net", key=key)
    assert fresh.fc.out_features == 16 and fresh is not p
    with pytest.raises(StaleProxyError):
        p.fc
    del fc, p
    gc.collect()  # their releases go nowhere, quietly
    assert worker_stats(fresh)["objects"] == 1


def test_changed_hubconf_replaces_the_worker_and_old_proxies_say_why(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text("import oneflow as flow\ndef lin():\n    return flow.nn.Linear(2, 3)\n")
    mgr = get_manager()
    old = mgr.call(repo_dir=str(repo), key="test:proxied-edit", op="load", model="lin", mode="proxy")
    assert old.out_features == 3
    (repo / "hubconf.py").write_text("import oneflow as flow\ndef lin():\n    return flow.nn.Linear(2, 4)\n")
    st = os.stat(repo / "hubconf.py")
    os.utime(repo / "hubconf.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    new = mgr.call(repo_dir=str(repo), key="test:proxied-edit", op="load", model="lin", mode="proxy")
    assert new.out_features == 4
    with pytest.raises(StaleProxyError, match="hubconf.py changed"):
        old.out_features


# -- through the Hub ----------------------------------------------------------------------------------
def test_hub_proxy_mode_local_and_environment(monkeypatch, tmp_path):
    hub = flowhub.Hub(tmp_path / "hub", mode="proxy")
    p = hub.load(PROXIED, "net", source="local", seed=1)
    assert isinstance(p, Proxy) and p(flow.ones(1, 3, 8, 8)).shape == (1, 16)
    assert hub.load(PROXIED, "version", source="local") == "proxied-1"  # plain values come back as values
    assert hub.last_provenance.entrypoint == "version"
    monkeypatch.setenv("FLOWHUB_MODE", "proxy")
    q = flowhub.load(PROXIED, "net", source="local", seed=1)
    assert isinstance(q, Proxy) and flow.equal(q.fc.weight, p.fc.weight)
    assert "proxpkg" not in sys.modules and "hubconf" not in sys.modules


def test_hub_proxy_mode_through_the_loopback_server(gh, hub_root, example, tmp_path):
    from conftest import expected_state_dict

    hub = flowhub.Hub(mode="proxy")
    assert hub.list(f"{REPO}:v0.1", trust_repo=True) == ["tinymlp", "tinynet", "version"]
    assert "TinyNet" in hub.help(f"{REPO}:v0.1", "tinynet")
    model = hub.load(f"{REPO}:v0.1", "tinynet", pretrained=True, trust_repo=True)
    assert isinstance(model, Proxy) and remote_type(model).endswith("TinyNet")
    expected = expected_state_dict(hub_root, example, "v0.1", "tinynet", tmp_path)
    sd = model.state_dict()
    assert set(sd) == set(expected) and all(flow.equal(sd[k], v) for k, v in expected.items())
    assert model(flow.ones(2, 3, 32, 32)).shape == (2, 10)
    assert model.classifier.out_features == 10
    weights = hub.last_provenance.weights
    assert len(weights) == 1 and weights[0]["url"].endswith(example["weights"]["v0.1"]["tinynet"])


def test_compare_in_proxy_mode(gh):
    result = flowhub.Hub(mode="proxy").compare(f"{REPO}:v0.1", f"{REPO}:v0.2", "tinynet", pretrained=True,
                                               trust_repo=True)
    assert result.entrypoints_added == ["labels"]
    assert result.reshaped == {"features.4.weight": ([16, 8, 3, 3], [16, 8, 5, 5])}
    assert len(result.changed) == 7 and result.unchanged == 3
    assert result.output_max_abs_diff > 0 and result.input_shapes == [[2, 3, 32, 32]]


# -- the caller never unpickles what a proxy-mode worker sent ----------------------------------------------
def test_caller_never_unpickles_worker_bytes(monkeypatch):
    import cloudpickle

    from flowhub.worker.wire import byvalue

    def refuse(*args, **kwargs):
        raise AssertionError("the caller unpickled bytes in proxy mode")

    for target, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (pickle, "_loads"),
                         (pickle, "_Unpickler"), (cloudpickle, "loads"), (cloudpickle, "load"), (byvalue, "decode"),
                         (byvalue, "_Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    mgr = get_manager()
    key = "test:proxied-nopickle"
    assert "net" in mgr.call(repo_dir=PROXIED, key=key, op="list", mode="proxy")
    assert mgr.call(repo_dir=PROXIED, key=key, op="help", model="net", mode="proxy").startswith("A small CNN")
    p = load("net", key=key, seed=2)
    x = flow.randn(1, 3, 8, 8)
    assert p(x).shape == (1, 16) and p.state_dict()["scale"].shape == ()
    assert p.embed(x, normalize=True)["shape"] == [1, 8] and p.cfg.width == 16
    with pytest.raises(ValueError):
        p(flow.ones(2))
    with pytest.raises(HubconfError):
        p(x, bias=13)
    with pytest.raises(KeyError):
        p.lookup("nope")
    with pytest.raises(TypeError):
        mgr.call(repo_dir=PROXIED, key=key, op="load", model="net", args=(1, 2, 3), mode="proxy")
    assert p.run(p.fc, flow.ones(1, 8)).shape == (1, 16)
    with pytest.raises(WorkerCrashedError):
        p.crash()


def test_replies_are_validated_before_use():
    """What a hostile worker could send: every malformed node or table is refused with TransferError."""
    packed = transfer.pack([np.arange(4, dtype=np.float32)])
    try:
        arrays = transfer.unpack(os.dup(packed.fd), packed.size, packed.table)
    finally:
        packed.close()
    refuse = lambda node: pytest.fail("no ref expected")  # noqa: E731
    good = codec.Decoder(arrays, refuse).decode({"t": "dict", "k": ["a", {"t": "tuple", "v": [1, 2]}],
                                                 "v": [{"t": "tensor", "i": 0}, {"t": "ndarray", "i": 0}]})
    assert good["a"].tolist() == [0, 1, 2, 3] and good[(1, 2)].dtype == np.float32
    bad_nodes = [
        {"t": "tensor", "i": 1}, {"t": "tensor", "i": -1}, {"t": "tensor", "i": "0"}, {"t": "tensor", "i": 0, "c": "x"},
        {"t": "pickle", "v": "gASVAAAAAAAAAAA="}, {"t": "nope"}, {"no": "tag"}, {"t": "dict", "k": [[1]], "v": [1]},
        {"t": "dict", "k": ["a"], "v": []}, {"t": "device", "v": "cpu; rm -rf"}, {"t": "dtype", "v": "os.system"},
        {"t": "slice", "v": [1, "2", None]}, {"t": "bytes", "v": "***"}, {"t": "tuple", "v": "abc"},
    ]
    for node in bad_nodes:
        with pytest.raises(TransferError):
            codec.Decoder(arrays, refuse).decode(node)
    deep = 0
    for _ in range(500):
        deep = [deep]
    with pytest.raises(TransferError):
        codec.Decoder(arrays, refuse).decode(deep)
    from flowhub.worker.host.proxy import Connection

    p = load("net", key="test:proxied-forged")
    conn = object.__getattribute__(p, "_flowhub_conn")
    for node in ({"t": "ref", "r": 0}, {"t": "ref", "r": 10**6, "ty": "x", "call": True, "it": False, "truth": True},
                 {"t": "ref", "r": 10**6, "ty": 1, "call": 1, "it": False, "truth": True, "type": "T"},
                 {"t": "ref", "r": 10**6, "ty": 1, "call": True, "it": False, "truth": True, "type": ["T"]}):
        with pytest.raises(TransferError):
            conn.decode({"ok": True, "value": node, "size": 0, "table": []}, [], "forged")
    forged_tables = [[{"dtype": "object", "shape": [1], "offset": 0, "nbytes": 8}],
                     [{"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16},
                      {"dtype": "float32", "shape": [4], "offset": 8, "nbytes": 16}],
                     [{"dtype": "float32", "shape": [100], "offset": 0, "nbytes": 400}]]
    for table in forged_tables:
        packed = transfer.pack([np.zeros(8, np.float32)])
        with pytest.raises(TransferError):
            conn.decode({"ok": True, "value": {"t": "tensor", "i": 0}, "size": packed.size, "table": table},
                        [packed.fd], "forged")  # the fd is closed by decode
        packed.fd = None
    assert isinstance(conn, Connection) and p.fc.out_features == 16


def _memfd_maps(label: str) -> int:
    with open("/proc/self/maps") as f:
        return sum(f"/memfd:{label}" in line for line in f)


def test_large_payloads_reuse_one_arena_per_direction_and_results_stay_intact():
    """Payloads over the inline limit go through one reused memfd each way, not a fresh one per call; a
    result is a copy, so the next call (which rewrites the arena) leaves earlier results as they were."""
    s, echo = load("scale", key="test:arena"), load("echo", key="test:arena")
    xs = [flow.randn(8, 3, 64, 64) for _ in range(4)]  # 393 KiB each: above the inline limit
    before = _memfd_maps("flowhub-proxy-arena")  # other tests' workers may have theirs mapped here
    first = s(xs[0])
    kept = first.numpy().copy()
    maps = _memfd_maps("flowhub-proxy-arena")
    results = [s(x) for x in xs[1:]] + [echo({"a": xs[1], "b": [xs[2].numpy()]})]
    assert np.array_equal(first.numpy(), kept) and np.array_equal(kept, (xs[0] * 2).numpy())
    for x, y in zip(xs[1:], results[:3]):
        assert flow.equal(y, x * 2)
    assert flow.equal(results[3]["a"], xs[1]) and np.array_equal(results[3]["b"][0], xs[2].numpy())
    assert _memfd_maps("flowhub-proxy-arena") == maps == before + 1  # this worker's arena, mapped once here
    with flow.no_grad():
        first.add_(1.0)  # results are this process's own memory, writable
    assert np.array_equal(first.numpy(), kept + 1)
    y = s(flow.randn(16, 3, 128, 128))  # bigger than the arena: a new one, announced with the message
    assert y.shape == (16, 3, 128, 128) and _memfd_maps("flowhub-proxy-arena") <= before + 2


def test_an_arena_must_be_sealed_against_resizing_and_fit_its_payload(tmp_path):
    inbox = transfer.Inbox()
    loose = os.memfd_create("loose", os.MFD_ALLOW_SEALING)
    os.ftruncate(loose, 1 << 20)  # no seals: the sender could shrink it under a reader (SIGBUS)
    with pytest.raises(TransferError, match="sealed against resizing"):
        inbox.unpack({"arena": 1, "arena_size": 1 << 20, "size": 0, "table": []}, [loose])
    with pytest.raises(TransferError, match="does not have"):
        inbox.unpack({"arena": 2, "size": 64, "table": [{"dtype": "uint8", "shape": [64], "offset": 0,
                                                          "nbytes": 64}]}, [])
    out = transfer.Outbox("t")
    packed, fields = out.pack([np.arange(100_000, dtype=np.float32)])
    arrays, copied = inbox.unpack(dict(fields, size=packed.size, table=packed.table), [packed.fd])
    assert copied and np.array_equal(arrays[0], np.arange(100_000, dtype=np.float32))
    too_big = [{"dtype": "uint8", "shape": [out.capacity + 64], "offset": 0, "nbytes": out.capacity + 64}]
    with pytest.raises(TransferError):
        inbox.unpack({"arena": fields["arena"], "size": out.capacity + 64, "table": too_big}, [])
    out.close()
