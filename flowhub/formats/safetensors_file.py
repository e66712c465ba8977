"""``.safetensors`` files, read through their documented layout (no code, no pickle in the format).

Layout: an 8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data; offsets are relative to the
data's start, and the tensors must tile it exactly (no gap, no overlap), which is checked before
anything is mapped. Tensors are little-endian and C-contiguous, so each maps without a copy when
its offset is a multiple of its element size (writers pad the header to make it so).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from flowhub.errors import CheckpointFormatError
from flowhub.formats import arrays

MAX_HEADER = 100 << 20  # what the safetensors package itself accepts
DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
          "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
          "I64": "int64", "U64": "uint64"}


def _header(source: arrays.Source, path: str) -> Tuple[int, List[Tuple[str, str, Tuple[int, ...], int, int]]]:
    """(start of the data, [(name, dtype, shape, begin, end)] sorted by begin), all checked."""
    def bad(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{path}: not a valid safetensors file: {why}. Nothing was loaded.")

    length = int.from_bytes(source.region(0, 8, "the header length").tobytes(), "little")
    if not 2 <= length <= min(MAX_HEADER, source.size - 8):
        raise bad(f"its header length {length} does not fit the file ({source.size} bytes)")
    try:
        header = json.loads(source.region(8, length, "the header").tobytes())
    except ValueError as exc:
        raise bad(f"its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r:.80} is not described by dtype, shape and data_offsets")
        dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
        if dtype is None:
            raise bad(f"tensor {name!r:.80} has dtype {entry['dtype']!r:.20}, which flowhub does not know")
        arrays.check_dtype(dtype, f"{path}: tensor {name!r:.80}")
        shape = entry["shape"]
        offsets = entry["data_offsets"]
        if not (isinstance(shape, list) and len(shape) <= arrays.MAX_NDIM
                and all(type(d) is int and 0 <= d < 1 << 62 for d in shape)):
            raise bad(f"tensor {name!r:.80} has shape {shape!r:.80}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise bad(f"tensor {name!r:.80} has data_offsets {offsets!r:.80}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * arrays.STORED_ITEMSIZE[dtype]:
            raise bad(f"tensor {name!r:.80} of shape {shape} and dtype {entry['dtype']} spans "
                      f"{offsets[1] - offsets[0]} bytes")
        entries.append((name, dtype, tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e[3], e[4]))
    end, start = 0, 8 + length
    for name, _, _, begin, stop in entries:
        if begin != end:
            raise bad(f"tensor {name!r:.80} starts at byte {begin} of the data, where {end} was expected "
                      "(tensors overlap or leave a gap)")
        end = stop
    if start + end != source.size:
        raise bad(f"its tensors cover {end} bytes of data, but the file holds {source.size - start}")
    return start, entries


def read(path: str, *, mapped: bool = False) -> arrays.Loaded:
    """Read the safetensors file at ``path`` into ``{name: tensor}`` (see :func:`flowhub.formats.read`)."""
    source = arrays.Source(path, mapped)
    start, entries = _header(source, path)
    value: Dict[str, Any] = {}
    extents: List[arrays.Extent] = []
    for name, dtype, shape, begin, stop in entries:
        flat, file_offset = arrays.storage(source, start + begin, stop - begin, dtype, f"tensor {name!r:.80}")
        array = flat.reshape(shape)
        value[name] = arrays.to_oneflow(array, dtype)
        if file_offset is not None and dtype != "bfloat16" and array.nbytes:
            extents.append(arrays.Extent(file_offset, array.dtype.name, shape, int(array.nbytes)))
    return arrays.Loaded(value, extents)
