"""What the readers share: a file's bytes (mapped or read), storages, bounds-checked views, and oneflow tensors.

Every offset, size and stride a file states is checked against the bytes that are really there
before any view is made, so a hostile or truncated file gives a :class:`CheckpointFormatError`, never
a view past the end of a mapping (a SIGBUS) or into another storage.
"""
from __future__ import annotations

import os
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from flowhub.errors import CheckpointFormatError

#: Element types by the name the readers use, as stored on disk (little-endian; bfloat16 as its raw 16 bits).
STORED = {"float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8",
          "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?", "uint16": "<u2",
          "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "complex128": "<c16"}
STORED_ITEMSIZE = {name: np.dtype(code).itemsize for name, code in STORED.items()}
#: The ones OneFlow 0.9 has tensors for.
ONEFLOW_DTYPES = frozenset(("float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"))
MAX_NDIM = 64


class Extent(NamedTuple):
    """A tensor that is, zero-copy, the bytes ``[offset, offset + nbytes)`` of the file it was read from."""

    offset: int
    dtype: str  # numpy dtype name
    shape: Tuple[int, ...]
    nbytes: int


class Loaded(NamedTuple):
    """What a reader returns: the file's object (oneflow tensors in it) and the extents its tensors map."""

    value: Any
    extents: List[Extent]


class Source:
    """The bytes of one file: with ``mapped``, one writable copy-on-write map of all of it (never a
    read-only one: oneflow accepts it and crashes on the first in-place op); else read per region."""

    def __init__(self, path: str, mapped: bool) -> None:
        self.path = path
        self.size = os.path.getsize(path)
        self._map = np.memmap(path, dtype=np.uint8, mode="c") if mapped and self.size else None

    @property
    def mapped(self) -> bool:
        return self._map is not None

    def region(self, offset: int, nbytes: int, what: str) -> np.ndarray:
        """``nbytes`` bytes at ``offset`` as a uint8 array (a view of the map, or a fresh copy)."""
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CheckpointFormatError(
                f"{self.path}: {what} is said to lie at bytes {offset}..{offset + nbytes}, past the end of the "
                f"file ({self.size} bytes): the file is truncated or corrupt. Nothing was loaded.")
        if self._map is not None:
            return np.asarray(self._map[offset:offset + nbytes])
        return np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=offset)


def storage(source: Source, offset: int, nbytes: int, dtype: str, what: str,
            big_endian: bool = False) -> Tuple[np.ndarray, Optional[int]]:
    """The region's bytes as a 1-D array of ``dtype`` (a name of :data:`STORED`), and the file offset it
    maps (None when it had to be copied: not mapped, misaligned or in the other byte order)."""
    stored = np.dtype(STORED[dtype])
    if big_endian:
        stored = stored.newbyteorder(">")
    if nbytes % stored.itemsize:
        raise CheckpointFormatError(f"{source.path}: {what} holds {nbytes} bytes, not a whole number of "
                                    f"{dtype} elements. Nothing was loaded.")
    array = source.region(offset, nbytes, what).view(stored)
    if not stored.isnative:
        return array.astype(stored.newbyteorder("=")), None
    if not source.mapped:
        return array, None  # already a fresh (aligned) copy
    if offset % stored.itemsize:
        return array.copy(), None  # misaligned: oneflow wants aligned memory
    return array, offset


def storage_from_bytes(data: bytes, dtype: str, what: str, big_endian: bool = False) -> np.ndarray:
    """Like :func:`storage` for bytes already read (a decompressed member): a writable native copy."""
    stored = np.dtype(STORED[dtype]).newbyteorder(">" if big_endian else "<")
    if len(data) % stored.itemsize:
        raise CheckpointFormatError(f"{what} holds {len(data)} bytes, not a whole number of {dtype} elements.")
    return np.frombuffer(data, dtype=stored).astype(stored.newbyteorder("="))  # astype: a writable copy


def _ints(value: Any, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM \
            or not all(type(v) is int and 0 <= v < 1 << 62 for v in value):
        raise CheckpointFormatError(f"{what} is not a list of at most {MAX_NDIM} non-negative integers: {value!r:.200}")
    return tuple(value)


def view(array: np.ndarray, offset: Any, size: Any, stride: Any, what: str) -> Tuple[np.ndarray, bool]:
    """Elements of the storage ``array`` at ``offset`` with ``size`` and ``stride`` (in elements, torch's
    way), checked to stay inside it and not to overlap themselves; and whether the result is a view
    (contiguous) rather than a copy."""
    size = _ints(size, f"{what}: the size")
    stride = _ints(stride, f"{what}: the stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise CheckpointFormatError(f"{what}: storage offset {offset!r:.40}, size {size} and stride {stride} "
                                    "do not describe a tensor. Nothing was loaded.")
    if 0 in size:
        return np.empty(size, array.dtype), False
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= len(array):
        raise CheckpointFormatError(
            f"{what}: a tensor of size {list(size)} and stride {list(stride)} at storage offset {offset} reaches "
            f"element {last}, but its storage has {len(array)} elements. Nothing was loaded.")
    reach = 1  # elements spanned by the dims taken so far, smallest stride first
    for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
        if s < reach:
            raise CheckpointFormatError(
                f"{what}: a tensor of size {list(size)} and stride {list(stride)} overlaps itself (two of its "
                "elements are one element of storage), which no saved weight needs. Nothing was loaded.")
        reach += (n - 1) * s
    numel = 1
    for n in size:
        numel *= n
    if all(s == c for n, s, c in zip(size, stride, _c_strides(size)) if n > 1):
        return array[offset:offset + numel].reshape(size), True
    strided = np.lib.stride_tricks.as_strided(array[offset:], shape=size,
                                              strides=[s * array.itemsize for s in stride], writeable=False)
    return strided.copy(), False


def _c_strides(size: Sequence[int]) -> List[int]:
    strides, step = [], 1
    for n in reversed(size):
        strides.append(step)
        step *= n
    return strides[::-1]


def check_dtype(dtype: str, what: str) -> None:
    """Refuse, before reading anything, a tensor OneFlow has no dtype for."""
    if dtype not in ONEFLOW_DTYPES:
        raise CheckpointFormatError(
            f"{what} is a {dtype} tensor, and OneFlow 0.9 has no {dtype} tensors (it has "
            f"{', '.join(sorted(ONEFLOW_DTYPES))}). Convert it before saving. Nothing was loaded.")


def to_oneflow(array: np.ndarray, dtype: str) -> Any:
    """A oneflow tensor over ``array`` (sharing its memory), or for bfloat16 a converted copy."""
    import oneflow as flow  # delayed: only reading a file needs oneflow

    if dtype == "bfloat16":  # raw 16 bits: the upper half of a float32
        wide = (array.astype(np.uint32) << 16).view(np.float32)
        return flow.from_numpy(wide).to(flow.bfloat16)
    return flow.from_numpy(array)
