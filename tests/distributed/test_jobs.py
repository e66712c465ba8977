"""Real jobs: ``python -m oneflow.distributed.launch`` starting real ranks (CPU) that load from the loopback
server; the server's request log is the witness of how often each archive and checkpoint was fetched."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from conftest import make_repo, push_commit
from flowhub.server import Fault

OWNER, NAME = "flowhub-jobs", "ranked"
SPEC = f"{OWNER}/{NAME}"

HUBCONF = '''
import oneflow as flow
VERSION = "{version}"
dependencies = ["oneflow"]

def summed(url, scale=1.0):
    """The weights at ``url``, summed per tensor, and this version's name."""
    state = flow.hub.load_state_dict_from_url(url, progress=False)
    return {{"version": VERSION, "sums": {{k: round(float(v.sum()) * scale, 5) for k, v in sorted(state.items())}}}}
'''

RANK_SCRIPT = '''
import json, os, sys, time
cfg = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
open(os.path.join(cfg["dir"], "pid-%d" % rank), "w").write(str(os.getpid()))
if cfg.get("home_per_node"):
    os.environ["ONEFLOW_HOME"] = os.path.join(cfg["dir"], "node-%d" % (rank - int(os.environ["LOCAL_RANK"])))
if cfg.get("home_per_rank"):
    os.environ["ONEFLOW_HOME"] = os.path.join(cfg["dir"], "rank-%d" % rank)
gate = cfg.get("gate", {}).get(str(rank))
while gate and not os.path.exists(gate):
    time.sleep(0.02)
import flowhub
hub = flowhub.Hub(mode=cfg.get("mode", "inprocess"))
out = hub.load(cfg["spec"], "summed", cfg["url"], trust_repo=True)
result = json.dumps({"rank": rank, "sha": hub.last_provenance.sha, "out": out, "home": os.environ["ONEFLOW_HOME"]})
with open(os.path.join(cfg["dir"], "result-%d.json.tmp" % rank), "w") as f:  # ranks share stdout: a file each
    f.write(result)
os.replace(os.path.join(cfg["dir"], "result-%d.json.tmp" % rank), os.path.join(cfg["dir"], "result-%d.json" % rank))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def job_repo(hub_root) -> Dict[str, str]:
    return make_repo(hub_root, OWNER, NAME, {"hubconf.py": HUBCONF.format(version="v1")})


@pytest.fixture
def weights_url(gh, example) -> str:
    return f"{gh.url}/flowhub-examples/tiny-models/releases/download/v0.1/{example['weights']['v0.1']['tinynet']}"


class Launch:
    """One ``oneflow.distributed.launch`` group (a simulated node when ``nnodes`` > 1)."""

    def __init__(self, tmp_path: Path, cfg: dict, nproc: int, port: int, nnodes: int = 1, node_rank: int = 0,
                 env: Optional[Dict[str, str]] = None) -> None:
        script = tmp_path / "rank.py"
        script.write_text(RANK_SCRIPT)
        cmd = [sys.executable, "-m", "oneflow.distributed.launch", "--nproc_per_node", str(nproc), "--nnodes",
               str(nnodes), "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(script), json.dumps(dict(cfg, dir=str(tmp_path)))]
        self.dir, self.ranks = tmp_path, range(node_rank * nproc, (node_rank + 1) * nproc)
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)

    def results(self, timeout: float = 240, check: bool = True) -> List[dict]:
        out, err = self.proc.communicate(timeout=timeout)
        self.err = err
        assert self.proc.returncode == 0 or not check, f"launcher rc={self.proc.returncode}\n{out}\n{err[-4000:]}"
        done = [self.dir / f"result-{rank}.json" for rank in self.ranks]
        return [json.loads(path.read_text()) for path in done if path.exists()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def run_job(tmp_path: Path, cfg: dict, nproc: int, env: Optional[Dict[str, str]] = None) -> List[dict]:
    launch = Launch(tmp_path, cfg, nproc, free_port(), env=env)
    try:
        results = launch.results()
    finally:
        launch.stop()
    assert sorted(r["rank"] for r in results) == list(range(nproc)), launch.err[-3000:]
    return results


def run_nodes(tmp_path: Path, cfg: dict, nproc: int, env: Optional[Dict[str, str]] = None) -> List[dict]:
    """Two launcher groups (node ranks 0 and 1) of ``nproc`` ranks each, one job."""
    port = free_port()
    nodes = [Launch(tmp_path, cfg, nproc, port, nnodes=2, node_rank=n, env=env) for n in (0, 1)]
    try:
        results = [r for node in nodes for r in node.results()]
    finally:
        for node in nodes:
            node.stop()
    assert sorted(r["rank"] for r in results) == list(range(2 * nproc))
    return results


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def assert_agree(results: List[dict], sha: str) -> None:
    assert {r["sha"] for r in results} == {sha}
    outs = [json.dumps(r["out"], sort_keys=True) for r in results]
    assert len(set(outs)) == 1 and results[0]["out"]["sums"], outs


@pytest.mark.timeout(300)
def test_two_ranks_load_one_commit_fetched_once_even_when_the_branch_moves(gh, job_repo, weights_url, hub_root,
                                                                           tmp_path):
    """Rank 1 starts only after main moved on the server (just after rank 0 resolved it): both load the
    commit rank 0 resolved, and the archive (by that SHA) and the weights are each fetched once. Default
    mode: the entrypoint runs in worker processes, which must not join the job."""
    moved = tmp_path / "moved"
    cfg = {"spec": SPEC, "url": weights_url, "mode": "rebuild", "gate": {"1": str(moved)}}
    launch = Launch(tmp_path, cfg, 2, free_port(), env={"FLOWHUB_CACHE_SHARED": "1"})
    try:
        wait_for(lambda: gh.count(f"/repos/{SPEC}/branches") >= 1, 120, "rank 0 to resolve main")
        new_sha = push_commit(hub_root, OWNER, NAME, {"hubconf.py": HUBCONF.format(version="v2")})
        moved.touch()
        results = launch.results()
    finally:
        launch.stop()
    assert new_sha != job_repo["main"]
    assert_agree(results, job_repo["main"])
    assert results[0]["out"]["version"] == "v1"
    assert gh.count("/zipball/") == 1 and gh.count(f"/zipball/{job_repo['main']}") == 1
    assert gh.count("legacy.zip") == 1
    assert gh.count("/releases/download/") == 1
    assert gh.count(f"/repos/{SPEC}/branches") == 1  # one resolve per job


@pytest.mark.timeout(300)
def test_four_ranks_probe_one_cache_and_fetch_once(gh, job_repo, weights_url, tmp_path, hub_dir):
    results = run_job(tmp_path, {"spec": SPEC, "url": weights_url}, 4)
    assert_agree(results, job_repo["main"])
    assert gh.count("legacy.zip") == 1
    assert gh.count("/releases/download/") == 1
    assert gh.count(f"/repos/{SPEC}/branches") == 1
    assert not list((hub_dir / ".flowhub" / "jobs").iterdir())  # the probe cleaned up after itself


@pytest.mark.timeout(300)
def test_locks_that_lock_nothing_do_not_make_ranks_fetch_twice(gh, job_repo, weights_url, tmp_path, hub_dir):
    """A lock timeout of ~0 makes every lock wait give up at once, as on a filesystem whose locks are
    unusable: the ranks still fetch once, since who fetches comes from the job, not from the lock, and the
    fetches are slow enough that every waiter would have given up on the lock."""
    gh.add_fault(Fault("*/legacy.zip/*", "slow", times=None, seconds=1.5))
    gh.add_fault(Fault("*/releases/download/*", "slow", times=None, seconds=1.5))
    results = run_job(tmp_path, {"spec": SPEC, "url": weights_url}, 4, env={"FLOWHUB_LOCK_TIMEOUT": "0.001"})
    assert_agree(results, job_repo["main"])
    assert gh.count("legacy.zip") == 1
    assert gh.count("/releases/download/") == 1


@pytest.mark.timeout(400)
def test_two_simulated_nodes_fetch_once_per_node_local_cache_and_once_on_a_shared_one(gh, job_repo, weights_url,
                                                                                     tmp_path):
    (tmp_path / "a").mkdir()
    local = run_nodes(tmp_path / "a", {"spec": SPEC, "url": weights_url, "home_per_node": True}, 2)
    assert_agree(local, job_repo["main"])
    assert len({r["home"] for r in local}) == 2
    assert gh.count("legacy.zip") == 2  # one per node
    assert gh.count("/releases/download/") == 2
    assert gh.count(f"/repos/{SPEC}/branches") == 1  # still one resolve per job
    gh.clear_log()
    (tmp_path / "b").mkdir()
    shared = run_nodes(tmp_path / "b", {"spec": SPEC, "url": weights_url}, 2)
    assert_agree(shared, job_repo["main"])
    assert len({r["home"] for r in shared}) == 1
    assert gh.count("legacy.zip") == 1
    assert gh.count("/releases/download/") == 1


@pytest.mark.timeout(400)
def test_a_rank_killed_mid_fetch_is_taken_over_and_the_cache_stays_sound(gh, job_repo, weights_url, tmp_path,
                                                                         hub_dir):
    """Two simulated nodes on one shared cache; rank 0 (the fetcher) is SIGKILLed while the archive
    streams. Its node's launcher ends; rank 1, on the other node, sees the holder is dead, fetches the
    archive itself and finishes its load (OneFlow then aborts it at exit, as it does any rank whose master
    died). The next job on that cache loads without fetching anything again."""
    gh.add_fault(Fault("*/legacy.zip/*", "slow", times=1, seconds=30))
    cfg = {"spec": SPEC, "url": weights_url}
    env = {"FLOWHUB_CACHE_SHARED": "1", "FLOWHUB_JOB_TIMEOUT": "20"}
    port = free_port()
    nodes = [Launch(tmp_path, cfg, 1, port, nnodes=2, node_rank=n, env=env) for n in (0, 1)]
    try:
        wait_for(lambda: gh.count("legacy.zip") == 1, 120, "rank 0 to start fetching the archive")
        time.sleep(0.5)
        os.kill(int((tmp_path / "pid-0").read_text()), signal.SIGKILL)
        nodes[0].proc.wait(timeout=60)
        assert nodes[0].proc.returncode != 0
        # OneFlow itself aborts a rank at exit once the job's master (rank 0) is gone: the load is what counts
        survivor = nodes[1].results(timeout=120, check=False)
    finally:
        for node in nodes:
            node.stop()
    assert [r["rank"] for r in survivor] == [1]
    assert survivor[0]["sha"] == job_repo["main"]
    assert "stopped while downloading" in nodes[1].err  # it took over, naming the dead holder
    assert gh.count("legacy.zip") == 2
    gh.clear_log()
    (tmp_path / "next").mkdir()
    again = run_job(tmp_path / "next", cfg, 2)
    assert_agree(again, job_repo["main"])
    assert gh.count("legacy.zip") == 0 and gh.count("/releases/download/") == 0
    assert again[0]["out"] == survivor[0]["out"]


@pytest.mark.timeout(300)
def test_broadcast_weights_one_rank_reads_the_checkpoint_the_others_receive_it(gh, job_repo, weights_url, tmp_path):
    """Each rank has its own cache (the probe finds that): each fetches the small archive, but with
    FLOWHUB_BROADCAST_WEIGHTS=1 only rank 0 fetches and reads the checkpoint; rank 1's cache never holds it,
    and both get the same tensors."""
    results = run_job(tmp_path, {"spec": SPEC, "url": weights_url, "home_per_rank": True}, 2,
                      env={"FLOWHUB_BROADCAST_WEIGHTS": "1"})
    assert_agree(results, job_repo["main"])
    assert len({r["home"] for r in results}) == 2
    assert gh.count("legacy.zip") == 2  # one per cache
    assert gh.count("/releases/download/") == 1  # one per job
    assert (tmp_path / "rank-0" / "hub" / "checkpoints").is_dir()
    assert not (tmp_path / "rank-1" / "hub" / "checkpoints").exists()


@pytest.mark.timeout(300)
def test_rank_0_failing_to_resolve_fails_every_rank_with_its_error(gh, job_repo, weights_url, tmp_path):
    launch = Launch(tmp_path, {"spec": f"{SPEC}:no-such-branch", "url": weights_url}, 2, free_port())
    try:
        out, err = launch.proc.communicate(timeout=240)
    finally:
        launch.stop()
    assert launch.proc.returncode != 0 and not list(tmp_path.glob("result-*"))
    assert "flowhub.errors.ResolveError: Cannot find no-such-branch" in err  # rank 0's own error
    assert "flowhub.errors.JobError: Rank 0 failed while resolving flowhub-jobs/ranked:no-such-branch, so this " \
           "rank stops too: ResolveError: Cannot find no-such-branch" in err
    assert gh.count("/zipball/") == 0
