"""Real torch checkpoints (written once by real torch: fixtures/make_torch_fixtures.py) read into
oneflow tensors without torch: every dtype OneFlow has, 0-dim and empty tensors, views sharing a
storage, parameters and plain values, in the zip and the legacy format, mapped or copied."""
from __future__ import annotations

import collections
import hashlib
import os
import shutil

import numpy as np
import oneflow as flow
import pytest

import flowhub
from flowhub import formats
from flowhub.cache import checkpoints, mapping
from flowhub.errors import CheckpointFormatError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
KINDS = {"checkpoint.pth": "torch-zip", "checkpoint_legacy.pth": "torch-legacy"}
DTYPES = {"float32": flow.float32, "float64": flow.float64, "float16": flow.float16, "bfloat16": flow.bfloat16,
          "int64": flow.int64, "int32": flow.int32, "int8": flow.int8, "uint8": flow.uint8, "bool": flow.bool}


def expected(name: str) -> np.ndarray:
    return np.load(os.path.join(FIXTURES, "expected", name + ".npy"))


def values(t: flow.Tensor) -> np.ndarray:
    return (t.to(flow.float32) if t.dtype == flow.bfloat16 else t).numpy()


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("mapped", [False, True], ids=["copied", "mapped"])
@pytest.mark.parametrize("fixture", sorted(KINDS))
def test_every_tensor_and_value_round_trips(fixture, mapped):
    path = os.path.join(FIXTURES, fixture)
    assert checkpoints.checkpoint_format(path) == KINDS[fixture]
    ckpt = formats.read(path, KINDS[fixture], mapped=mapped).value
    assert (ckpt["epoch"], ckpt["best_acc"], ckpt["arch"]) == (7, 0.25, "tiny")
    assert ckpt["history"] == [1, 2.5, None, True] and ckpt["pair"] == ("a", b"b")
    sd = ckpt["model"]
    assert isinstance(sd, collections.OrderedDict) and list(sd)[:3] == ["float32", "float64", "float16"]
    for name, tensor in sd.items():
        assert isinstance(tensor, flow.Tensor), name
        want = expected(name)
        assert tuple(tensor.shape) == want.shape, name
        assert np.array_equal(values(tensor), want), name
        if name in DTYPES:
            assert tensor.dtype == DTYPES[name]
    assert sd["scalar"].shape == () and float(sd["scalar"]) == 3.5
    assert sd["num_batches_tracked"].dtype == flow.int64 and int(sd["num_batches_tracked"]) == 17
    assert tuple(sd["empty"].shape) == (0, 3)
    assert not sd["float32"].requires_grad
    param = ckpt["param"]
    assert isinstance(param, flow.nn.Parameter) and param.requires_grad
    assert np.array_equal(param.detach().numpy(), expected("param"))


@pytest.mark.parametrize("fixture", sorted(KINDS))
def test_a_mapped_file_is_shared_copy_on_write(fixture, tmp_path):
    """Views of one storage stay one storage; training them never changes the file."""
    path = str(tmp_path / fixture)
    shutil.copy(os.path.join(FIXTURES, fixture), path)
    before = _sha(path)
    sd = formats.read(path, KINDS[fixture], mapped=True).value["model"]
    base, row = sd["base"], sd["row"]
    with flow.no_grad():
        base.add_(100.0)  # in place on a mapped tensor: no crash (the map is writable, private)
    assert np.array_equal(base.numpy(), expected("base") + 100.0)
    assert np.array_equal(row.numpy(), expected("row") + 100.0)  # row is base[2], the same memory
    assert np.array_equal(sd["strided"].numpy(), expected("strided"))  # a strided view is a copy
    assert _sha(path) == before


def test_zip_tensors_are_the_files_bytes_at_their_extents():
    path = os.path.join(FIXTURES, "checkpoint.pth")
    loaded = formats.read(path, "torch-zip", mapped=True)
    raw = np.fromfile(path, dtype=np.uint8)
    by_shape = {(e.dtype, e.shape): e for e in loaded.extents}
    for name in ("float32", "float64", "int64", "base", "row"):
        want = expected(name)
        extent = by_shape[(want.dtype.name, want.shape)] if name != "row" else \
            [e for e in loaded.extents if (e.dtype, e.shape) == ("float32", (6,))][0]
        assert extent.offset % 64 == 0 or name == "row"  # torch aligns members to 64 bytes
        assert raw[extent.offset:extent.offset + extent.nbytes].tobytes() == want.tobytes(), name
    # bfloat16 is converted, so it maps nothing; neither does a strided view
    assert not [e for e in loaded.extents if e.shape == (2, 5) or e.shape == (4, 3)]
    assert formats.read(path, "torch-zip", mapped=False).extents == []


def test_dtypes_oneflow_lacks_are_refused_by_name():
    with pytest.raises(CheckpointFormatError, match=r"int16 tensor, and OneFlow 0.9 has no int16"):
        flowhub.load_weights(os.path.join(FIXTURES, "int16.pth"))


@pytest.mark.parametrize("fixture", sorted(KINDS))
def test_load_weights_reads_torch_files_in_the_caller(fixture):
    """No sandboxed worker and no torch: the allow-list reader is safe here, weights_only or not."""
    for weights_only in (True, False):
        ckpt = flowhub.load_weights(os.path.join(FIXTURES, fixture), weights_only=weights_only)
        assert np.array_equal(ckpt["model"]["float32"].numpy(), expected("float32"))
    moved = flowhub.load_weights(os.path.join(FIXTURES, fixture), map_location=lambda t, loc: t.to(flow.float64))
    assert moved["model"]["int8"].dtype == flow.float64
    assert np.array_equal(moved["model"]["float32"].numpy(), expected("float32").astype(np.float64))


def test_state_dict_from_url_maps_the_cached_pth(gh, hub_root, tmp_path):
    """A downloaded .pth is published by rename, so its tensors map the cached file, and the big ones
    are remembered for weight references."""
    assets = hub_root / "formats" / "tiny" / "releases" / "download" / "v1"
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(FIXTURES, "tinynet.pth"), assets / "tinynet.pth")
    hub = flowhub.Hub(tmp_path / "hub")
    mapping.take_loaded()
    sd = hub.load_state_dict_from_url(f"{gh.url}/formats/tiny/releases/download/v1/tinynet.pth", progress=False)
    cached = os.path.realpath(tmp_path / "hub" / "checkpoints" / "tinynet.pth")
    assert sd["fc.weight"].shape == (160, 128) and sd["features.1.num_batches_tracked"].shape == ()
    remembered = [f for f in mapping.take_loaded() if f.path == cached]
    assert [(f.shape, f.dtype) for f in remembered] == [((160, 128), "float32")]
    raw = np.fromfile(cached, dtype=np.uint8)
    f = remembered[0]
    assert raw[f.offset:f.offset + f.nbytes].tobytes() == sd["fc.weight"].numpy().tobytes()
    # a file of its own (not the cache's) is copied, not mapped
    mine = tmp_path / "mine.pth"
    shutil.copy(os.path.join(FIXTURES, "tinynet.pth"), mine)
    flowhub.load_weights(mine)
    assert mapping.take_loaded() == []
