"""Sending Python objects by value: a cloudpickle skeleton plus tensors out of band.

:func:`encode` pickles an object with cloudpickle (protocol 5). Every ``oneflow.Tensor`` in it is
replaced through pickle's ``persistent_id`` hook by a small reference ``("T", index)`` (oneflow 0.9
has no meta device to build empty skeletons with), and every numpy array that pickle hands out of
band joins the same list of arrays. The arrays then travel through one sealed memfd
(:mod:`flowhub.worker.wire.transfer`), and :func:`decode` re-attaches them zero-copy with
``flow.from_numpy``: parameters come back as ``nn.Parameter`` with ``requires_grad`` kept, other
tensors as tensors. A tensor object that appears twice (tied weights) comes back as one object.
bf16 tensors cross as fp32 (oneflow 0.9 cannot view their bits as a numpy dtype) and are cast back.

In a worker, :class:`ByValueModules` registers every module whose file lives inside the repository
with ``cloudpickle.register_pickle_by_value``, so the caller never imports repository code by name.
Classes and functions of ``hubconf.py`` itself are pickled by value anyway (it is not in
``sys.modules``). The same functions serve the other direction (caller arguments to the worker).

Modules of installed packages go by reference. For a repo whose requirements live in an overlay,
:func:`decode` takes that overlay's private importer: the overlay's names (pickle's globals,
cloudpickle's ``subimport``) resolve through it, and every function and module rebuilt by value gets
its builtins, so the rebuilt code's imports of overlay packages stay private to it.
"""
from __future__ import annotations

import builtins
import io
import os
import pickle
import sys
import threading
import types
from collections import ChainMap
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import cloudpickle
import numpy as np
import oneflow as flow

from flowhub.errors import TransferError

_TENSOR_TAG = "T"


def _reduce_device(device: Any) -> tuple:
    return flow.device, (str(device),)


def _reduce_module_wrapper(wrapper: Any) -> tuple:
    # oneflow.mock_torch wraps oneflow modules to stand in for torch ones; the caller gets the real
    # oneflow module, so it needs no mock_torch of its own.
    import importlib

    return importlib.import_module, (wrapper.module.__name__,)


_MODULE_SKIP = ("__builtins__", "__loader__", "__spec__", "__cached__")


def _pickled_by_value(module: types.ModuleType) -> bool:
    """What cloudpickle would send by value: modules not importable by name, or registered ones."""
    name = module.__name__
    if sys.modules.get(name) is not module:
        return True
    return any(name == r or name.startswith(r + ".") for r in cloudpickle.list_registry_pickle_by_value())


def _new_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__["__builtins__"] = builtins.__dict__
    return module


def _set_module_state(module: types.ModuleType, state: dict) -> None:
    module.__dict__.update(state)


def _reduce_module_by_value(module: types.ModuleType) -> tuple:
    # Unlike cloudpickle's own reducer, the namespace goes in the *state*, applied after the new
    # module is memoised, so packages and submodules that refer to each other do not recurse forever.
    state = {k: v for k, v in vars(module).items() if k not in _MODULE_SKIP}
    return _new_module, (module.__name__,), state, None, None, _set_module_state


def _extra_reducers() -> Dict[type, Callable[[Any], tuple]]:
    reducers: Dict[type, Callable[[Any], tuple]] = {type(flow.device("cpu")): _reduce_device}
    mock = sys.modules.get("oneflow.mock_torch")
    if mock is not None and hasattr(mock, "ModuleWrapper"):
        reducers[mock.ModuleWrapper] = _reduce_module_wrapper
    return reducers


@dataclass
class Encoded:
    """A pickled skeleton, the arrays it refers to, and per-array metadata (kind, grad, cast)."""

    blob: bytes
    arrays: List[np.ndarray]
    meta: List[dict]


class _Pickler(cloudpickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        # the C pickler reads dispatch_table when it is initialised, so set it first
        self.dispatch_table = ChainMap(_extra_reducers(), cloudpickle.Pickler.dispatch_table)
        super().__init__(file, protocol=5, buffer_callback=self._out_of_band)
        self.arrays: List[np.ndarray] = []
        self.meta: List[dict] = []
        self._seen: Dict[int, int] = {}
        self._keep: List[Any] = []  # keeps id()s stable while pickling

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.ModuleType and _pickled_by_value(obj):
            return _reduce_module_by_value(obj)
        return super().reducer_override(obj)

    def _out_of_band(self, buffer: pickle.PickleBuffer) -> bool:
        self._keep.append(buffer)
        self.arrays.append(np.frombuffer(buffer.raw(), dtype=np.uint8))
        self.meta.append({"kind": "buffer"})
        return False  # False = do not serialise in band

    def persistent_id(self, obj: Any) -> Optional[tuple]:
        if not isinstance(obj, flow.Tensor):
            return None
        index = self._seen.get(id(obj))
        if index is None:
            index = self._add_tensor(obj)
        return (_TENSOR_TAG, index)

    def _add_tensor(self, tensor: Any) -> int:
        if tensor.is_global:
            raise TransferError("global (distributed) tensors cannot be sent by value")
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        cast = None
        if data.dtype == flow.bfloat16:
            cast, data = "bfloat16", data.to(flow.float32)
        array = data.numpy()  # a view of the tensor's memory for contiguous CPU tensors
        self._keep.append(tensor)
        index = len(self.arrays)
        self._seen[id(tensor)] = index
        self.arrays.append(array)
        self.meta.append({"kind": "param" if isinstance(tensor, flow.nn.Parameter) else "tensor",
                          "grad": bool(tensor.requires_grad), "cast": cast})
        return index


def encode(obj: Any) -> Encoded:
    """Pickle ``obj`` by value; tensors and large numpy buffers are left out for the memfd."""
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    return Encoded(buf.getvalue(), pickler.arrays, pickler.meta)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, arrays: Sequence[np.ndarray], meta: Sequence[dict]) -> None:
        buffers = [memoryview(a).cast("B") for a, m in zip(arrays, meta) if m.get("kind") == "buffer"]
        super().__init__(file, buffers=buffers)
        self._arrays, self._meta = arrays, meta
        self._tensors: Dict[int, Any] = {}

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 2 and pid[0] == _TENSOR_TAG and type(pid[1]) is int
                and 0 <= pid[1] < len(self._arrays) and self._meta[pid[1]].get("kind") != "buffer"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.100}")
        index = pid[1]
        tensor = self._tensors.get(index)
        if tensor is None:
            tensor = self._tensors[index] = _make_tensor(self._arrays[index], self._meta[index])
        return tensor


def _make_tensor(array: np.ndarray, meta: dict) -> Any:
    tensor = flow.from_numpy(array)  # zero-copy: shares the mapped memory
    cast = meta.get("cast")
    if cast:
        if cast != "bfloat16":
            raise TransferError(f"unknown tensor cast {cast!r}")
        tensor = tensor.to(flow.bfloat16)
    grad = bool(meta.get("grad"))
    if meta.get("kind") == "param":
        return flow.nn.Parameter(tensor, requires_grad=grad)
    if grad:
        tensor.requires_grad_(True)
    return tensor


class _OverlayUnpickler(_Unpickler):
    """For a reply of a repo with an overlay: the overlay's names resolve through its private importer,
    and rebuilt code (functions, by-value modules) gets the importer's builtins (its ``__import__``)."""

    def __init__(self, file: io.BytesIO, arrays: Sequence[np.ndarray], meta: Sequence[dict], importer: Any) -> None:
        super().__init__(file, arrays, meta)
        self._importer = importer
        self._private = {("cloudpickle.cloudpickle", "subimport"): importer.subimport,
                         ("cloudpickle.cloudpickle", "_make_function"): self._make_function,
                         ("cloudpickle.cloudpickle", "_function_setstate"): self._function_setstate,
                         (__name__, "_new_module"): self._new_module}

    def find_class(self, module: str, name: str) -> Any:
        private = self._private.get((module, name))
        if private is not None:
            return private
        if not self._importer.provides(module):
            return super().find_class(module, name)
        obj: Any = self._importer.load_for_result(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def _make_function(self, code: types.CodeType, globals: dict, name: Optional[str], argdefs: Any,
                       closure: Any) -> types.FunctionType:
        # cloudpickle's own _make_function sets the real builtins, and a function takes its builtins
        # when it is made: so it is made here, as cloudpickle 3.1 does, with the importer's
        globals["__builtins__"] = self._importer.builtins
        return types.FunctionType(code, globals, name, argdefs, closure)

    def _function_setstate(self, obj: types.FunctionType, state: Any) -> None:
        cloudpickle.cloudpickle._function_setstate(obj, state)
        obj.__globals__["__builtins__"] = self._importer.builtins

    def _new_module(self, name: str) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__dict__["__builtins__"] = self._importer.builtins
        return module


def decode(blob: bytes, arrays: Sequence[np.ndarray], meta: Sequence[dict], importer: Optional[Any] = None) -> Any:
    """Rebuild the object :func:`encode` pickled, re-attaching ``arrays`` (already validated).

    ``importer`` (a reply of a repo with a requirement overlay): the overlay's private importer
    (:class:`flowhub.cache.overlay_imports.PrivateImporter`: ``provides``, ``load_for_result``,
    ``subimport``, ``builtins``), through which the overlay's modules are found."""
    if len(arrays) != len(meta):
        raise TransferError("tensor table and metadata disagree")
    if importer is None:
        return _Unpickler(io.BytesIO(blob), arrays, meta).load()
    return _OverlayUnpickler(io.BytesIO(blob), arrays, meta, importer).load()


_first_use = threading.Lock()
_ready = False


def _oneflow_ready() -> None:
    """Make oneflow's first call from one thread at a time: oneflow 0.9 deadlocks when two threads
    make their first call into it at once (seen with ``Hub.compare``'s two loads)."""
    global _ready
    if not _ready:
        with _first_use:
            if not _ready:
                flow.get_rng_state()
                _ready = True


def rng_state() -> bytes:
    """oneflow's default (CPU) generator state. It travels with each call, so that
    ``flow.manual_seed(0); hub.load(...)`` initialises a model exactly as it would in-process, and
    comes back so the caller's generator moves on instead of repeating what the load drew.

    oneflow 0.9's ``set_rng_state`` only restores a *freshly seeded* generator exactly; a state taken
    after draws comes back as some other (deterministic) state. So a load right after
    ``manual_seed`` matches in-process bit for bit, later draws are reproducible but differ."""
    _oneflow_ready()
    return flow.get_rng_state().numpy().tobytes()


def set_rng_state(state: bytes) -> None:
    flow.set_rng_state(flow.tensor(np.frombuffer(state, dtype=np.uint8).copy()))


class ByValueModules:
    """Registers every imported module whose file lies inside ``repo_dir`` to be pickled by value.

    Modules named in ``ignore`` (in a worker: everything the zygote had imported, which never
    includes repository code) are not examined, and a rescan happens only when ``sys.modules``
    has grown, so the check costs almost nothing per call.
    """

    def __init__(self, repo_dir: str, ignore: Iterable[str] = ()) -> None:
        self.root = os.path.realpath(repo_dir) + os.sep
        self._ignore = set(ignore)
        self._scanned = 0
        self.names: set = set()

    def contains_file(self, path: Optional[str]) -> bool:
        return bool(path) and os.path.realpath(path).startswith(self.root)  # type: ignore[arg-type]

    def is_repo_module(self, module: Any) -> bool:
        if self.contains_file(getattr(module, "__file__", None)):
            return True
        paths = getattr(module, "__path__", None)  # namespace packages have no __file__
        try:
            return bool(paths) and all(self.contains_file(p) for p in list(paths))
        except TypeError:
            return False

    def refresh(self) -> None:
        if len(sys.modules) == self._scanned:
            return
        for name, module in list(sys.modules.items()):
            if name in self._ignore or module is None:
                continue
            self._ignore.add(name)  # each module is examined once
            if self.is_repo_module(module):
                try:
                    cloudpickle.register_pickle_by_value(module)
                    self.names.add(name)
                except ValueError:
                    pass  # registered under another name: pickled by value anyway
        self._scanned = len(sys.modules)
