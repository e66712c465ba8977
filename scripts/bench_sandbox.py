#!/usr/bin/env python
"""Time from fork to a ready worker, with and without ``flowhub.sandbox.apply``.

This process plays the zygote: it imports flowhub and oneflow, warms the runtime with one op and
calls ``flowhub.sandbox.prepare()``. Each round forks a worker that (optionally) applies the default
sandbox policy, says "ready" on a pipe, runs one small conv forward, says "done" and exits. The
plain and sandboxed variants alternate, so drift in the machine affects both alike.

    python scripts/bench_sandbox.py [--rounds 30]
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
    return 0 if diff <= TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
