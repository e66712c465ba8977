"""``.safetensors`` files written by the real ``safetensors`` package, read into oneflow tensors through
the documented header (mapped zero-copy when the file is the cache's), and checked against the
package's own reader."""
from __future__ import annotations

import json
import os
import shutil
import struct

import numpy as np
import oneflow as flow
import pytest
from safetensors.numpy import load_file, save_file

import flowhub
from flowhub import formats
from flowhub.cache import checkpoints, mapping


def tensors() -> dict:
    rng = np.random.default_rng(5)
    return {"f32": rng.standard_normal((3, 4)).astype(np.float32), "f64": rng.standard_normal(5),
            "f16": rng.standard_normal((2, 2)).astype(np.float16), "i64": np.arange(-4, 8).reshape(2, 6),
            "i32": np.arange(7, dtype=np.int32), "i8": np.array([-128, 0, 127], np.int8),
            "u8": np.array([0, 255], np.uint8), "bool": np.array([True, False, True]),
            "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32),
            "big": rng.standard_normal((128, 160)).astype(np.float32)}


@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
def test_every_dtype_round_trips_against_the_package(tmp_path, mapped):
    path = str(tmp_path / "w.safetensors")
    want = tensors()
    save_file(want, path, metadata={"format": "np"})
    assert checkpoints.checkpoint_format(path) == "safetensors"
    loaded = formats.read(path, "safetensors", mapped=mapped)
    reference = load_file(path)
    assert set(loaded.value) == set(want)
    for name, tensor in loaded.value.items():
        assert isinstance(tensor, flow.Tensor)
        assert tensor.numpy().dtype == want[name].dtype and tuple(tensor.shape) == want[name].shape, name
        assert np.array_equal(tensor.numpy(), want[name]) and np.array_equal(tensor.numpy(), reference[name]), name
    if mapped:  # every non-empty tensor is the file's bytes at its extent (the package aligns them)
        raw = np.fromfile(path, dtype=np.uint8)
        assert len(loaded.extents) == len(want) - 1
        for e in loaded.extents:
            match = [n for n, a in want.items() if a.shape == e.shape and a.dtype.name == e.dtype]
            assert raw[e.offset:e.offset + e.nbytes].tobytes() == want[match[0]].tobytes()
    else:
        assert loaded.extents == []


def test_bfloat16_is_converted(tmp_path):
    """numpy has no bfloat16, so the file is written by hand as the format documents it."""
    values = np.array([1.0, -2.5, 0.15625, 3e38], np.float32)
    raw16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw16)
    w = flowhub.load_weights(path)["w"]
    assert w.dtype == flow.bfloat16 and tuple(w.shape) == (2, 2)
    assert np.array_equal(w.to(flow.float32).numpy().ravel(), (values.view(np.uint32) & 0xFFFF0000).view(np.float32))


def test_a_mapped_file_is_copy_on_write(tmp_path):
    path = str(tmp_path / "w.safetensors")
    save_file(tensors(), path)
    with open(path, "rb") as f:
        before = f.read()
    big = formats.read(path, "safetensors", mapped=True).value["big"]
    with flow.no_grad():
        big.mul_(0.0)
    assert not big.numpy().any()
    with open(path, "rb") as f:
        assert f.read() == before


def test_state_dict_from_url_reads_safetensors(gh, hub_root, tmp_path):
    assets = hub_root / "formats" / "st" / "releases" / "download" / "v1"
    assets.mkdir(parents=True, exist_ok=True)
    want = tensors()
    save_file(want, str(assets / "model.safetensors"))
    hub = flowhub.Hub(tmp_path / "hub")
    mapping.take_loaded()
    sd = hub.load_state_dict_from_url(f"{gh.url}/formats/st/releases/download/v1/model.safetensors",
                                      progress=False)
    assert np.array_equal(sd["big"].numpy(), want["big"])
    cached = os.path.realpath(tmp_path / "hub" / "checkpoints" / "model.safetensors")
    assert [(f.path, f.shape) for f in mapping.take_loaded()] == [(cached, (128, 160))]
    # weights_only=True: no sandboxed worker is needed for a format that holds no code
    again = hub.load_state_dict_from_url(f"{gh.url}/formats/st/releases/download/v1/model.safetensors",
                                         progress=False, weights_only=True)
    assert np.array_equal(again["i64"].numpy(), want["i64"])
    shutil.rmtree(tmp_path / "hub")
