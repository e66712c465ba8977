"""Isolated workers (flowhub.worker): real oneflow models, real processes, no mocks.

The repositories used live in tests/worker/worker_repos/: ``v1`` and ``v2`` (made from v1 below) are two versions of one repo
(same package ``mypkg``, different model widths), ``colliding_a``/``colliding_b`` both ship
top-level ``models`` and ``utils`` packages, ``broken`` cannot be imported and ``torchstyle`` is
written against ``torch``.
"""
from __future__ import annotations

import atexit
import gc
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import flowhub  # noqa: F401  (makes `import oneflow` work)
import numpy as np
import oneflow as flow
import psutil
import pytest

from flowhub.errors import (EntrypointError, HubconfError, TransferError, WorkerCrashedError,
                            WorkerTimeoutError)
from flowhub.worker.host.pool import WorkerManager, get_manager

REPOS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_repos")
V1 = os.path.join(REPOS, "v1")
PY = sys.executable


def _make_v2() -> str:
    """``v2``: ``v1`` with another VERSION and model WIDTH, the same package name (``mypkg``)."""
    root = tempfile.mkdtemp(prefix="flowhub-test-v2-")
    atexit.register(shutil.rmtree, root, True)
    v2 = os.path.join(root, "v2")
    shutil.copytree(V1, v2, ignore=shutil.ignore_patterns("__pycache__"))
    for rel, old, new in (("mypkg/__init__.py", 'VERSION = "v1"', 'VERSION = "v2"'),
                          ("mypkg/models.py", "WIDTH = 10", "WIDTH = 20")):
        path = os.path.join(v2, rel)
        with open(path) as f:
            text = f.read()
        assert old in text, (rel, old)
        with open(path, "w") as f:
            f.write(text.replace(old, new))
    return v2


V2 = _make_v2()


@pytest.fixture(scope="module")
def mgr():
    return get_manager()


def call(mgr, repo, op="load", model=None, *args, key=None, **kwargs):
    timeout = kwargs.pop("_timeout", None)
    return mgr.call(repo_dir=repo, key=key or f"test:{repo}", op=op, model=model, args=args, kwargs=kwargs,
                    label=f"test/{os.path.basename(repo)}", timeout=timeout)


def stray_children(*managers):
    """Live processes forked for this process (its descendants, and the workers zygote services forked
    for its managers) that no manager accounts for."""
    managers = managers + (get_manager(),)  # the process-wide one too
    known = {pid for m in managers for pid in m.active_pids()}
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    ours.update(pid for m in managers for pid in m.service_workers())
    stray = []
    for pid in ours - known:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                stray.append(pid)
        except psutil.NoSuchProcess:
            pass
    return stray


def digest(tensor):
    return hashlib.sha256(tensor.detach().numpy().tobytes()).hexdigest()


# -- isolation ------------------------------------------------------------------------------------
def test_two_versions_side_by_side_leave_the_caller_clean(mgr):
    path_before, modules_before = list(sys.path), set(sys.modules)
    m1, m2 = call(mgr, V1, "load", "small"), call(mgr, V2, "load", "small")
    x = flow.randn(2, 3, 8, 8)
    assert m1(x).shape == (2, 10) and m2(x).shape == (2, 20)
    assert (m1.version, m2.version) == ("v1", "v2")
    assert call(mgr, V1, "load", "version") == "v1" and call(mgr, V2, "load", "version") == "v2"
    assert type(m1).__name__ == type(m2).__name__ == "SmallCNN" and type(m1) is not type(m2)
    assert isinstance(m1, flow.nn.Module) and not isinstance(m1, type(m2))
    assert sys.path == path_before
    new = set(sys.modules) - modules_before
    assert not [n for n in new if n.split(".")[0] in ("mypkg", "hubconf", "hubconf.py")], new
    assert "mypkg" not in sys.modules and "hubconf" not in sys.modules
    assert mgr.worker_pid(f"test:{V1}") != mgr.worker_pid(f"test:{V2}")


def test_repos_with_colliding_models_and_utils_packages(mgr):
    a = call(mgr, os.path.join(REPOS, "colliding_a"), "load", "net")
    b = call(mgr, os.path.join(REPOS, "colliding_b"), "load", "net")
    assert (a.name, b.name) == ("repo-a", "repo-b")
    assert a(flow.ones(1, 4)).shape == (1, 2) and b(flow.ones(1, 4)).shape == (1, 3)
    assert "models" not in sys.modules and "utils" not in sys.modules


def test_list_and_help(mgr):
    names = call(mgr, V1, "list")
    assert {"small", "small_with_reference", "fail_value", "hang"} <= set(names)
    assert not [n for n in names if n.startswith("_")]
    assert call(mgr, V1, "help", "small") == "A small CNN whose width depends on the repository version."
    assert call(mgr, V1, "help", "pid") is None
    with pytest.raises(EntrypointError, match="no_such_entry"):
        call(mgr, V1, "help", "no_such_entry")


# -- rebuilt objects ------------------------------------------------------------------------------
def test_rebuilt_model_matches_the_worker_bit_for_bit(mgr):
    model, x, out_digest, state_digests = call(mgr, V1, "load", "small_with_reference", seed=7)
    assert digest(model(x)) == out_digest
    state = model.state_dict()
    assert {k: digest(v) for k, v in state.items()} == state_digests
    assert isinstance(model.conv.weight, flow.nn.Parameter) and model.conv.weight.requires_grad
    assert not isinstance(model.bn.running_mean, flow.nn.Parameter)
    assert model.bn.num_batches_tracked.shape == () and model.bn.num_batches_tracked.dtype == flow.int64
    again = call(mgr, V1, "load", "small_with_reference", seed=7)[0]
    assert type(again) is type(model)  # one worker, one class object
    assert all(flow.equal(a, b) for a, b in zip(again.state_dict().values(), state.values()))


def test_caller_generator_state_is_used_and_advanced(mgr):
    def load_after_seed(seed):
        flow.manual_seed(seed)
        model = call(mgr, V1, "load", "unseeded")
        return {k: digest(v) for k, v in model.state_dict().items()}, digest(flow.rand(4))

    (a, after_a), (b, after_b), (c, _) = load_after_seed(5), load_after_seed(5), load_after_seed(6)
    assert a == b and a != c and after_a == after_b
    flow.manual_seed(5)
    assert digest(flow.rand(4)) != after_a  # the load advanced the caller's generator
    # The weights are exactly those of an in-process load (oneflow.hub.load in a clean process).
    # (What the caller draws afterwards differs: oneflow 0.9's set_rng_state does not restore a
    # generator that has already drawn numbers, so only a freshly seeded state round-trips.)
    code = textwrap.dedent(f"""
        import hashlib, flowhub, oneflow as flow, oneflow.hub
        d = lambda t: hashlib.sha256(t.detach().numpy().tobytes()).hexdigest()
        flow.manual_seed(5)
        m = oneflow.hub.load({V1!r}, "unseeded", source="local")
        print(sorted((k, d(v)) for k, v in m.state_dict().items()))
    """)
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(sorted(a.items()))


def test_rebuilt_model_trains_and_saves(mgr, tmp_path):
    model = call(mgr, V1, "load", "small", seed=1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = flow.optim.SGD(model.parameters(), lr=0.1)
    loss = model(flow.randn(4, 3, 8, 8)).pow(2).mean()
    loss.backward()
    assert model.fc.weight.grad is not None
    opt.step()
    after = model.state_dict()
    assert not flow.equal(before["fc.weight"], after["fc.weight"])
    assert not flow.equal(before["bn.running_mean"], after["bn.running_mean"])
    flow.save(model.state_dict(), str(tmp_path / "ckpt"))
    loaded = flow.load(str(tmp_path / "ckpt"))
    assert all(flow.equal(loaded[k], after[k]) for k in after)
    fresh = call(mgr, V1, "load", "small", seed=2)
    fresh.load_state_dict(loaded)
    assert flow.equal(fresh.fc.weight, model.fc.weight)


def test_other_values_come_back_by_value(mgr):
    v = call(mgr, V1, "load", "values")
    assert v["fn"](4) == 7 and v["text"] == "hello"
    assert v["array"].dtype == np.int32 and v["array"].tolist() == np.arange(12).reshape(3, 4).tolist()
    assert v["array"].flags.writeable
    v["array"][0, 0] = 99  # a private copy-on-write page: fine
    assert flow.equal(v["tensor"], flow.arange(6, dtype=flow.float32).reshape(2, 3))
    assert v["bf16"].dtype == flow.bfloat16 and v["bf16"].float().tolist() == [1.5] * 4
    assert v["grad"].requires_grad and not isinstance(v["grad"], flow.nn.Parameter)
    assert v["tied"][0] is v["tied"][1]
    assert v["device"] == flow.device("cpu")


def test_tensor_arguments_and_environment_reach_the_worker(mgr, monkeypatch):
    x = flow.arange(5, dtype=flow.float32)
    assert flow.equal(call(mgr, V1, "load", "scale", x, factor=3.0), x * 3)
    monkeypatch.setenv("FLOWHUB_WORKER_TEST_VAR", "seen")
    key = "test:env-fresh-worker"  # the environment is copied when a worker starts
    assert call(mgr, V1, "load", "echo_env", "FLOWHUB_WORKER_TEST_VAR", key=key) == ("seen", os.getcwd())


def test_untransferable_result_suggests_proxy(mgr):
    with pytest.raises(TransferError, match="proxy"):
        call(mgr, V1, "load", "generator")
    assert call(mgr, V1, "load", "version") == "v1"


def test_caller_settings_are_adopted_in_the_worker(mgr, tmp_path):
    from flowhub.context import CallSettings
    from flowhub.settings import resolve

    settings = CallSettings(resolve({"hub_dir": str(tmp_path / "hub"), "mode": "rebuild"}))
    got = mgr.call(repo_dir=V1, key=f"test:{V1}", op="load", model="hub_dir", settings=settings)
    assert got == str(tmp_path / "hub")


def test_through_the_hub_in_rebuild_mode(tmp_path):
    hub = flowhub.Hub(tmp_path / "hub", mode="rebuild")
    model = hub.load(V2, "small", source="local", seed=3)
    assert model(flow.randn(1, 3, 8, 8)).shape == (1, 20)
    assert hub.load(V2, "version", source="local") == "v2"
    assert "mypkg" not in sys.modules


def test_transfer_table_is_validated_before_any_view():
    from flowhub.worker.wire import transfer

    good = {"dtype": "float32", "shape": [2, 2], "offset": 0, "nbytes": 16}
    bad_tables = [
        [dict(good, dtype="object")],  # dtype outside the allow-list
        [dict(good, nbytes=12)],  # shape x itemsize != nbytes
        [dict(good, offset=64)],  # past the end of the payload
        [dict(good, offset=2)],  # misaligned
        [good, dict(good, offset=8)],  # overlap
        [dict(good, shape=[-2, -2])],
        "not a list",
    ]
    for table in bad_tables:
        with pytest.raises(TransferError):
            transfer.validate(table, 64)
    assert transfer.validate([good, dict(good, offset=16)], 64)
    fd = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 64)
    with pytest.raises(TransferError, match="sealed"):
        transfer.unpack(fd, 64, [good])  # closes fd
    packed = transfer.pack([np.arange(4, dtype=np.float32)])
    with pytest.raises(TransferError, match="announced"):
        transfer.unpack(packed.fd, packed.size + 64, packed.table)
    packed.fd = None
    packed = transfer.pack([np.arange(4, dtype=np.float32)])
    with pytest.raises(TransferError, match="uses only 16"):  # bytes no entry asks for are never mapped
        transfer.unpack(packed.fd, packed.size + 128, packed.table)
    packed.fd = None


# -- errors and crashes ---------------------------------------------------------------------------
def test_builtin_exception_keeps_its_type_and_names_the_call(mgr):
    with pytest.raises(ValueError) as info:
        call(mgr, V1, "load", "fail_value")
    text = str(info.value)
    assert "bad value from the repo" in text and "test/v1" in text and "fail_value" in text
    assert "Traceback" in text and "hubconf.py" in text
    with pytest.raises(KeyError) as info:
        call(mgr, V1, "load", "fail_key")
    assert "fail_key" in str(info.value.__cause__)
    with pytest.raises(EntrypointError):
        call(mgr, V1, "load", "no_such_entry")


def test_repo_defined_exception_becomes_hubconf_error(mgr):
    with pytest.raises(HubconfError) as info:
        call(mgr, V1, "load", "fail_custom")
    text = str(info.value)
    assert "mypkg.errors.CustomError" in text and "repo-specific failure" in text and "test/v1" in text


def test_hubconf_that_cannot_be_imported(mgr):
    broken = os.path.join(REPOS, "broken")
    for _ in range(2):  # the broken worker is retired; a second call fails the same way
        with pytest.raises(ModuleNotFoundError, match="flowhub_test_module_that_does_not_exist"):
            call(mgr, broken, "list")
    assert mgr.worker_pid(f"test:{broken}") is None
    assert not stray_children(mgr)
    assert call(mgr, V1, "load", "version") == "v1"


def test_sys_exit_in_a_hubconf_is_an_error_not_an_exit(mgr):
    key = "test:crash:sys_exit"
    pid = call(mgr, V1, "load", "pid", key=key)
    with pytest.raises(HubconfError, match=r"'sys_exit'.*SystemExit: 5"):
        call(mgr, V1, "load", "sys_exit", key=key)
    assert call(mgr, V1, "load", "pid", key=key) == pid  # neither the caller nor the worker exited


@pytest.mark.parametrize("entry, expected", [
    ("exit_hard", "exited with code 3"),
    ("abort", "SIGABRT"),
    ("segfault", "SIGSEGV"),
])
def test_worker_crash_is_reported_and_recovered(mgr, entry, expected):
    key = f"test:crash:{entry}"
    old_pid = call(mgr, V1, "load", "pid", key=key)
    with pytest.raises(WorkerCrashedError, match=expected) as info:
        call(mgr, V1, "load", entry, key=key)
    assert entry in str(info.value)
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert not stray_children(mgr)
    new_pid = call(mgr, V1, "load", "pid", key=key)
    assert new_pid != old_pid
    assert call(mgr, V1, "load", "small", key=key)(flow.ones(1, 3, 4, 4)).shape == (1, 10)


def test_worker_killed_from_outside_is_replaced(mgr):
    key = "test:killed"
    pid = call(mgr, V1, "load", "pid", key=key)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    assert call(mgr, V1, "load", "pid", key=key) != pid


def test_timeout_kills_the_worker(mgr):
    key = "test:hang"
    start = time.monotonic()
    with pytest.raises(WorkerTimeoutError, match="2 s") as info:
        call(mgr, V1, "load", "hang", key=key, _timeout=2)
    assert 1.9 < time.monotonic() - start < 5
    assert isinstance(info.value, TimeoutError)
    assert mgr.worker_pid(key) is None and not stray_children(mgr)
    assert call(mgr, V1, "load", "hang", 0.1, key=key, _timeout=2) is None


# -- reuse and resources --------------------------------------------------------------------------
def test_worker_is_reused(mgr):
    first = call(mgr, V1, "load", "pid")
    assert call(mgr, V1, "load", "pid") == first == mgr.worker_pid(f"test:{V1}")
    assert first in mgr.active_pids()


def test_edited_hubconf_gets_a_fresh_worker(mgr, tmp_path):
    repo = tmp_path / "local_repo"
    repo.mkdir()
    (repo / "hubconf.py").write_text("import os\ndef answer():\n    return 1, os.getpid()\n")
    first, pid = call(mgr, str(repo), "load", "answer")
    (repo / "hubconf.py").write_text("import os\ndef answer():\n    return 2, os.getpid()\n")
    st = os.stat(repo / "hubconf.py")
    os.utime(repo / "hubconf.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse clocks
    second, new_pid = call(mgr, str(repo), "load", "answer")
    assert (first, second) == (1, 2) and new_pid != pid
    assert call(mgr, str(repo), "load", "answer")[1] == new_pid


def test_concurrent_calls_from_threads(mgr):
    results, errors = [], []

    def work(repo, i):
        try:
            model = call(mgr, repo, "load", "small", seed=i)
            results.append((repo, model(flow.ones(1, 3, 4, 4)).shape))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(V1 if i % 2 else V2, i)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    assert all(shape == ((1, 10) if repo == V1 else (1, 20)) for repo, shape in results)


def test_many_loads_leak_no_processes_fds_or_mappings(mgr):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    def memfd_maps():
        with open("/proc/self/maps") as f:
            return sum("memfd:" in line for line in f)

    call(mgr, V1, "load", "small")  # warm
    gc.collect()
    base = fds(), memfd_maps(), sorted(mgr.active_pids())
    worker_fds = len(os.listdir(f"/proc/{mgr.worker_pid(f'test:{V1}')}/fd"))
    for i in range(30):
        model = call(mgr, V1, "load", "small", seed=i)
        assert model(flow.ones(1, 3, 4, 4)).shape == (1, 10)
    del model
    deadline = time.monotonic() + 2  # oneflow frees tensors asynchronously, a few ms after the last op
    while (fds(), memfd_maps()) != base[:2] and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert (fds(), memfd_maps(), sorted(mgr.active_pids())) == base
    assert len(os.listdir(f"/proc/{mgr.worker_pid(f'test:{V1}')}/fd")) == worker_fds
    assert not stray_children(mgr)


def test_call_from_a_short_lived_thread_keeps_the_zygote(tmp_path):
    own = WorkerManager(zygote_start="spawn")
    try:
        box = {}
        t = threading.Thread(target=lambda: box.update(pid=call(own, V1, "load", "pid")))
        t.start()
        t.join()
        time.sleep(0.2)  # PR_SET_PDEATHSIG would fire now if the zygote's parent were that thread
        assert call(own, V1, "load", "pid") == box["pid"]
    finally:
        own.shutdown()
    assert own.active_pids() == []


def test_lru_cap_and_idle_reaping():
    own = WorkerManager(idle_timeout=1.0, max_workers=2, zygote_start="auto")  # a zygote of its own, reaped too
    try:
        for name in ("a", "b", "c"):
            call(own, V1, "load", "pid", key=f"lru:{name}")
        assert own.worker_pid("lru:a") is None and own.worker_pid("lru:c") is not None
        assert len(own.active_pids()) == 3  # zygote + 2 workers
        deadline = time.monotonic() + 6
        while own.active_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert own.active_pids() == []  # idle workers reaped, then the zygote
        assert call(own, V1, "load", "version", key="lru:a") == "v1"  # and everything restarts
    finally:
        own.shutdown()
    assert not stray_children(own, get_manager())


def test_mock_torch_runs_torch_style_repos(mgr):
    repo = os.path.join(REPOS, "torchstyle")
    model = mgr.call(repo_dir=repo, key="test:torchstyle|mock", op="load", model="tiny", mock_torch=True)
    assert isinstance(model, flow.nn.Module)
    assert model(flow.ones(3, 4)).shape == (3, 2)
    assert "torch" not in sys.modules
    assert mgr.call(repo_dir=repo, key="test:torchstyle|mock", op="help", model="tiny",
                    mock_torch=True) == "A torch-style module."
    with pytest.raises(ModuleNotFoundError, match="torch"):
        mgr.call(repo_dir=repo, key="test:torchstyle|plain", op="load", model="tiny")


@pytest.mark.parametrize("start, end", [("fork", "kill"), ("spawn", "kill"), ("fork", "exit"), ("shared", "kill"),
                                        ("shared", "exit")])
def test_caller_killed_or_exiting_leaves_no_worker(tmp_path, start, end):
    """With ``FLOWHUB_ZYGOTE=process``, a fresh single-threaded caller forks its zygote; one that
    imported oneflow first spawns it; by default workers come from the shared zygote service. Either
    way the caller's own ``models`` module (imported, or in its folder) must not leak into the
    workers, and the caller exiting or getting SIGKILL must take every worker down (and its own
    zygote; a shared service stays up for the next process)."""
    (tmp_path / "models.py").write_text("CALLER = True\n")
    probe = tmp_path / "probe_repo"
    probe.mkdir()
    (probe / "hubconf.py").write_text("def probe():\n    import models\n    return models.CALLER\n")
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        import models  # the caller's own module named like the repository's package
        import flowhub
        if {start!r} == "spawn":
            import oneflow  # threads: the zygote must not be forked from here
        from flowhub.worker.host.pool import get_manager
        m = get_manager()
        net = m.call(repo_dir={os.path.join(REPOS, "colliding_a")!r}, key="a", op="load", model="net")
        assert net.name == "repo-a" and models.CALLER, net.name
        assert m.zygote_started_by == {start!r}, m.zygote_started_by
        try:  # the caller's folder is not on the workers' import path
            m.call(repo_dir={str(probe)!r}, key="probe", op="load", model="probe")
            raise AssertionError("the caller's models.py leaked into a worker")
        except ModuleNotFoundError:
            pass
        m.call(repo_dir={V2!r}, key="b", op="load", model="small")
        own = m.active_pids()  # a zygote of its own and 3 workers; or 3 workers of the shared service
        print(" ".join(map(str, own if len(own) == 4 else [m.zygote_pid] + own)), flush=True)
        if {end!r} == "kill":
            time.sleep(60)
    """))
    env = dict(os.environ, FLOWHUB_ZYGOTE="shared" if start == "shared" else "process")
    proc = subprocess.Popen([PY, str(script)], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(proc.stderr.read())
        pids = [int(p) for p in line.split()]
        assert len(pids) == 4 and all(psutil.pid_exists(p) for p in pids)  # zygote + 3 workers
        zygote = pids[0]
        assert all(psutil.Process(p).ppid() == zygote for p in pids[1:])
        if start == "shared":  # the service is nobody's child; its workers are its own
            assert psutil.Process(zygote).ppid() != proc.pid
            pids = pids[1:]
    finally:
        if end == "kill":
            proc.kill()
        assert proc.wait(timeout=30) == (-signal.SIGKILL if end == "kill" else 0)
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    assert alive == []
    if start == "shared":
        assert psutil.pid_exists(zygote)  # still up, for the next process


def test_pytest_process_spawns_its_zygote():
    own = WorkerManager(zygote_start="auto")
    try:
        call(own, V1, "load", "pid")
        assert own.zygote_started_by == "spawn"  # oneflow is imported here: never fork this process
    finally:
        own.shutdown()
