"""Deferred parameter initialisation: a pretrained load in a worker never draws the random weights
that its checkpoint overwrites (``Hub(deferred_init=...)``, ``FLOWHUB_DEFERRED_INIT``, default on).

``model = Net(); model.load_state_dict(load_state_dict_from_url(url))`` spends most of its time
(0.8 of 1.1 s for a 400 MB model here) drawing random initial weights and faulting in their memory,
then overwrites every one of them. :func:`run_entrypoint` runs a load speculatively first:

* ``oneflow.nn.init``'s functions (``Tensor.uniform_``, ``normal_``... call them) on a ``Parameter``
  only take note, and give the parameter a placeholder: fresh anonymous zero pages, never written,
  so nothing is drawn or faulted in;
* ``copy_`` into such a parameter (what ``load_state_dict`` does) from a tensor that
  :mod:`flowhub.cache.mapping` mapped from the hub cache maps the placeholder's pages onto that file
  (``MAP_PRIVATE | MAP_FIXED``: copy-on-write at the same address, so the parameter and its views
  see the checkpoint, and writes never reach the file); from any other tensor it copies as usual.

The speculation is kept only when every deferred parameter was then overwritten by ``copy_``, no
other code drew from the generator (its state is unchanged), and no ``copy_`` read a deferred
parameter before it was overwritten. The generator then moves on to a state derived from the one
the load started from (reproducible, never a repeat of the start). Otherwise (a head the checkpoint
does not cover, ``pretrained=False``, a buffer drawn with ``flow.randn``, an error) the speculative
result is dropped and the entrypoint runs again the usual way from the same generator state, its
output silenced (it was shown once): the result is then what a load without deferral gives.

Only the thread running the load defers; other threads (a hubconf's own) initialise and copy as
usual. flowhub's ``mode="inprocess"`` never speculates: it keeps the reference's behaviour exactly
(its generator advances by the draws themselves).

What it cannot see: a model that derives a value from its initial weights with an out-of-place
operation before it loads the checkpoint, and keeps that value although the load overwrites the
weights. ``deferred_init=False`` turns the speculation off.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import io
import mmap
import os
import sys
import threading
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import oneflow as flow

from flowhub import context
from flowhub.cache import mapping
from flowhub.worker.wire import byvalue

#: ``oneflow.nn.init`` functions whose work waits (``Tensor.uniform_`` and its kin call them).
INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                  "xavier_uniform_", "xavier_normal_", "orthogonal_", "constant_", "ones_", "zeros_", "eye_")
_DTYPES = {flow.float32: np.float32, flow.float64: np.float64, flow.float16: np.float16}
_PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # <sys/mman.h> on Linux
_active = threading.Lock()  # one speculation at a time (an entrypoint that loads another runs it plainly)


@functools.lru_cache(maxsize=None)
def _libc_mmap() -> Callable[..., Optional[int]]:
    """libc's ``mmap`` (Python's ``mmap`` module cannot map at a given address)."""
    function = ctypes.CDLL(None, use_errno=True).mmap
    function.restype = ctypes.c_void_p
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    return function


class _Deferred:
    """A parameter whose initialisation waits, and its placeholder pages."""

    __slots__ = ("param", "region", "array", "loaded")

    def __init__(self, param: Any) -> None:
        dtype = np.dtype(_DTYPES[param.dtype])
        shape = tuple(int(d) for d in param.shape)
        count = int(np.prod(shape, dtype=np.int64))
        self.region = mmap.mmap(-1, max(-(-count * dtype.itemsize // _PAGE) * _PAGE, _PAGE))
        self.array = np.frombuffer(self.region, dtype=dtype, count=count).reshape(shape)
        param.data = flow.from_numpy(self.array)  # the array (and the region) live as long as the tensor
        self.param, self.loaded = param, False

    def map_onto(self, loaded: mapping.LoadedFile) -> bool:
        """Replace the placeholder's pages with a copy-on-write mapping of ``loaded``'s bytes."""
        array = self.array
        if loaded.offset % _PAGE or loaded.dtype != array.dtype.name or tuple(loaded.shape) != array.shape:
            return False
        fd = os.open(loaded.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size < loaded.offset + loaded.nbytes:
                return False
            flow._oneflow_internal.eager.Sync()  # operations queued on the placeholder run first
            address, length = array.__array_interface__["data"][0], len(self.region)
            rw = mmap.PROT_READ | mmap.PROT_WRITE
            mapped = _libc_mmap()(address, length, rw, mmap.MAP_PRIVATE | _MAP_FIXED, fd, loaded.offset)
        finally:
            os.close(fd)
        if mapped == address:
            return True
        # a failed MAP_FIXED may have unmapped the range: put zero pages back, then copy as usual
        if _libc_mmap()(address, length, rw, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0) != address:
            raise OSError(ctypes.get_errno(), "flowhub: could not restore a parameter's placeholder pages")
        return False


class Speculation:
    """While active: ``nn.init`` on parameters waits, ``copy_`` from cached checkpoints maps (see above)."""

    def __init__(self) -> None:
        self.deferred: Dict[int, _Deferred] = {}
        self.read_early = False
        self.calls = 0
        self._saved: Dict[str, Any] = {}
        self._origins: Dict[int, Tuple[Any, mapping.LoadedFile]] = {}
        self._tracking: Optional[contextlib.AbstractContextManager] = None
        self._thread = threading.get_ident()  # other threads (a hubconf's own) initialise and copy as usual

    # -- patches ------------------------------------------------------------------------------------
    def __enter__(self) -> "Speculation":
        self._tracking = mapping.tracking_origins()
        self._origins = self._tracking.__enter__()
        for name in INIT_FUNCTIONS:
            original = getattr(flow.nn.init, name, None)
            if original is not None:
                self._saved[name] = original
                setattr(flow.nn.init, name, self._deferring(original))
        self._saved["copy_"] = flow.Tensor.copy_
        flow.Tensor.copy_ = self._copying(flow.Tensor.copy_)
        return self

    def __exit__(self, *exc: Any) -> None:
        flow.Tensor.copy_ = self._saved.pop("copy_")
        for name, original in self._saved.items():
            setattr(flow.nn.init, name, original)
        self._saved.clear()
        if self._tracking is not None:
            self._tracking.__exit__(None, None, None)
            self._tracking = None

    def release(self) -> None:
        """Forget the parameters and mapped tensors seen (the result, if kept, holds what it needs)."""
        self.deferred.clear()
        self._origins.clear()

    @staticmethod
    def _eligible(tensor: Any) -> bool:
        return (isinstance(tensor, flow.nn.Parameter) and tensor.is_local and tensor.dtype in _DTYPES
                and tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.numel() > 0)

    def _deferring(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread or not self._eligible(tensor):
                return original(tensor, *args, **kwargs)
            entry = self.deferred.get(id(tensor))
            if entry is None or entry.param is not tensor:
                entry = self.deferred[id(tensor)] = _Deferred(tensor)
            entry.loaded = False
            self.calls += 1
            return tensor

        init.__wrapped__ = original  # type: ignore[attr-defined]
        return init

    def _copying(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def copy_(target: Any, other: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread:
                return original(target, other, *args, **kwargs)
            entry = self.deferred.get(id(target))
            if entry is not None and entry.param is target:
                origin = self._origin(other, entry) if not args and not kwargs else None
                if origin is None or not entry.map_onto(origin):
                    original(target, other, *args, **kwargs)
                entry.loaded = True
                return None
            source = self.deferred.get(id(other))
            if source is not None and source.param is other and not source.loaded:
                self.read_early = True  # a value computed from an initialisation that never happened
            return original(target, other, *args, **kwargs)

        copy_.__wrapped__ = original  # type: ignore[attr-defined]
        return copy_

    def _origin(self, other: Any, entry: _Deferred) -> Optional[mapping.LoadedFile]:
        """The cached file ``other`` was loaded from as a mapping, if it was."""
        found = self._origins.get(id(other))
        if found is None or found[0] is not other or tuple(other.shape) != entry.array.shape:
            return None
        return found[1]

    # -- the verdict --------------------------------------------------------------------------------
    def kept(self, start_state: bytes) -> bool:
        """Whether the speculative result is the one a plain run gives (see the module's docstring)."""
        if not self.deferred:
            return True  # nothing waited: it was a plain run
        if self.read_early or not all(entry.loaded for entry in self.deferred.values()):
            return False
        return byvalue.rng_state() == start_state

    def advance(self, start_state: bytes) -> None:
        """Move the generator on from ``start_state`` as a plain run would have (reproducibly)."""
        if self.calls:
            digest = hashlib.sha256(b"flowhub-deferred-init\0" + start_state + str(self.calls).encode()).digest()
            flow.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """Python-level output and warnings of a second run go nowhere (the first run showed them)."""
    out, err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout, sys.stderr = out, err


def run_entrypoint(function: Callable[..., Any], args: tuple, kwargs: dict, enabled: bool = True) -> Any:
    """``function(*args, **kwargs)``, speculatively with deferred initialisation first when ``enabled``."""
    if not enabled or not _active.acquire(blocking=False):
        return function(*args, **kwargs)
    try:
        start = byvalue.rng_state()
        ctx = context.current()
        logged = len(ctx.weights) if ctx is not None else 0
        failed, result = False, None
        with Speculation() as speculation:
            try:
                result = function(*args, **kwargs)
            except BaseException:  # perhaps a consequence of the placeholders: the plain run decides
                failed = True
        if not failed and speculation.kept(start):
            speculation.release()
            speculation.advance(start)
            return result
        speculation.release()
        del result
        if ctx is not None and failed:
            del ctx.weights[logged:]  # the plain run reports the weights it used
        logged = len(ctx.weights) if ctx is not None else 0
        byvalue.set_rng_state(start)
    finally:
        _active.release()
    with (contextlib.nullcontext() if failed else _silenced()):
        try:
            return function(*args, **kwargs)
        finally:
            if ctx is not None and not failed:
                del ctx.weights[logged:]  # reported by the first run already
