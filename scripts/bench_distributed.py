#!/usr/bin/env python
"""4 ranks of one job (``python -m oneflow.distributed.launch --nproc_per_node 4``) loading the 400 MB model.

The model and its zipped checkpoint are bench_pretrained's (150 x ``Linear(817, 817)``, 300 tensors),
served by the loopback server; every contender starts from an empty cache, so each load includes the
downloads. Per job it reports the file bytes the ranks read during their loads (``rchar`` of
``/proc/<pid>/io``: ``read()`` calls, less the tensor bytes a rank received over OneFlow's comm, whose
socket reads rchar counts too (requests' ``recv`` is not counted); plus the size of every cache file
mapping a rank made, seen by an audit hook, since a load reads every page it maps) and the wall time from the ranks' common start (a barrier) to the
last rank holding a usable model:

* ``reference``: each rank runs the in-process ``oneflow.hub.load`` (its own hub folder: the reference
  has no coordination, and racing ranks on one folder can break it). It is given the repository as a
  local folder (the reference cannot fetch from the loopback server), so it is spared the archive;
* ``flowhub``: ``Hub(mode="inprocess")`` from the loopback "GitHub", one cache for the job;
* ``flowhub+bcast``: the same with ``broadcast_weights=True`` (``FLOWHUB_BROADCAST_WEIGHTS``).

Baseline of the byte ratios: one ``oneflow.hub.load`` in one process, measured the same way in the same
run; of the wall ratios: the reference job. Targets (issue 13): at most 1.1x the bytes of one load, wall
at most 0.5x. ``python scripts/bench_distributed.py``
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

import bench_pretrained  # noqa: E402
import build_hub  # noqa: E402

RANKS = 4

RUN = r'''
import json, os, sys, time
how, target, url, out = sys.argv[1:5]
rank = int(os.environ.get("RANK", "0"))
if how == "reference":
    os.environ["ONEFLOW_HOME"] = os.path.join(os.environ["ONEFLOW_HOME"], "rank-%d" % rank)
home = os.path.realpath(os.environ["ONEFLOW_HOME"])
import flowhub, oneflow as flow, oneflow.hub

def rchar():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("rchar"))

mapped = [0]

def audit(event, args):  # every mapping of a cache file: its pages are all read by the load that maps them
    if event == "mmap.__new__" and args[0] >= 0:
        try:
            path = os.path.realpath(os.readlink("/proc/self/fd/%d" % args[0]))
            if path.startswith(home + os.sep):
                mapped[0] += args[1] or os.fstat(args[0]).st_size - args[3]
        except OSError:
            pass

sys.addaudithook(audit)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    flow.comm.barrier()
start, before = time.time(), rchar()
if how == "reference":
    model = oneflow.hub.load(target, "big", url, source="local")
else:
    model = flowhub.Hub(mode="inprocess", broadcast_weights=how == "flowhub+bcast").load(target, "big", url,
                                                                                       trust_repo=True)
model[0](flow.ones(1, __WIDTH__)).numpy()
end = time.time()
# OneFlow's comm reads its sockets with read(), which rchar counts: take off what the broadcast brought
received = sum(v.numel() * 4 for v in model.state_dict().values()) if how == "flowhub+bcast" and rank else 0
read = rchar() - before - received + mapped[0]
with open(os.path.join(out, "%s-%d.json" % (how, rank)), "w") as f:
    json.dump({"start": start, "end": end, "read": read, "sum": float(model[-1].weight.sum())}, f)
'''.replace("__WIDTH__", str(bench_pretrained.WIDTH))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(root: str) -> str:
    """bench_pretrained's repository and checkpoint, plus the repository as a git repo the server serves."""
    repo = bench_pretrained.build(root)
    build_hub.git(Path(repo), "init", "-q", "-b", "main")
    build_hub.git(Path(repo), "add", "-A")
    build_hub.git(Path(repo), "commit", "-q", "-m", "big")
    build_hub.git(Path(root), "clone", "-q", "--bare", repo, os.path.join(root, "served", "bench", "big.git"))
    return repo


def run(how: str, target: str, url: str, root: str, out: str, ranks: int) -> list:
    from flowhub.settings import worker_environ  # without the variables ``import oneflow`` set here (RANK=-1...)

    env = dict(worker_environ(os.environ), ONEFLOW_HOME=os.path.join(root, f"home-{how}-{ranks}"),
               GLOG_minloglevel="2")
    os.makedirs(out, exist_ok=True)
    script = os.path.join(root, "rank.py")
    Path(script).write_text(RUN)
    cmd = [sys.executable, script, how, target, url, out]
    if ranks > 1:
        cmd = [sys.executable, "-m", "oneflow.distributed.launch", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), *cmd[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{how} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    results = [json.loads(Path(out, f"{how}-{r}.json").read_text()) for r in range(ranks)]
    if len({r["sum"] for r in results}) != 1:
        raise SystemExit(f"{how}: the ranks' models differ: {[r['sum'] for r in results]}")
    return results


def main() -> None:
    from flowhub.server import GitHubServer

    with tempfile.TemporaryDirectory(prefix="flowhub-bench-distributed-") as root:
        repo = build(root)
        payload = bench_pretrained.LAYERS * (bench_pretrained.WIDTH ** 2 + bench_pretrained.WIDTH) * 4
        with GitHubServer(os.path.join(root, "served")) as server:
            os.environ.update(FLOWHUB_GITHUB_URL=server.url, FLOWHUB_GITHUB_API_URL=server.api_url)
            url = f"{server.url}/bench/big/releases/download/v1/big.zip"
            one = run("reference", repo, url, root, os.path.join(root, "out-one"), 1)[0]["read"]
            jobs = {}
            for how in ("reference", "flowhub", "flowhub+bcast"):
                results = run(how, repo if how == "reference" else "bench/big", url, root,
                              os.path.join(root, "out"), RANKS)
                jobs[how] = (sum(r["read"] for r in results),
                             max(r["end"] for r in results) - min(r["start"] for r in results))
            weights = server.count("/releases/download/")
    base_wall = jobs["reference"][1]
    print(f"{RANKS} ranks, one job, loading a {payload / 1e6:.0f} MB model from an empty cache; bytes = file bytes "
          f"read by all ranks during their loads; one oneflow.hub load in one process read {one / 1e6:.0f} MB")
    for how, (read, wall) in jobs.items():
        print(f"  {how:<14} read {read / 1e6:7.0f} MB ({read / one:.2f}x one load)  wall {wall:6.2f} s "
              f"({wall / base_wall:.2f}x reference)")
    read, wall = jobs["flowhub+bcast"]
    bytes_ok, wall_ok = read / one <= 1.1, wall / base_wall <= 0.5
    print(f"  flowhub+bcast: bytes {read / one:.2f}x one load (target <= 1.1x) {'OK' if bytes_ok else 'MISSED'}; "
          f"wall {wall / base_wall:.2f}x reference (target <= 0.5x) {'OK' if wall_ok else 'MISSED'}")
    print(f"  weight downloads in the run: {weights} (expected 1 single load + {RANKS} reference ranks + 1 + 1)")


if __name__ == "__main__":
    main()
