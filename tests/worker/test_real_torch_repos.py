"""Issue 12 on a real torch-style hub repository: facebookresearch/dino's own files (vendored unchanged in
``real_repos/dino``, see its README) served by the loopback server as ``facebookresearch/dino`` and loaded
with ``Hub(mock_torch=True)``: its hubconf runs in a real worker on OneFlow, and ``dino_vits16`` gets its
pretrained weights from a real torch zip ``.pth`` (the real key names and shapes, seeded values) that is
already in the hub cache under the name of dino's hard-coded download URL, as for an offline user.

What does not work as it is: the hubconf imports ``torchvision`` at module level, which ``mock_torch`` does
not map and which cannot run on OneFlow; the first test shows flowhub's error for it. The others give the
worker a stand-in ``torchvision`` package for that one import (``dino_vits16`` never calls it)."""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable

import numpy as np
import oneflow as flow
import pytest

import flowhub
from flowhub.cache import store
from flowhub.cache.overlays import overlays_root
from flowhub.errors import MissingModuleError
from flowhub.worker.host.pool import get_manager
from flowhub.worker.host.proxy import Proxy

import build_hub  # examples/build_hub.py, on the import path through conftest
from conftest import make_repo, run_python

DINO = Path(__file__).resolve().parent / "real_repos" / "dino"
#: upstream's git blob ids at commit 7c446df5b9f45747937fb0d72314eb9f7b66930a (see the README there)
UPSTREAM_BLOBS = {
    "hubconf.py": "3709271ed2b52bb86fbeb70fc02bc47d1add207e",
    "vision_transformer.py": "f69a7ad0522500ca2a85305a789be5ca6ac474d0",
    "utils.py": "9586250123a125a83ea2679e121b1b0ef8089916",
    "LICENSE": "b09cd7856d58590578ee1a4f3ad45d1310a97f87",
}
#: dino_vits16's hard-coded URL, and its file name, which load_state_dict_from_url caches it under
URL = "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"
CHECKPOINT = URL.rsplit("/", 1)[1]

#: The one name dino's hubconf.py imports from torchvision (for dino_resnet50, at import time).
TORCHVISION_STANDIN = {
    "torchvision/__init__.py": '"""A stand-in: real torchvision needs libtorch, which OneFlow is not."""\n',
    "torchvision/models/__init__.py": "",
    "torchvision/models/resnet.py": (
        "def resnet50(*args, **kwargs):\n"
        "    raise NotImplementedError('torchvision is not available on OneFlow (stand-in for the import)')\n"),
}

#: In a fresh interpreter, with OneFlow under mock_torch and nothing of flowhub: build dino_vits16 from the
#: vendored code, give every tensor of its state dict seeded values, run it on a seeded input.
REFERENCE = r'''
import sys
import numpy as np
sys.path[:0] = [{standin!r}, {dino!r}]
import oneflow.mock_torch
oneflow.mock_torch.enable()
import torch
import hubconf

model = hubconf.dino_vits16(pretrained=False).eval()
rng = np.random.default_rng(12)
state = {{}}
for name, tensor in model.state_dict().items():
    value = rng.standard_normal(tuple(tensor.shape), dtype=np.float32) * np.float32(0.02)
    if "norm" in name and name.endswith(".weight"):
        value += np.float32(1.0)  # LayerNorm scales near 1, as trained ones are
    state[name] = value
model.load_state_dict({{k: torch.from_numpy(v) for k, v in state.items()}}, strict=True)
x = rng.standard_normal((2, 3, 224, 224), dtype=np.float32)
with torch.no_grad():
    out = model(torch.from_numpy(x)).numpy()
np.savez({out!r}, **state)
np.save({out!r} + "-input.npy", x)
np.save({out!r} + "-output.npy", out)
'''


def _git_blob(path: Path) -> str:
    """``git hash-object`` of a file."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _dino_files() -> Dict[str, str]:
    """The vendored files, their text exactly as on disk."""
    out = {}
    for name in UPSTREAM_BLOBS:
        with open(DINO / name, newline="") as f:
            out[name] = f.read()
    return out


def _write_tree(root: Path, files: Dict[str, str]) -> Path:
    """Write ``files`` (relative path -> text) under ``root``; return ``root``."""
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


# --- a torch zip checkpoint, written the way torch.save writes one (torch is never imported) ---------

def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _ints(values: Iterable[int]) -> bytes:
    return b"(" + b"".join(b"J" + struct.pack("<i", v) for v in values) + b"t"


def state_dict_pickle(state: "OrderedDict[str, np.ndarray]") -> bytes:
    """``data.pkl`` of a float32 state dict (protocol 2, as torch writes): an ``OrderedDict`` of
    ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` whose storages
    are persistent ids ``("storage", torch.FloatStorage, key, "cpu", numel)``, one storage per tensor."""
    out = bytearray(b"\x80\x02" + _global("collections", "OrderedDict") + b")R(")
    for key, (name, value) in enumerate(state.items()):
        assert value.dtype == np.float32 and value.flags.c_contiguous
        strides = [s // value.itemsize for s in value.strides]
        out += _text(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"("
        out += (b"(" + _text("storage") + _global("torch", "FloatStorage") + _text(str(key)) + _text("cpu")
                + b"J" + struct.pack("<i", value.size) + b"tQ")
        out += b"J\0\0\0\0" + _ints(value.shape) + _ints(strides) + b"\x89"
        out += _global("collections", "OrderedDict") + b")RtR"
    return bytes(out + b"u.")


def write_torch_zip(path: Path, state: "OrderedDict[str, np.ndarray]") -> None:
    """A torch >= 1.6 zip checkpoint: members stored uncompressed, each one's data 64-byte aligned by a
    padding extra field (id ``FB``, as torch's writer pads), archive named after the file."""
    archive = path.stem
    members = [("data.pkl", state_dict_pickle(state)), (".format_version", b"1"),
               (".storage_alignment", b"64"), ("byteorder", b"little")]
    members += [(f"data/{key}", value.tobytes()) for key, value in enumerate(state.values())]
    members += [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            info = zipfile.ZipInfo(f"{archive}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            start = zf.fp.tell() + 30 + len(info.filename.encode()) + 4
            pad = -start % 64
            info.extra = struct.pack("<HH", 0x4246, pad) + b"\0" * pad
            zf.writestr(info, data)


@pytest.fixture(scope="session")
def dino_weights(tmp_path_factory) -> Dict[str, object]:
    """Seeded weights for dino_vits16 (86 MB) as dino's checkpoint file, with the reference output."""
    folder = tmp_path_factory.mktemp("dino-weights")
    standin = _write_tree(folder / "standin", TORCHVISION_STANDIN)
    ref = str(folder / "reference")
    proc = run_python(REFERENCE.format(standin=str(standin), dino=str(DINO), out=ref), timeout=120,
                      cwd=str(folder))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(ref + ".npz") as npz:
        state = OrderedDict((name, npz[name]) for name in npz.files)
    path = folder / CHECKPOINT
    write_torch_zip(path, state)
    return {"path": path, "state": state, "standin": str(standin),
            "input": np.load(ref + "-input.npy"), "output": np.load(ref + "-output.npy")}


@pytest.fixture
def dino_repo(gh, hub_root) -> None:
    """facebookresearch/dino (main) on the loopback server, its files exactly as upstream's."""
    make_repo(hub_root, "facebookresearch", "dino", _dino_files())
    bare = hub_root / "facebookresearch" / "dino.git"
    listing = build_hub.git(bare, "ls-tree", "main").splitlines()  # "<mode> blob <id>\t<name>"
    assert {line.split("\t")[1]: line.split()[2] for line in listing} == UPSTREAM_BLOBS


@pytest.fixture(autouse=True)
def _shutdown():
    yield
    get_manager().shutdown()


def _hub_with_checkpoint(folder: Path, checkpoint: Path, **kwargs) -> flowhub.Hub:
    """A hub whose cache already holds dino's checkpoint under its URL's file name (an offline user's)."""
    cached = folder / "checkpoints" / CHECKPOINT
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(checkpoint, cached)
    except OSError:
        shutil.copy(checkpoint, cached)
    return flowhub.Hub(folder, mock_torch=True, **kwargs)


def _numpy_state(model: object) -> "OrderedDict[str, np.ndarray]":
    """A model's (or a proxy's) state dict as numpy arrays."""
    return OrderedDict((k, v.numpy()) for k, v in model.state_dict().items())


def test_the_vendored_files_are_upstreams() -> None:
    assert {name: _git_blob(DINO / name) for name in UPSTREAM_BLOBS} == UPSTREAM_BLOBS


def test_the_checkpoint_writer_writes_what_flowhub_reads_as_torch(dino_weights):
    """The hand-written file is a torch zip: aligned stored members, every tensor back bit for bit."""
    path = dino_weights["path"]
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset + 26)
            name_len, extra_len = struct.unpack("<HH", f.read(4))
            assert info.compress_type == zipfile.ZIP_STORED
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    got = flowhub.load_weights(str(path))
    assert list(got) == list(dino_weights["state"])
    for name, want in dino_weights["state"].items():
        assert np.array_equal(got[name].numpy(), want), name


@pytest.mark.parametrize("install_requirements", [False, True], ids=["plain", "overlays-on"])
def test_without_torchvision_the_error_names_it_and_says_why_mock_torch_cannot_help(dino_repo, tmp_path,
                                                                                     install_requirements):
    """Real dino as it is: mock_torch maps torch only, and the hubconf imports torchvision first. Neither
    pip nor an overlay can help (torchvision's operators are libtorch code), so flowhub says so instead of
    suggesting them, and with overlays on it installs nothing (torchvision's wheel would pull in torch)."""
    hub = flowhub.Hub(tmp_path / "hub", mock_torch=True, install_requirements=install_requirements)
    with pytest.raises(MissingModuleError) as info:
        hub.load("facebookresearch/dino", "dino_vits16", pretrained=False, trust_repo=True)
    err = info.value
    assert isinstance(err, ModuleNotFoundError) and err.name == "torchvision"
    text = str(err)
    assert "facebookresearch/dino@main" in text and "entrypoint 'dino_vits16'" in text
    assert "hubconf.py dependencies: torch, torchvision" in text
    assert "'torchvision' is a compiled extension of PyTorch" in text
    assert "oneflow.mock_torch stands in for torch only" in text and "flowvision" in text
    assert "pip install" not in text and "FLOWHUB_INSTALL_REQUIREMENTS" not in text
    if install_requirements:
        assert "'torchvision' (hubconf.py dependencies: a compiled PyTorch extension" in \
            hub.last_requirements.describe()
        root = overlays_root(str(tmp_path / "hub"))
        assert [n for n in (os.listdir(root) if os.path.isdir(root) else []) if n != store.META_DIR] == []


@pytest.mark.parametrize("mode", ["rebuild", "proxy"])
def test_dino_vits16_loads_its_pretrained_torch_checkpoint(dino_repo, dino_weights, tmp_path, monkeypatch, mode):
    """dino's unchanged hubconf in a mock_torch worker: ``dino_vits16(pretrained=True)`` builds dino's ViT,
    reads the cached ``.pth`` for its hard-coded URL (no download) and loads it strictly; the result has
    exactly the checkpoint's values and gives exactly the output a plain OneFlow process computes, with
    deferred initialisation (the default) and without. Only ``torchvision`` is a stand-in (see the module
    docstring): it is on the workers' import path here, not in the environment."""
    monkeypatch.syspath_prepend(dino_weights["standin"])  # the workers' import path is the caller's
    want: "OrderedDict[str, np.ndarray]" = dino_weights["state"]
    x = flow.from_numpy(dino_weights["input"])
    loaded = {}
    for deferred in (True, False):
        hub = _hub_with_checkpoint(tmp_path / f"hub-{deferred}", dino_weights["path"], mode=mode,
                                   deferred_init=deferred)
        model = hub.load("facebookresearch/dino", "dino_vits16", pretrained=True, trust_repo=True)
        assert [(w["url"], w["file"]) for w in hub.last_provenance.weights] == [(URL, CHECKPOINT)]
        if mode == "rebuild":
            assert isinstance(model, flow.nn.Module) and not isinstance(model, Proxy)
            assert type(model).__name__ == "VisionTransformer" and model.patch_embed.patch_size == 16
        else:
            assert isinstance(model, Proxy)
        got = _numpy_state(model)
        assert list(got) == list(want)
        for name, value in want.items():
            assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
        model.eval()
        with flow.no_grad():
            out = model(x).numpy()
        assert out.shape == (2, 384)
        assert np.array_equal(out, dino_weights["output"])
        loaded[deferred] = (got, out)
    assert "torch" not in sys.modules and "torchvision" not in sys.modules  # the caller needs neither
    (fast_state, fast_out), (plain_state, plain_out) = loaded[True], loaded[False]
    assert np.array_equal(fast_out, plain_out)
    assert all(np.array_equal(fast_state[k], plain_state[k]) for k in want)
