"""The parts of a job that need no launcher: detection from the variables, settings, holder files and
bounded waits on real locks held by real processes, and doctor's job view."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import flowhub
from flowhub.cache import holders, store
from flowhub.distributed.job import detect
from flowhub.errors import CacheWaitTimeoutError
from flowhub.settings import JOB_VARIABLES, resolve, worker_environ

FULL = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}


def test_a_full_set_of_launcher_variables_is_a_job():
    job = detect(FULL)
    assert (job.rank, job.world_size, job.local_rank, job.node_first_rank) == (5, 8, 1, 4)
    assert job.master == "10.0.0.1:29500"
    assert detect({}) is None
    assert detect(dict(FULL, WORLD_SIZE="1", RANK="0")) is None  # one rank: nothing to coordinate
    # what ``import oneflow`` itself sets outside a job
    assert detect({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "40000", "WORLD_SIZE": "1", "RANK": "-1",
                   "LOCAL_RANK": "0"}) is None


@pytest.mark.parametrize("missing", ["MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK"])
def test_a_partial_set_warns_naming_the_missing_variable(missing):
    env = {k: v for k, v in FULL.items() if k != missing}
    with pytest.warns(UserWarning, match=f"{missing} is not") as caught:
        assert detect(env) is None
    assert "rank 0 of 1" in str(caught[0].message)


def test_inconsistent_variables_are_refused():
    with pytest.raises(ValueError, match="below the world size"):
        detect(dict(FULL, RANK="8"))
    with pytest.raises(ValueError, match="RANK='x' is not a whole number"):
        detect(dict(FULL, RANK="x"))


def test_workers_never_get_the_launcher_variables():
    env = worker_environ(dict(FULL, PATH="/bin", NODE_RANK="0", GROUP_RANK="0", LOCAL_WORLD_SIZE="2"))
    assert env == {"PATH": "/bin"}
    assert not set(env) & set(JOB_VARIABLES)


def test_cache_layout_and_broadcast_settings(monkeypatch):
    assert resolve({}).cache_shared == "auto" and resolve({}).broadcast_weights is False
    assert flowhub.Hub(cache_shared=True).settings().cache_shared == "1"
    assert flowhub.Hub(cache_shared="local").settings().cache_shared == "0"
    monkeypatch.setenv("FLOWHUB_CACHE_SHARED", "1")
    monkeypatch.setenv("FLOWHUB_BROADCAST_WEIGHTS", "yes")
    assert (resolve({}).cache_shared, resolve({}).broadcast_weights) == ("1", True)
    monkeypatch.setenv("FLOWHUB_CACHE_SHARED", "sometimes")
    with pytest.raises(ValueError, match="FLOWHUB_CACHE_SHARED"):
        resolve({})
    monkeypatch.setenv("FLOWHUB_CACHE_SHARED", "auto")
    monkeypatch.setenv("FLOWHUB_JOB_TIMEOUT", "0")
    with pytest.raises(ValueError, match="FLOWHUB_JOB_TIMEOUT"):
        resolve({})


HOLD_LOCK = """
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_a_lock_left_by_a_dead_host_does_not_hang_the_waiter(tmp_path):
    """The lock stays held (as an NFS lock of a host that died can), and its holder file names another
    host whose heartbeat stopped: the waiter goes on after the stale time, far below the lock timeout,
    and says who held it (the lock timeout, 600 s, is far beyond the test's own timeout)."""
    lock = str(tmp_path / "entry.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with open(holders.holder_path(lock), "w") as f:
            json.dump({"host": "node-that-died", "pid": 4242, "rank": 3, "since": time.time(), "id": "x"}, f)
        with pytest.warns(UserWarning, match="pid 4242 on host node-that-died \\(rank 3\\).*dead or stalled"):
            with store.entry_lock(lock, 600, "downloading a thing") as got:
                assert got is False  # went on without the lock
                assert holders.read(lock)["host"] == socket.gethostname()  # and says it holds the entry now
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.timeout(60)
def test_a_rank_waiting_for_a_live_fetcher_fails_within_its_timeout_naming_it(tmp_path):
    lock = str(tmp_path / "entry.lock")
    release = threading.Event()
    holding = threading.Event()

    def fetcher():
        with store.entry_lock(lock, 600, "downloading big.zip", rank=0):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=fetcher)
    thread.start()
    try:
        assert holding.wait(10)
        with pytest.raises(CacheWaitTimeoutError) as info:
            with store.entry_lock(lock, 600, "downloading big.zip", done=lambda: False, defer=True, wait_timeout=2):
                pass
        text = str(info.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()} (rank 0)" in text
        assert "FLOWHUB_JOB_TIMEOUT" in text and "downloading big.zip" in text
    finally:
        release.set()
        thread.join()
    assert holders.read(lock) is None  # the holder file goes with the holder


def test_a_waiting_rank_returns_as_soon_as_the_entry_is_there(tmp_path):
    lock = str(tmp_path / "entry.lock")
    entry = tmp_path / "entry"
    threading.Timer(0.3, entry.touch).start()
    with store.entry_lock(lock, 600, "downloading", done=entry.exists, defer=True, wait_timeout=20) as got:
        assert got is False and entry.exists()


@pytest.mark.timeout(120)
def test_doctor_shows_the_job_view_without_starting_comm(tmp_path):
    env = dict(os.environ, **FULL, ONEFLOW_HOME=str(tmp_path), FLOWHUB_CACHE_SHARED="1")
    out = subprocess.run([sys.executable, "-m", "flowhub", "doctor", "--json"], env=env, capture_output=True,
                         text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)["job"]
    assert (job["in_job"], job["rank"], job["world_size"], job["local_rank"]) == (True, 5, 8, 1)
    assert job["cache"].startswith("shared")
    assert job["comm"].startswith("not started")
    text = subprocess.run([sys.executable, "-m", "flowhub", "doctor"], env=dict(env, WORLD_SIZE=""),
                          capture_output=True, text=True, timeout=100).stdout
    assert "job:             none: flowhub: MASTER_ADDR, MASTER_PORT, RANK are set but WORLD_SIZE is not" in text


def test_a_load_with_a_partial_set_warns_and_loads_as_outside_a_job(gh, example, monkeypatch, hub_dir):
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):  # ``import oneflow`` may have set them here
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match="MASTER_ADDR, MASTER_PORT are not"):
        names = flowhub.Hub(mode="inprocess").list("flowhub-examples/tiny-models:v0.1", trust_repo=True)
    assert "tinynet" in names
    assert not (hub_dir / ".flowhub" / "jobs").exists()  # no probe: not a job
