#!/usr/bin/env python
"""Time from fork to a ready worker, with and without ``flowhub.sandbox.apply``.

This process plays the zygote: it imports flowhub and oneflow, warms the runtime with one op and
calls ``flowhub.sandbox.prepare()``. Each round forks a worker that (optionally) applies the default
sandbox policy, says "ready" on a pipe, runs one small conv forward, says "done" and exits. The
plain and sandboxed variants alternate, so drift in the machine affects both alike.

    python scripts/bench_sandbox.py [--rounds 30]

A second section measures the same through flowhub's own machinery, in the same run: a
``WorkerManager`` with both zygotes warm, time from ``call(op="list")`` on a new key (zygote fork,
the sandbox when asked, hubconf import, one round trip) to its result, for ``sandbox=False`` and
``sandbox=True`` alternately; then a call to a warm worker, and a weights-only load of a small
checkpoint (a one-shot sandboxed worker) against ``oneflow.load`` in this process.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import flowhub  # noqa: F401  (makes the oneflow import work)
import oneflow as flow

import flowhub.sandbox as sandbox

TARGET_MS = 50.0


def _worker(write_fd: int, policy) -> None:
    """The forked child: never returns."""
    try:
        ms = 0.0
        if policy is not None:
            ms = sandbox.apply(policy).elapsed_ms
        os.write(write_fd, f"ready {ms:.3f}\n".encode())
        flow.nn.Conv2d(3, 8, 3)(flow.randn(1, 3, 32, 32)).numpy()
        os.write(write_fd, b"done\n")
    finally:
        os._exit(0)


def _round(policy):
    read_fd, write_fd = os.pipe()
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _worker(write_fd, policy)
    os.close(write_fd)
    buf, ready, apply_ms = b"", None, 0.0
    while True:
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        buf += chunk
        if ready is None and b"\n" in buf:
            ready = time.perf_counter() - start
            apply_ms = float(buf.split(b"\n", 1)[0].split()[1])
    done = time.perf_counter() - start
    os.close(read_fd)
    os.waitpid(pid, 0)
    if b"done" not in buf:
        raise SystemExit(f"worker failed: {buf!r}")
    return ready * 1000, done * 1000, apply_ms


def _fmt(values):
    return f"{statistics.median(values):7.2f} ms [{min(values):.2f}-{max(values):.2f}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)

    flow.nn.Conv2d(3, 8, 3)(flow.randn(1, 3, 32, 32)).numpy()
    sandbox.prepare()
    with tempfile.TemporaryDirectory(prefix="flowhub-bench-sandbox-") as tmp:
        policy = sandbox.SandboxPolicy(scratch=os.path.join(tmp, "scratch"), read_paths=(tmp,))
        probe_report = sandbox.probe(policy)
        print(sandbox.format_report(probe_report).splitlines()[0])
        for _ in range(3):  # warm-up of both paths
            _round(None)
            _round(policy)
        plain, boxed = [], []
        for _ in range(args.rounds):
            plain.append(_round(None))
            boxed.append(_round(policy))

    def column(rows, i):
        return [r[i] for r in rows]

    print(f"{args.rounds} rounds each, median [min-max], fork from a process that imported oneflow "
          f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})")
    for i, label in ((0, "fork -> ready"), (1, "fork -> ready + conv forward")):
        p, b = column(plain, i), column(boxed, i)
        diff = statistics.median(b) - statistics.median(p)
        print(f"{label}:")
        print(f"  unsandboxed  {_fmt(p)}")
        print(f"  sandboxed    {_fmt(b)}")
        print(f"  difference   {diff:+7.2f} ms (ratio {statistics.median(b) / statistics.median(p):.2f}x)")
    print(f"apply() inside the worker: {_fmt(column(boxed, 2))}")
    diff = statistics.median(column(boxed, 0)) - statistics.median(column(plain, 0))
    verdict = "OK" if diff <= TARGET_MS else "OVER TARGET"
    print(f"target: sandboxed within {TARGET_MS:.0f} ms of unsandboxed -> {diff:+.2f} ms {verdict}")
    workers_ok = bench_workers(args.rounds)
    return 0 if diff <= TARGET_MS and workers_ok else 1


def _retire_all(mgr) -> None:
    for worker in list(mgr._workers.values()):
        with worker.lock:
            mgr._retire(worker)


def bench_workers(rounds: int) -> bool:
    """Time to a ready worker through ``WorkerManager``, sandboxed vs not, measured alternately."""
    from flowhub.context import CallSettings
    from flowhub.settings import Settings
    from flowhub.worker.host.pool import WorkerManager

    print("\nthrough WorkerManager (both zygotes warm; a new worker per call):")
    mgr = WorkerManager(max_workers=1 << 20, zygote_start="spawn")
    try:
        with tempfile.TemporaryDirectory(prefix="flowhub-bench-workers-") as tmp:
            repo = os.path.join(tmp, "repo")
            os.makedirs(repo)
            with open(os.path.join(repo, "hubconf.py"), "w") as f:
                f.write("import oneflow as flow\ndependencies = ['oneflow']\n\n"
                        "def tiny():\n    return flow.nn.Linear(4, 2)\n")
            settings = CallSettings(Settings(hub_dir=os.path.join(tmp, "hub")))
            count = [0]

            def first_call(boxed: bool) -> float:
                count[0] += 1
                start = time.perf_counter()
                mgr.call(repo_dir=repo, key=f"bench-{count[0]}", op="list", settings=settings, sandbox=boxed)
                return (time.perf_counter() - start) * 1000

            for boxed in (False, True, False, True):  # start both zygotes, warm both paths
                first_call(boxed)
            _retire_all(mgr)
            fresh = {False: [], True: []}
            for _ in range(rounds):
                for boxed in (False, True):
                    fresh[boxed].append(first_call(boxed))
                _retire_all(mgr)
            warm = {False: [], True: []}
            for boxed in (False, True):
                first_call(boxed)
                key = f"bench-{count[0]}"
                for _ in range(rounds):
                    start = time.perf_counter()
                    mgr.call(repo_dir=repo, key=key, op="load", model="tiny", settings=settings, sandbox=boxed)
                    warm[boxed].append((time.perf_counter() - start) * 1000)
            _retire_all(mgr)

            ckpt = os.path.join(tmp, "ckpt")
            flow.save({f"w{i}": flow.randn(64, 64) for i in range(8)}, ckpt)
            import flowhub.worker.host.pool as manager_module
            from flowhub.worker.host import weights_only

            saved, manager_module._manager = manager_module._manager, mgr  # weights_only.load uses get_manager()
            try:
                inproc, boxed_load = [], []
                for _ in range(rounds):
                    start = time.perf_counter()
                    flow.load(ckpt)
                    inproc.append((time.perf_counter() - start) * 1000)
                    start = time.perf_counter()
                    weights_only.load(ckpt)
                    boxed_load.append((time.perf_counter() - start) * 1000)
            finally:
                manager_module._manager = saved
    finally:
        mgr.shutdown()

    diff = statistics.median(fresh[True]) - statistics.median(fresh[False])
    print("new worker -> first result (list):")
    print(f"  unsandboxed  {_fmt(fresh[False])}")
    print(f"  sandboxed    {_fmt(fresh[True])}")
    print(f"  difference   {diff:+7.2f} ms")
    print("warm worker, load of a small model:")
    print(f"  unsandboxed  {_fmt(warm[False])}")
    print(f"  sandboxed    {_fmt(warm[True])}")
    print(f"weights-only load of 8 x 64x64 float32 (one-shot sandboxed worker): {_fmt(boxed_load)}")
    print(f"  oneflow.load in this process:                                  {_fmt(inproc)}")
    verdict = "OK" if diff <= TARGET_MS else "OVER TARGET"
    print(f"target: a new sandboxed worker within {TARGET_MS:.0f} ms of an unsandboxed one -> {diff:+.2f} ms {verdict}")
    return diff <= TARGET_MS


if __name__ == "__main__":
    sys.exit(main())
