"""Warm a zygote's oneflow before it forks: run once what a typical load runs.

oneflow initialises much lazily: the first convolution, normalisation or linear layer, the first
``flow.save``/``flow.load``, the first ``.numpy()``. A worker forked from a zygote that never ran
them pays for all of it again, and more than an in-process load does, because every page it writes
first is a copy-on-write fault (measured: a small CNN built and run in a fresh fork took 23 ms from a
cold zygote, 12 ms from a warmed one, the same as a first in-process run). The zygote runs this once
at start-up; every worker then begins where a warm process would. Nothing of it reaches a worker:
workers reseed every generator and take their caller's random state.
"""
from __future__ import annotations

import os
import tempfile


def exercise() -> None:
    """Build, run, save and load a small model (CPU only), and pickle one by value."""
    import oneflow as flow

    from flowhub.worker.wire import byvalue

    model = flow.nn.Sequential(
        flow.nn.Conv2d(3, 8, 3, padding=1), flow.nn.BatchNorm2d(8), flow.nn.ReLU(), flow.nn.MaxPool2d(2),
        flow.nn.Conv2d(8, 8, 3), flow.nn.AdaptiveAvgPool2d(1), flow.nn.Flatten(), flow.nn.Dropout(0.1),
        flow.nn.Linear(8, 16), flow.nn.LayerNorm(16), flow.nn.GELU(), flow.nn.Linear(16, 4), flow.nn.Softmax(dim=1))
    x = flow.ones(2, 3, 8, 8)
    model(x).numpy()
    model.eval()
    with flow.no_grad():
        model(x).numpy()
    with tempfile.TemporaryDirectory(prefix="flowhub-warmup-") as folder:
        path = os.path.join(folder, "state")
        flow.save(model.state_dict(), path)
        model.load_state_dict(flow.load(path))
    flow.from_numpy(model[0].weight.numpy().copy())
    byvalue.encode(model)
