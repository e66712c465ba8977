import ctypes
import dataclasses
import os
import time

import oneflow as flow
import oneflow.nn as nn

from proxpkg.errors import RepoError


@dataclasses.dataclass
class Config:
    width: int = 16
    name: str = "net"


class Net(nn.Module):
    """A small CNN with a config object, a 0-d buffer and assorted methods for the proxy tests."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, cfg.width)
        self.register_buffer("scale", flow.tensor(2.0))

    def forward(self, x, bias=0.0):
        if x.dim() != 4:
            raise ValueError(f"expected a 4-d input, got {x.dim()} dimensions")
        if isinstance(bias, (int, float)) and bias == 13:
            raise RepoError("unlucky bias")
        return self.fc(self.features(x).mean((2, 3))) * self.scale + bias

    def embed(self, x, normalize=False, scale=1.0):
        """A dict of a tensor, a 0-d tensor, a list and a tuple."""
        emb = self.features(x).mean((2, 3)) * scale
        norm = emb.norm()
        if normalize:
            emb = emb / norm
        return {"emb": emb, "norm": norm, "shape": list(emb.shape), "pair": (1, "two")}

    def run(self, layer, x):
        """Calls ``layer`` (a sub-module handed back by the caller) on ``x``."""
        return layer(x)

    def lookup(self, name):
        return {"a": 1}[name]

    def pair(self):
        return self.fc, self.fc

    def total(self, arr):
        """The sum of a numpy array, as a numpy scalar."""
        return arr.sum()

    def stream(self, n):
        yield from range(n)

    def crash(self, code=3):
        os._exit(code)

    def segfault(self):
        ctypes.string_at(0)

    def sleep(self, seconds):
        time.sleep(seconds)
        return seconds


class Scale(nn.Module):
    def forward(self, x):
        return x * 2
