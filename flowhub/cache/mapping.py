"""Zero-copy loading of OneFlow checkpoint folders that live in the hub cache.

``oneflow.load`` reads every ``tensor_N/out`` with ``np.fromfile`` and copies it into a tensor. For
a folder published in the hub cache (extracted once, replaced only by rename, never rewritten in
place) that copy is not needed: :func:`mapped_loads` makes ``oneflow.load`` map each ``out`` file
copy-on-write instead (``MAP_PRIVATE``, writable: the tensor can be trained, the file never
changes, and its pages are the page cache shared by every process that maps it). Files outside
``roots`` are still copied, since they could change under the mapping.

Every file mapped is remembered (:func:`take_loaded`), so a worker can tell its caller "these
parameters are the bytes of that cached file" instead of sending the bytes
(:mod:`flowhub.worker.wire.weightrefs`).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, NamedTuple, Sequence, Tuple

from flowhub.cache.store import inside

if TYPE_CHECKING:
    import numpy as np

_lock = threading.RLock()
_loaded: List["LoadedFile"] = []
_MAX_REMEMBERED = 1 << 16
_unpickling = threading.local()  # .loaded: the file the tensor being unpickled was mapped from
#: Below this a tensor is copied as usual: mapping costs a descriptor and a page each.
MIN_MAPPED_BYTES = 64 << 10


class LoadedFile(NamedTuple):
    """One tensor file mapped by :func:`mapped_loads`."""

    path: str  # real path of the ``out`` file (or of a torch/safetensors file)
    dtype: str  # numpy dtype name
    shape: Tuple[int, ...]
    nbytes: int
    offset: int = 0  # where the tensor's bytes start in the file


def map_file(path: str, dtype: Any, shape: Tuple[int, ...], offset: int = 0) -> "np.ndarray":
    """``path``'s bytes from ``offset`` as a writable copy-on-write array (never a read-only map:
    oneflow accepts one and crashes on the first in-place op)."""
    import numpy as np  # delayed: importing flowhub must not start numpy's threads

    return np.memmap(path, dtype=dtype, mode="c", shape=shape, offset=offset)


@contextlib.contextmanager
def mapped_loads(roots: Sequence[str]) -> Iterator[None]:
    """While active (in any thread), ``oneflow.load`` maps the tensor files of folders under ``roots``."""
    from oneflow.framework import check_point_v2 as cp  # delayed: only a load needs oneflow

    with _lock:
        original = cp._LoadSingleVariable
        cp._LoadSingleVariable = _mapping_loader(original, tuple(roots))
        try:
            yield
        finally:
            cp._LoadSingleVariable = original


def install(roots: Sequence[str]) -> None:
    """For good (in a worker, whose every ``oneflow.load`` may then map): see :func:`mapped_loads`."""
    from oneflow.framework import check_point_v2 as cp

    with _lock:
        original = getattr(cp._LoadSingleVariable, "flowhub_original", cp._LoadSingleVariable)
        cp._LoadSingleVariable = _mapping_loader(original, tuple(roots))


def _mapping_loader(original, roots: Tuple[str, ...]):
    import numpy as np
    import oneflow as flow
    from oneflow.framework import check_point_v2 as cp
    from oneflow.framework import dtype as dtype_util

    def to_cpu(map_location) -> bool:
        if map_location is None:
            return True
        return isinstance(map_location, (str, flow.device)) and flow.device(map_location).type == "cpu"

    def load_single_variable(path, global_src_rank=None, map_location=None):
        # a global (distributed) load, a file outside the cache, or another device: oneflow's own way
        if global_src_rank is not None or path is None or not inside(path, roots) or not to_cpu(map_location):
            return original(path, global_src_rank, map_location)
        blob = cp.FileBackendVariableBlob(path)
        dtype = np.dtype(dtype_util.convert_oneflow_dtype_to_numpy_dtype(blob.dtype))
        shape = tuple(int(d) for d in blob.shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < MIN_MAPPED_BYTES or os.path.getsize(blob.file_path) != nbytes:
            return original(path, global_src_rank, map_location)
        real = os.path.realpath(blob.file_path)
        array = map_file(real, dtype, shape)
        loaded = LoadedFile(real, dtype.name, shape, nbytes)
        with _lock:
            _loaded.append(loaded)
            del _loaded[:-_MAX_REMEMBERED]
        _unpickling.loaded = loaded
        return flow.from_numpy(array)

    load_single_variable.flowhub_original = original  # type: ignore[attr-defined]
    return load_single_variable


@contextlib.contextmanager
def tracking_origins() -> Iterator[Dict[int, Tuple[Any, LoadedFile]]]:
    """While active, every tensor ``oneflow.load`` unpickles onto a file :func:`install`'s loader mapped
    is recorded with that file, under ``id(tensor)`` (and kept alive until the end), so a parameter
    can be mapped onto the same file (:mod:`flowhub.worker.proc.deferred`)."""
    import oneflow as flow

    origins: Dict[int, Tuple[Any, LoadedFile]] = {}
    with _lock:
        original = flow.Tensor.__setstate__

    def setstate(tensor: Any, state: Any) -> Any:
        _unpickling.loaded = None
        result = original(tensor, state)
        loaded, _unpickling.loaded = getattr(_unpickling, "loaded", None), None
        if loaded is not None:
            origins[id(tensor)] = (tensor, loaded)
        return result

    with _lock:
        flow.Tensor.__setstate__ = setstate
    try:
        yield origins
    finally:
        with _lock:
            flow.Tensor.__setstate__ = original


def remember(path: str, extents: Sequence[Any]) -> None:
    """Record tensors read zero-copy from ``path`` by :mod:`flowhub.formats` (its ``Extent`` tuples)."""
    real = os.path.realpath(path)
    with _lock:
        _loaded.extend(LoadedFile(real, e.dtype, tuple(e.shape), e.nbytes, e.offset)
                       for e in extents if e.nbytes >= MIN_MAPPED_BYTES)
        del _loaded[:-_MAX_REMEMBERED]


def take_loaded() -> List[LoadedFile]:
    """The files mapped since the last call (and forget them)."""
    with _lock:
        files = list(_loaded)
        _loaded.clear()
    return files
