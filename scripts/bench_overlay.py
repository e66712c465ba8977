#!/usr/bin/env python
"""What a warm requirement overlay adds to a load (issue 12: at most 20 ms).

Two local repositories with the same code, shaped like flowvision (hubconf imports a package of the
repo that imports ``six`` and ``tabulate``):

* **overlay**: declares them in ``setup.py`` only; loaded with ``Hub(install_requirements=True)``, so
  they come from its overlay (installed once by a warm-up run, then warm);
* **baseline**: the same load without requirements: the very same two packages are vendored inside
  the repo folder, nothing is declared, ``install_requirements`` is off.

Both load in proxy mode (so neither pays for rebuilding, nor the overlay for its private imports in
the caller: ~15 ms once per process, see ``flowhub.cache.overlay_imports``). A row in rebuild mode
(the default) follows: the overlay repo with its warm overlay against the same repo with the two
packages installed (on ``PYTHONPATH``). Each timed run is a fresh
Python process that imports flowhub, then times ``load`` until the model answered one call; the contenders
alternate, in the same run. On a shared, busy machine these whole-process times vary by seconds, so
two steadier measurements follow, in one process with a warm zygote: loads that each fork a fresh
worker (a copy of each repo per load, its plan warm), alternating; and
:func:`flowhub.cache.overlays.plan` on the warm overlay alone (reading what the repo declares,
checking the environment, finding the overlay: the whole of the caller's extra work).

Usage: ``python scripts/bench_overlay.py [--runs 7]``. Needs the wheels in
``~/.cache/flowhub/test-wheels`` (downloaded by the tests' set-up, or here with pip if missing).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from wheelhouse import HUBCONF, MODELS, SETUP_PY, WHEELS  # noqa: E402

RUN = r'''
import sys, time
hub_dir, repo, overlay, mode = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
import flowhub
hub = flowhub.Hub(hub_dir=hub_dir, mode=mode, install_requirements=overlay)
start = time.perf_counter()
model = hub.load(repo, "tiny", source="local")
model.versions()
print((time.perf_counter() - start) * 1000)
'''


def wheel_dir() -> str:
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flowhub", "test-wheels")
    os.makedirs(cache, exist_ok=True)
    for req in WHEELS:
        name, version = req.split("==")
        if not any(f.startswith(f"{name}-{version}-") for f in os.listdir(cache)):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary", ":all:", "--no-deps",
                            "-d", cache, req], check=True, timeout=300)
    return cache


def make_repos(work: str, wheels: str) -> tuple:
    overlay, baseline = os.path.join(work, "overlay"), os.path.join(work, "baseline")
    for repo in (overlay, baseline):
        os.makedirs(os.path.join(repo, "flowpkg"))
        for rel, text in (("hubconf.py", HUBCONF), ("flowpkg/__init__.py", ""), ("flowpkg/models.py", MODELS)):
            with open(os.path.join(repo, rel), "w") as f:
                f.write(text)
    with open(os.path.join(overlay, "setup.py"), "w") as f:
        f.write(SETUP_PY.format(six="six==1.16.0"))
    for whl in ("six-1.16.0-py2.py3-none-any.whl", "tabulate-0.9.0-py3-none-any.whl"):
        with zipfile.ZipFile(os.path.join(wheels, whl)) as zf:  # vendored: the same code, no overlay
            zf.extractall(baseline, [n for n in zf.namelist() if not n.split("/")[0].endswith(".dist-info")])
    shutil.rmtree(os.path.join(baseline, "tabulate-0.9.0.data"), ignore_errors=True)
    import compileall

    compileall.compile_dir(baseline, quiet=1)  # as the overlay's installer does: no compiling at import time
    return overlay, baseline


def run(hub_dir: str, repo: str, overlay: bool, env: dict, mode: str = "proxy") -> float:
    proc = subprocess.run([sys.executable, "-c", RUN, hub_dir, repo, "1" if overlay else "0", mode], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"a run failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    opts = parser.parse_args()
    wheels = wheel_dir()
    with tempfile.TemporaryDirectory() as work:
        overlay_repo, baseline_repo = make_repos(work, wheels)
        hub_dir = os.path.join(work, "hub")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "FLOWHUB_"))}
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=wheels, TQDM_DISABLE="1",
                   PYTHONPATH=ROOT)
        start = time.perf_counter()
        run(hub_dir, overlay_repo, True, env)  # installs the overlay
        print(f"cold overlay: first load with the install {time.perf_counter() - start:.2f} s (whole process)")
        run(hub_dir, baseline_repo, False, env)
        times = {"baseline": [], "overlay": []}
        for _ in range(opts.runs):
            times["baseline"].append(run(hub_dir, baseline_repo, False, env))
            times["overlay"].append(run(hub_dir, overlay_repo, True, env))
        base, over = statistics.median(times["baseline"]), statistics.median(times["overlay"])
        print(f"load until the model answered, fresh processes, median of {opts.runs}:")
        print(f"  baseline (requirements vendored, no overlay): {base:8.1f} ms  {sorted(round(t) for t in times['baseline'])}")
        print(f"  warm overlay:                                 {over:8.1f} ms  {sorted(round(t) for t in times['overlay'])}")
        print(f"  overlay adds {over - base:+.1f} ms ({over / base:.3f}x the baseline; target <= +20 ms)")
        print(_rebuilt(work, wheels, hub_dir, overlay_repo, env, opts.runs))
        print(_fresh_workers_in_process(work, hub_dir, overlay_repo, baseline_repo, env, max(3 * opts.runs, 15)))
        plan_ms = _plan_in_process(hub_dir, overlay_repo, env)
        print(f"  the caller's overlay work (overlays.plan, warm, in one process): {plan_ms}")


def _rebuilt(work: str, wheels: str, hub_dir: str, overlay_repo: str, env: dict, runs: int) -> str:
    """Rebuild mode (the default), fresh processes: the overlay repo with its overlay (the caller imports
    the overlay's modules privately), against the same repo with the two packages installed, i.e. on
    ``PYTHONPATH`` (its own zygote service: the identity includes ``PYTHONPATH``)."""
    site = os.path.join(work, "installed")
    for whl in ("six-1.16.0-py2.py3-none-any.whl", "tabulate-0.9.0-py3-none-any.whl"):
        with zipfile.ZipFile(os.path.join(wheels, whl)) as zf:
            zf.extractall(site)
    import compileall

    compileall.compile_dir(site, quiet=1)
    installed = dict(env, PYTHONPATH=os.pathsep.join([ROOT, site]))
    run(hub_dir, overlay_repo, False, installed, "rebuild")  # warm-up: its service, its caches
    run(hub_dir, overlay_repo, True, env, "rebuild")
    times = {"installed": [], "overlay": []}
    for _ in range(runs):
        times["installed"].append(run(hub_dir, overlay_repo, False, installed, "rebuild"))
        times["overlay"].append(run(hub_dir, overlay_repo, True, env, "rebuild"))
    base, over = statistics.median(times["installed"]), statistics.median(times["overlay"])
    return (f"rebuild mode, fresh processes, median of {runs}: requirements installed {base:.1f} ms "
            f"{sorted(round(t) for t in times['installed'])}, warm overlay {over:.1f} ms "
            f"{sorted(round(t) for t in times['overlay'])}: the overlay adds {over - base:+.1f} ms "
            f"({over / base:.3f}x; target <= +20 ms)")


def _fresh_workers_in_process(work: str, hub_dir: str, overlay_repo: str, baseline_repo: str, env: dict,
                              runs: int) -> str:
    copies = {"overlay": [], "baseline": []}
    for i in range(runs + 1):
        for kind, repo in (("overlay", overlay_repo), ("baseline", baseline_repo)):
            dst = os.path.join(work, f"{kind}-{i}")
            shutil.copytree(repo, dst)
            copies[kind].append(dst)
    code = r'''
import json, statistics, sys, time, warnings
import flowhub
from flowhub.worker.host.pool import get_manager
hub_dir, copies = sys.argv[1], json.loads(sys.argv[2])
hubs = {"overlay": flowhub.Hub(hub_dir=hub_dir, mode="proxy", install_requirements=True),
        "baseline": flowhub.Hub(hub_dir=hub_dir, mode="proxy", install_requirements=False)}
for kind, repos in copies.items():  # warm plans, then fresh workers for the timed loads
    for repo in repos:
        hubs[kind].load(repo, "tiny", source="local").versions()
get_manager().shutdown()
for kind in ("baseline", "overlay"):
    hubs[kind].load(copies[kind][0], "tiny", source="local").versions()  # the zygote again
laps = {"overlay": [], "baseline": []}
for i in range(1, len(copies["overlay"])):
    for kind in (("baseline", "overlay") if i % 2 else ("overlay", "baseline")):  # ABBA: drift cancels
        t = time.perf_counter()
        hubs[kind].load(copies[kind][i], "tiny", source="local").versions()
        laps[kind].append((time.perf_counter() - t) * 1000)
b, o = statistics.median(laps["baseline"]), statistics.median(laps["overlay"])
print(f"one process, warm zygote, a fresh worker per load, median of {len(laps['overlay'])}: baseline {b:.1f} ms, "
      f"warm overlay {o:.1f} ms: the overlay adds {o - b:+.1f} ms ({o / b:.3f}x; target <= +20 ms); "
      f"fastest: {min(laps['baseline']):.1f} vs {min(laps['overlay']):.1f} ms")
'''
    proc = subprocess.run([sys.executable, "-c", code, hub_dir, __import__("json").dumps(copies)], env=env,
                          capture_output=True, text=True, timeout=900)
    return "  " + (proc.stdout.strip() or proc.stderr[-3000:])


def _plan_in_process(hub_dir: str, repo: str, env: dict) -> str:
    code = r'''
import sys, time, statistics
from flowhub import settings
t0 = time.perf_counter()
from flowhub.cache import overlays
s = settings.resolve({"hub_dir": sys.argv[1], "install_requirements": True})
first = overlays.plan(s, sys.argv[2], "bench")
t1 = time.perf_counter()
assert first.overlay is not None
laps = []
for _ in range(50):
    t = time.perf_counter()
    overlays.plan(s, sys.argv[2], "bench")
    laps.append((time.perf_counter() - t) * 1000)
print(f"first call {(t1 - t0) * 1000:.1f} ms (imports included), then median {statistics.median(laps):.2f} ms")
'''
    proc = subprocess.run([sys.executable, "-c", code, hub_dir, repo], env=env, capture_output=True, text=True,
                          timeout=120)
    return proc.stdout.strip() or proc.stderr[-2000:]


if __name__ == "__main__":
    main()
