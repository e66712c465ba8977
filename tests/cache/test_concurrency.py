"""Many processes on one cache: real processes started together on a cold cache, real locks, real
SIGKILL, the loopback server's request log as the witness of what was fetched how often."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Dict, List

import oneflow as flow
import pytest

import flowhub
from flowhub.server import Fault

REPO = "flowhub-examples/tiny-models"
SPEC = f"{REPO}:v0.1"
PROCESSES = 8

DIGEST_CODE = """
import hashlib
def digest(state):
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].numpy().tobytes())
    return h.hexdigest()
"""


def state_digest(state: Dict[str, flow.Tensor]) -> str:
    namespace: dict = {}
    exec(DIGEST_CODE, namespace)
    return namespace["digest"](state)


def release_asset(hub_root: Path, example, name: str = "tinynet") -> Path:
    releases = hub_root / "flowhub-examples" / "tiny-models" / "releases" / "download"
    return releases / "v0.1" / example["weights"]["v0.1"][name]


def expected_digest(asset: Path, tmp_path: Path) -> str:
    """The digest of the release's checkpoint, read straight from the server's folder."""
    out = tmp_path / "expected"
    with zipfile.ZipFile(asset) as zf:
        zf.extractall(out)
        inner = zf.namelist()[0].split("/")[0]
    return state_digest(flow.load(str(out / inner)))


def leftovers(root: Path) -> List[str]:
    found = [str(p) for p in root.rglob("*.partial")]
    for tmp in root.rglob(".flowhub/tmp"):
        found += [str(p) for p in tmp.iterdir()]
    return sorted(found)


def popen_python(code: str, env: Dict[str, str] = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"a process ended (rc={proc.returncode}) before {what}:\n{proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def kill_all(procs) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_together(gh, barrier: Path, env: Dict[str, str] = None) -> List[str]:
    """Start PROCESSES processes that each load tinynet with pretrained weights as soon as all are ready
    (a start barrier); return their stdout lines. The archive and the weights each take ~2 s to arrive,
    which widens the race window."""
    barrier.mkdir()
    gh.add_fault(Fault("*/legacy.zip/*", "slow", times=None, seconds=2))
    gh.add_fault(Fault("*/releases/download/*", "slow", times=None, seconds=2))
    code = f"""
import os, sys, time
import flowhub, oneflow  # before the barrier: the race is about the cache, not about imports
{DIGEST_CODE}
open(os.path.join({str(barrier)!r}, "ready-%d" % os.getpid()), "w").close()
while not os.path.exists(os.path.join({str(barrier)!r}, "go")):
    time.sleep(0.002)
model = flowhub.load({SPEC!r}, "tinynet", pretrained=True, trust_repo=True)
print("DIGEST", digest(model.state_dict()))
"""
    procs = [popen_python(code, env) for _ in range(PROCESSES)]
    try:
        wait_for(lambda: len(list(barrier.glob("ready-*"))) == PROCESSES, 120, "all processes to be ready", procs)
        (barrier / "go").touch()
        results = [proc.communicate(timeout=150) for proc in procs]
    finally:
        kill_all(procs)
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
    return [out for out, _ in results]


def assert_cache_complete(hub_dir: Path, asset: Path) -> None:
    assert sorted(p.name for p in hub_dir.iterdir()) == [".flowhub", "checkpoints", "flowhub-examples_tiny-models_v0.1",
                                                        "trusted_list"]
    assert (hub_dir / "trusted_list").read_text().split() == ["flowhub-examples_tiny-models"]
    assert sorted(p.name for p in (hub_dir / "checkpoints").iterdir()) == [
        ".flowhub", asset.name, asset.name + ".extracted"]
    assert hashlib.sha256((hub_dir / "checkpoints" / asset.name).read_bytes()).hexdigest() == \
        hashlib.sha256(asset.read_bytes()).hexdigest()
    assert leftovers(hub_dir) == []


@pytest.mark.timeout(180)
def test_many_processes_on_a_cold_cache_fetch_everything_once(gh, example, hub_root, hub_dir, tmp_path):
    asset = release_asset(hub_root, example)
    want = expected_digest(asset, tmp_path)
    for out in run_together(gh, tmp_path / "barrier"):
        assert f"DIGEST {want}" in out.splitlines(), out
    assert gh.count("/zipball/") == 1
    assert gh.count("legacy.zip") == 1
    assert gh.count(f"/releases/download/v0.1/{asset.name}") == 1
    assert gh.count("/releases/download/") == 1  # and no other weight file
    assert_cache_complete(hub_dir, asset)


@pytest.mark.timeout(180)
def test_many_processes_going_on_without_the_lock_still_get_correct_results(gh, example, hub_root, hub_dir, tmp_path):
    """Correctness must not depend on the locks: with FLOWHUB_LOCK_TIMEOUT far below the download time,
    the waiters give up on the lock and download, extract and publish concurrently with the holder."""
    asset = release_asset(hub_root, example)
    want = expected_digest(asset, tmp_path)
    for out in run_together(gh, tmp_path / "barrier", env={"FLOWHUB_LOCK_TIMEOUT": "0.05"}):
        assert f"DIGEST {want}" in out.splitlines(), out
    assert gh.count("legacy.zip") > 1  # they really did go on without the lock
    assert_cache_complete(hub_dir, asset)


@pytest.mark.timeout(120)
def test_lock_of_a_sigkilled_process_does_not_block_the_next(gh, example, hub_root, hub_dir, tmp_path, capfd):
    asset = release_asset(hub_root, example)
    url = f"{gh.url}/{REPO}/releases/download/v0.1/{asset.name}"
    checkpoints = hub_dir / "checkpoints"
    gh.add_fault(Fault("*/releases/download/*", "slow", seconds=60))
    holder = popen_python(f"import flowhub; flowhub.load_state_dict_from_url({url!r}, progress=False)")
    try:
        # its temp file exists only while it holds the download lock
        wait_for(lambda: list(checkpoints.glob("*.partial")), 60, "the download to start", [holder])
        holder.send_signal(signal.SIGKILL)
        assert holder.wait(30) == -signal.SIGKILL
    finally:
        kill_all([holder])
    locks = list((checkpoints / ".flowhub" / "locks").iterdir())
    assert locks  # the lock file outlives its holder; the flock on it does not
    gh.clear_faults()
    capfd.readouterr()
    # FLOWHUB_LOCK_TIMEOUT is the default 600 s here: a stale lock would hang this call (and the test timeout).
    state = flowhub.load_state_dict_from_url(url, progress=False)
    err = capfd.readouterr().err
    assert "waiting for another process" not in err and "without the lock" not in err
    assert state_digest(state) == expected_digest(asset, tmp_path)
    assert hashlib.sha256((checkpoints / asset.name).read_bytes()).hexdigest() == \
        hashlib.sha256(asset.read_bytes()).hexdigest()


@pytest.mark.timeout(120)
def test_live_lock_holder_beyond_lock_timeout_is_not_waited_for(gh, example, hub_root, hub_dir, tmp_path, monkeypatch):
    asset = release_asset(hub_root, example)
    url = f"{gh.url}/{REPO}/releases/download/v0.1/{asset.name}"
    checkpoints = hub_dir / "checkpoints"
    want = expected_digest(asset, tmp_path)
    # The holder's first request stalls after 1000 bytes for 5 s (then the server hangs up and it resumes):
    # a live process that keeps the download lock far longer than the waiter's FLOWHUB_LOCK_TIMEOUT.
    gh.add_fault(Fault("*/releases/download/*", "stall", after_bytes=1000, seconds=5))
    holder = popen_python(f"import flowhub\n{DIGEST_CODE}\n"
                          f"print('DIGEST', digest(flowhub.load_state_dict_from_url({url!r}, progress=False)))",
                          env={"FLOWHUB_TIMEOUT": "30"})
    try:
        wait_for(lambda: list(checkpoints.glob("*.partial")), 60, "the holder to start downloading", [holder])
        monkeypatch.setenv("FLOWHUB_LOCK_TIMEOUT", "1")
        with pytest.warns(UserWarning, match="going on without the lock"):
            state = flowhub.load_state_dict_from_url(url, progress=False)
        assert state_digest(state) == want
        out, err = holder.communicate(timeout=60)
    finally:
        kill_all([holder])
    assert holder.returncode == 0, err
    assert f"DIGEST {want}" in out
    # Two writers published the same file, one atomic rename each: the result is whole and correct.
    assert hashlib.sha256((checkpoints / asset.name).read_bytes()).hexdigest() == \
        hashlib.sha256(asset.read_bytes()).hexdigest()
    assert gh.count("/releases/download/") >= 2  # the waiter really did not wait for the holder's download
    assert leftovers(hub_dir) == []
