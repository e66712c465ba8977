"""Test repository for proxy mode (see tests/worker/test_proxy.py)."""
import os

import oneflow as flow

from proxpkg.models import Config, Net, Scale

dependencies = ["oneflow"]


def net(seed=0, width=16):
    """A small CNN with a config, a 0-d buffer and assorted methods."""
    flow.manual_seed(seed)
    return Net(Config(width=width))


def scale():
    """Doubles its input."""
    return Scale()


class Echo:
    """Returns what it is called with."""

    def __call__(self, value):
        return value


def echo():
    return Echo()


def pid():
    return os.getpid()


def version():
    return "proxied-1"
