"""Tensors whose bytes are a file of the hub cache travel as a reference to it, not as bytes.

The usual pretrained load in a worker: the hubconf builds a model, ``load_state_dict_from_url`` maps
the cached checkpoint (:mod:`flowhub.cache.mapping`), ``load_state_dict`` copies it into the model.
Sending those parameters back would copy them twice more (into a memfd, then fault them in here).
Instead the worker checks, byte for byte, which of its result's tensors equal a cached tensor file it
mapped during the call (:func:`match`: a ``tensor_N/out`` file, or a tensor's bytes inside a torch or
safetensors file), and sends ``{"file", "offset"}`` for those; the caller maps
the same file copy-on-write (:func:`open_reference`), after checking that it lies in the hub cache
and holds exactly those bytes. Cache entries are published by rename and never rewritten in place,
so a mapping stays valid (and unchanged) even when its entry is replaced or removed.
"""
from __future__ import annotations

import os
import stat
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from flowhub.cache import mapping, store
from flowhub.errors import TransferError
from flowhub.worker.wire import transfer


def match(arrays: Sequence[np.ndarray], meta: Sequence[dict],
          loaded: Sequence[mapping.LoadedFile]) -> List[Optional[dict]]:
    """Per array: ``{"file": path, "offset": 0}`` if it is a tensor equal to one of ``loaded``, else None."""
    if not loaded:
        return [None] * len(arrays)
    # candidates by (dtype, shape, a sample of their bytes): one full comparison per match, however many
    # tensors share a shape (a model's layers usually do)
    candidates: Dict[Tuple[str, Tuple[int, ...], bytes], List[mapping.LoadedFile]] = {}
    for f in loaded:
        sample = _file_sample(f.path, f.nbytes, f.offset)
        if sample is not None:
            candidates.setdefault((f.dtype, tuple(f.shape), sample), []).append(f)
    refs: List[Optional[dict]] = []
    for array, info in zip(arrays, meta):
        ref = None
        if info.get("kind") in ("param", "tensor") and array.nbytes >= mapping.MIN_MAPPED_BYTES:
            flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            for f in candidates.get((array.dtype.name, tuple(array.shape), _sample(flat)), ()):
                if _same_bytes(flat, f.path, f.nbytes, f.offset):
                    ref = {"file": f.path, "offset": f.offset}
                    break
        refs.append(ref)
    return refs


_SAMPLE = 256


def _sample(flat: np.ndarray) -> bytes:
    """A few hundred bytes from the start, middle and end of ``flat`` (uint8)."""
    n, mid = len(flat), len(flat) // 2
    return b"".join(flat[a:a + _SAMPLE].tobytes() for a in (0, max(mid - _SAMPLE // 2, 0), max(n - _SAMPLE, 0)))


def _file_sample(path: str, nbytes: int, offset: int) -> Optional[bytes]:
    """The sample of ``nbytes`` bytes at ``offset`` of ``path`` (a tensor file is exactly them; a torch or
    safetensors file holds them among others)."""
    try:
        size = os.path.getsize(path)
        if (size != nbytes) if offset == 0 else (size < offset + nbytes):
            return None
        return _sample(np.memmap(path, dtype=np.uint8, mode="r", shape=(nbytes,), offset=offset))
    except (OSError, ValueError):
        return None


def _same_bytes(flat: np.ndarray, path: str, nbytes: int, offset: int) -> bool:
    try:
        on_disk = np.memmap(path, dtype=np.uint8, mode="r", shape=(nbytes,), offset=offset)
    except (OSError, ValueError):
        return False
    return bool(np.array_equal(flat, on_disk))


def open_reference(entry: dict, roots: Sequence[str]) -> np.ndarray:
    """Caller side: map the file a reference names, after checking it (dtype allow-list, shape and
    size, a regular file inside ``roots``, at least ``offset + nbytes`` long)."""
    try:
        dtype = transfer.DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        path, offset, nbytes = entry["file"], entry["offset"], entry["nbytes"]
    except (KeyError, TypeError):
        raise TransferError(f"malformed file reference {entry!r:.200}") from None
    if not isinstance(path, str) or not all(type(v) is int and v >= 0 for v in (offset, nbytes) + shape) \
            or len(shape) > transfer.MAX_NDIM:
        raise TransferError(f"malformed file reference {entry!r:.200}")
    count = 1
    for dim in shape:
        count *= dim
    if count * dtype.itemsize != nbytes or offset % dtype.itemsize:
        raise TransferError(f"file reference {path!r:.200}: shape {shape} does not make {nbytes} bytes")
    if not store.inside(path, roots):
        raise TransferError(f"file reference {path!r:.200} is outside the hub cache")
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TransferError(f"file reference {path!r:.200}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size < offset + nbytes:
        raise TransferError(f"file reference {path!r:.200} is not a regular file of {offset + nbytes} bytes")
    return mapping.map_file(os.path.realpath(path), dtype, shape, offset)


def split(arrays: Sequence[np.ndarray], meta: Sequence[dict],
          refs: Sequence[Optional[dict]]) -> Tuple[List[np.ndarray], List[dict], List[dict]]:
    """Worker side: ``(arrays to pack, their meta with "index", file entries with "index")``."""
    packed, packed_meta, files = [], [], []
    for index, (array, info, ref) in enumerate(zip(arrays, meta, refs)):
        if ref is None:
            packed.append(array)
            packed_meta.append(dict(info, index=index))
        else:
            files.append(dict(info, index=index, dtype=array.dtype.name, shape=list(array.shape),
                              nbytes=int(array.nbytes), **ref))
    return packed, packed_meta, files


def join(table: Sequence[dict], table_arrays: Sequence[np.ndarray], files: object,
         roots: Sequence[str]) -> Tuple[List[np.ndarray], List[dict]]:
    """Caller side: the arrays and meta of a reply, in their original order, file references mapped."""
    if files is None:
        files = []
    if not isinstance(files, list):
        raise TransferError("the file references of a reply are not a list")
    entries = [(e.get("index"), e, a) for e, a in zip(table, table_arrays)]
    entries += [(f.get("index") if isinstance(f, dict) else None, f, None) for f in files]
    if sorted(i if type(i) is int else -1 for i, _, _ in entries) != list(range(len(entries))):
        raise TransferError("the tensor table and file references of a reply do not index every tensor once")
    entries.sort(key=lambda item: item[0])
    arrays = [a if a is not None else open_reference(e, roots) for _, e, a in entries]
    return arrays, [e for _, e, _ in entries]
