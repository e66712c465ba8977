"""Hostile and broken weight files are refused with a flowhub error before anything in them runs or
any view is made: globals outside the allow-list, out-of-range storages, self-overlapping views,
truncated files, state set on tensors, bad safetensors headers."""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

import flowhub
from flowhub import formats
from flowhub.errors import CheckpointFormatError, UnsafeCheckpointError

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def tensor_pickle(offset=0, size=(3, 4), stride=(4, 1), numel=12, storage="FloatStorage", key="0",
                  after: bytes = b"") -> bytes:
    """A torch-style pickle of one tensor, written opcode by opcode (protocol 0 text plus BINPERSID)."""
    ints = lambda values: b"(" + b"".join(b"I%d\n" % v for v in values) + b"t"  # noqa: E731
    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            b"(Vstorage\nctorch\n" + storage.encode() + b"\nV" + key.encode() + b"\nVcpu\nI%d\ntQ" % numel
            + b"I%d\n" % offset + ints(size) + ints(stride) + b"I00\nccollections\nOrderedDict\n)RtR" + after + b".")


def write_pth(path, pickled: bytes, storages=None) -> str:
    """A torch zip checkpoint: ``archive/data.pkl`` plus ``archive/data/<key>`` members (stored)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickled)
        for key, data in (storages if storages is not None else {"0": np.arange(12, dtype="<f4").tobytes()}).items():
            zf.writestr(f"archive/data/{key}", data)
    return str(path)


def write_legacy(path, pickled: bytes, keys=("0",), data: bytes = b"") -> str:
    with open(path, "wb") as f:
        for value in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(value, f, protocol=2)
        f.write(pickled)
        pickle.dump(list(keys), f, protocol=2)
        f.write(data)
    return str(path)


def test_the_hand_made_pickle_is_a_valid_checkpoint(tmp_path):
    """The helpers above write what torch writes: the hostile variants below differ in one thing only."""
    t = formats.read(write_pth(tmp_path / "ok.pth", tensor_pickle()), "torch-zip").value
    assert np.array_equal(t.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))
    data = struct.pack("<q", 12) + np.arange(12, dtype="<f4").tobytes()
    t = formats.read(write_legacy(tmp_path / "ok_legacy.pth", tensor_pickle(), data=data), "torch-legacy").value
    assert np.array_equal(t.numpy(), np.arange(12, dtype=np.float32).reshape(3, 4))


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
                                          ("posix", "system"), ("torch._utils", "_rebuild_tensor_v3")])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_globals_outside_the_allow_list_are_refused_unrun(tmp_path, module, name, layout):
    marker = tmp_path / "ran"
    evil = f"c{module}\n{name}\n(Vtouch {marker}\ntR.".encode()
    path = write_pth(tmp_path / "evil.pth", evil) if layout == "zip" else write_legacy(tmp_path / "evil.pth", evil)
    with pytest.raises(UnsafeCheckpointError, match=rf"asks for {module}\.{name}.*Nothing from the file was run"):
        flowhub.load_weights(path)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # what torch raises for a weights-only refusal
        flowhub.load_weights(path, weights_only=False)
    assert not marker.exists()


def test_a_global_inside_a_legit_checkpoint_is_refused(tmp_path):
    """A real checkpoint with one extra object (here ``os.getcwd``) is refused whole."""
    pickled = tensor_pickle(after=b"0cos\ngetcwd\n)R")  # POP the tensor, call os.getcwd()
    with pytest.raises(UnsafeCheckpointError, match=r"os\.getcwd"):
        flowhub.load_weights(write_pth(tmp_path / "x.pth", pickled))


@pytest.mark.parametrize("kwargs, message", [
    ({"offset": 1}, r"reaches element 12, but its storage has 12 elements"),
    ({"offset": 1 << 40}, r"reaches element"),
    ({"size": (300, 4)}, r"reaches element"),
    ({"stride": (4, 1 << 50)}, r"reaches element"),
    ({"stride": (1, 1)}, r"overlaps itself"),
    ({"size": (3, 4), "stride": (0, 1)}, r"overlaps itself"),
    ({"size": (3, -4)}, r"size is not a list"),
    ({"numel": 13}, r"holds 48 bytes, but the pickle says 13 float32"),
    ({"numel": 1 << 40}, r"holds 48 bytes"),
    ({"key": "../../etc/passwd"}, r"which the zip does not hold"),
])
def test_views_outside_their_storage_are_refused(tmp_path, kwargs, message):
    path = write_pth(tmp_path / "bad.pth", tensor_pickle(**kwargs))
    for mapped in (False, True):
        with pytest.raises(CheckpointFormatError, match=message):
            formats.read(path, "torch-zip", mapped=mapped)


def test_legacy_storages_past_the_end_are_refused(tmp_path):
    data = struct.pack("<q", 12) + np.arange(12, dtype="<f4").tobytes()
    for cut in (4, 20, len(data) - 1):
        path = write_legacy(tmp_path / f"cut{cut}.pth", tensor_pickle(), data=data[:cut])
        with pytest.raises(CheckpointFormatError, match=r"past the end of the file|truncated"):
            formats.read(path, "torch-legacy", mapped=True)
    liar = write_legacy(tmp_path / "liar.pth", tensor_pickle(), data=struct.pack("<q", 1 << 60) + data[8:])
    with pytest.raises(CheckpointFormatError, match=r"elements in the file but 12 in the pickle"):
        formats.read(liar, "torch-legacy")


def test_state_cannot_be_set_on_a_tensor(tmp_path):
    """``BUILD`` on a tensor would reach oneflow's ``Tensor.__setstate__`` (which can load a path)."""
    pickled = tensor_pickle(after=b"(dVpath\nV../../secret\nsb")
    with pytest.raises(CheckpointFormatError, match=r"set the state"):
        formats.read(write_pth(tmp_path / "b.pth", pickled), "torch-zip")


@pytest.mark.parametrize("fixture", ["checkpoint.pth", "checkpoint_legacy.pth"])
def test_truncated_files_are_refused(tmp_path, fixture):
    with open(os.path.join(FIXTURES, fixture), "rb") as f:
        whole = f.read()
    kind = "torch-zip" if fixture == "checkpoint.pth" else "torch-legacy"
    for keep in (len(whole) // 2, len(whole) - 10):
        path = tmp_path / f"{keep}.pth"
        path.write_bytes(whole[:keep])
        with pytest.raises(CheckpointFormatError, match=r"truncated or corrupt"):
            formats.read(str(path), kind, mapped=True)


def _safetensors(path, header: dict, data: bytes, length=None) -> str:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


@pytest.mark.parametrize("header, data, length, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 1 << 40, r"header length"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 3, r"not JSON"),
    ([1, 2], b"", None, r"not a JSON object"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"spans 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, r"overlap or leave a gap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, None, r"cover 8 bytes"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, r"cover 8 bytes"),
    ({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, None, r"does not know"),
    ({"a": {"dtype": "I16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, r"no int16 tensors"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"has shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, None, r"data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, b"\0" * 8, None, r"not described"),
])
def test_bad_safetensors_headers_are_refused(tmp_path, header, data, length, message):
    path = _safetensors(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(CheckpointFormatError, match=message):
        formats.read(path, "safetensors", mapped=True)
