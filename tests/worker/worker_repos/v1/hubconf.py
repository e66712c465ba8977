"""Test repository: one version of ``mypkg`` (see tests/worker/test_worker.py)."""
import ctypes
import hashlib
import os
import time

import numpy as np
import oneflow as flow

import mypkg
from mypkg.errors import CustomError
from mypkg.models import SmallCNN

dependencies = ["oneflow", "numpy"]


def _digest(tensor):
    return hashlib.sha256(tensor.detach().numpy().tobytes()).hexdigest()


def small(seed=0):
    """A small CNN whose width depends on the repository version."""
    flow.manual_seed(seed)
    return SmallCNN()


def unseeded():
    """A small CNN initialised from the generator as the caller left it."""
    return SmallCNN()


def small_with_reference(seed=0):
    """(model in eval mode, input, sha256 of its output and of every state-dict entry, computed here)."""
    flow.manual_seed(seed)
    model = SmallCNN().eval()
    x = flow.randn(2, 3, 8, 8)
    out = model(x)
    digests = {name: _digest(t) for name, t in model.state_dict().items()}
    return model, x, _digest(out), digests


def version():
    return mypkg.VERSION


def pid():
    return os.getpid()


def values():
    """Assorted non-module values."""
    offset = 3
    return {
        "fn": lambda v: v + offset,
        "array": np.arange(12, dtype=np.int32).reshape(3, 4),
        "tensor": flow.arange(6, dtype=flow.float32).reshape(2, 3),
        "bf16": flow.full((4,), 1.5).to(flow.bfloat16),
        "grad": flow.zeros(2, requires_grad=True),
        "text": "hello",
        "tied": (lambda t: (t, t))(flow.ones(3)),
        "device": flow.device("cpu"),
    }


def generator():
    return (i for i in range(3))


def scale(x, factor=2.0):
    return x * factor


def echo_env(name):
    return os.environ.get(name), os.getcwd()


def hub_dir():
    import oneflow.hub

    return oneflow.hub.get_dir()


def fail_value():
    raise ValueError("bad value from the repo")


def fail_custom():
    raise CustomError("repo-specific failure")


def fail_key():
    raise KeyError("missing")


def exit_hard():
    os._exit(3)


def abort():
    os.abort()


def segfault():
    ctypes.string_at(0)


def sys_exit():
    raise SystemExit(5)


def hang(seconds=60):
    time.sleep(seconds)
