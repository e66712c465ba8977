#!/usr/bin/env python
"""Benchmark reading torch and safetensors weights into oneflow tensors against ``oneflow.load``.

400 MB of float32 weights (25 x 2000x2000) are written three ways, by this script alone (no torch
needed): a torch zip ``.pth`` (the layout ``torch.save`` writes: stored members, 64-byte aligned), a
``.safetensors`` file, and a oneflow directory (``flow.save``). The ``.pth`` and ``.safetensors`` are
published in a hub cache as a download would leave them, and read the way a hub user reads them:
``Hub.load_state_dict_from_url(url)`` (a cache hit: no request), which maps them zero-copy.

Each measurement is a fresh process, timed from the call to its result (imports excluded), warm page
cache, formats alternating; the baseline, ``flow.load`` on the oneflow directory, is measured in the
same run. Printed: the load alone, and the load plus touching every value once (``t.sum()`` of each
tensor: the mapped pages are faulted in then), each as a ratio to the baseline (target for the
load: <= 0.1x). ``load_weights`` on a copy outside the cache (read, not mapped) is shown for reference.

Usage: ``python scripts/bench_torch_weights.py [--runs N] [--mb MB]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

CHILD = r'''
import json, sys, time
import oneflow as flow
import flowhub
kind, path = sys.argv[1], sys.argv[2]
flow.tensor([1.0]).numpy()  # oneflow's first-op start-up is not the load's
start = time.perf_counter()
if kind == "oneflow":
    sd = flow.load(path)
elif kind == "copied":
    sd = flowhub.load_weights(path)
else:
    sd = flowhub.Hub(hub_dir=path, offline=True).load_state_dict_from_url(
        "http://127.0.0.1:9/bench/" + sys.argv[3], progress=False)
loaded = time.perf_counter()
total = sum(float(t.sum()) for t in sd.values())
done = time.perf_counter()
print(json.dumps({"load": loaded - start, "touched": done - start, "n": len(sd), "sum": total}))
'''


def tensors(count: int, side: int) -> dict:
    rng = np.random.default_rng(0)
    return {f"layer{i}.weight": rng.standard_normal((side, side), dtype=np.float32) for i in range(count)}


def _pickle(shapes: dict) -> bytes:
    """``data.pkl`` of a state dict as ``torch.save`` writes it (protocol 2, storages as persistent ids)."""
    ints = lambda values: b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"  # noqa: E731
    out = [b"\x80\x02ccollections\nOrderedDict\n)R("]
    for key, (name, shape) in enumerate(shapes.items()):
        numel = int(np.prod(shape))
        strides = [int(np.prod(shape[i + 1:])) for i in range(len(shape))]
        out.append(b"V" + name.encode() + b"\nctorch._utils\n_rebuild_tensor_v2\n((Vstorage\nctorch\nFloatStorage\n"
                   + b"V%d\nVcpu\nI%d\ntQI0\n" % (key, numel) + ints(shape) + ints(strides)
                   + b"I00\nccollections\nOrderedDict\n)RtR")
    return b"".join(out) + b"u."


def write_pth(path: str, sd: dict) -> None:
    """A torch zip checkpoint; each member's data is padded (an extra field, as torch does) to 64 bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        def member(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo("archive/" + name, date_time=(2020, 1, 1, 0, 0, 0))
            pad = -(zf.fp.tell() + 30 + len(info.filename.encode()) + 4) % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
            zf.writestr(info, data)

        member("data.pkl", _pickle({k: v.shape for k, v in sd.items()}))
        member("byteorder", b"little")
        for key, array in enumerate(sd.values()):
            member(f"data/{key}", array.tobytes())
        member("version", b"3\n")


def write_safetensors(path: str, sd: dict) -> None:
    header, offset = {}, 0
    for name, array in sd.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for array in sd.values():
            f.write(array.tobytes())


def publish(hub_dir: str, src: str, name: str) -> None:
    """Put ``src`` in the hub cache as a finished download of ``name`` (file plus its record)."""
    from flowhub.cache import checkpoints, store

    folder = os.path.join(hub_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    os.link(src, os.path.join(folder, name))
    st = os.stat(src)
    store.write_json_atomic(checkpoints.file_record_path(folder, name),  # as a download writes it
                            {"url": f"http://127.0.0.1:9/bench/{name}", "size": st.st_size,
                             "sha256": checkpoints.file_sha256(src), "mtime_ns": st.st_mtime_ns})


def run(args: list) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(f"{args}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mb", type=int, default=400, help="total size (25 square float32 matrices)")
    opts = parser.parse_args()
    side = int((opts.mb * 1e6 / 25 / 4) ** 0.5)
    import oneflow as flow

    with tempfile.TemporaryDirectory(prefix="flowhub-bench-") as tmp:
        sd = tensors(25, side)
        hub_dir = os.path.join(tmp, "hub")
        write_pth(os.path.join(tmp, "w.pth"), sd)
        write_safetensors(os.path.join(tmp, "w.safetensors"), sd)
        flow.save({k: flow.from_numpy(v) for k, v in sd.items()}, os.path.join(tmp, "oneflow"))
        publish(hub_dir, os.path.join(tmp, "w.pth"), "w.pth")
        publish(hub_dir, os.path.join(tmp, "w.safetensors"), "w.safetensors")
        expected = float(sum(float(np.float32(v.sum(dtype=np.float64))) for v in sd.values()))
        del sd
        cases = {"oneflow dir, flow.load": ["oneflow", os.path.join(tmp, "oneflow")],
                 ".pth (torch zip), cached": ["cached", hub_dir, "w.pth"],
                 ".safetensors, cached": ["cached", hub_dir, "w.safetensors"],
                 ".pth, load_weights (copied)": ["copied", os.path.join(tmp, "w.pth")]}
        results = {name: [] for name in cases}
        for name, case in cases.items():  # warm the page cache and check the values once
            got = run(case)
            assert got["n"] == 25 and abs(got["sum"] - expected) <= 1e-3 * max(1.0, abs(expected)), (name, got)
        for _ in range(opts.runs):
            for name, case in cases.items():
                results[name].append(run(case))
    size = 25 * side * side * 4 / 1e6
    base = {k: statistics.median(r[k] for r in results["oneflow dir, flow.load"]) for k in ("load", "touched")}
    print(f"{size:.0f} MB float32 (25 x {side}x{side}), {opts.runs} fresh processes each, warm page cache; "
          "median seconds (ratio to flow.load on the oneflow directory, same run)")
    print(f"{'':30} {'load':>18} {'load + touch all':>20}")
    for name, rows in results.items():
        cells = []
        for k in ("load", "touched"):
            median = statistics.median(r[k] for r in rows)
            cells.append(f"{median:8.4f} ({median / base[k]:5.3f}x)")
        print(f"{name:30} {cells[0]:>18} {cells[1]:>20}")
    ratios = [statistics.median(r["load"] for r in results[n]) / base["load"]
              for n in (".pth (torch zip), cached", ".safetensors, cached")]
    print(f"target: load <= 0.1x of flow.load: {'met' if max(ratios) <= 0.1 else 'NOT met'} "
          f"(.pth {ratios[0]:.3f}x, .safetensors {ratios[1]:.3f}x)")


if __name__ == "__main__":
    main()
