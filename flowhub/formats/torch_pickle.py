"""The allow-list unpickler both torch formats use: a ``.pth`` read with it runs nothing from the file.

``find_class`` (the only way a pickle reaches a Python global, ``EXT`` codes included) answers for
``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``, ``torch._utils._rebuild_parameter``
(and ``_with_state``), the typed ``torch.*Storage`` names and ``_codecs.encode`` (latin-1 only: how
protocol 2 pickles ``bytes``), and refuses every other name with
:class:`~flowhub.errors.UnsafeCheckpointError` before it is called. Storages come from
``persistent_load(("storage", type, key, location, numel[, view]))``.

Unpickling builds only placeholders (:class:`PendingTensor`, which refuse ``BUILD`` state, so a pickle
cannot reach a real tensor's ``__setstate__``); the format's reader then fills in each
:class:`Storage`'s bytes and :func:`materialize` swaps the placeholders for oneflow tensors, each view
checked against its storage first.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from flowhub.errors import CheckpointFormatError, UnsafeCheckpointError
from flowhub.formats import arrays

#: ``torch.<name>`` storage classes -> element type.
STORAGES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
            "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
            "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
            "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128"}
ALLOWED = ("collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, "
           "torch._utils._rebuild_parameter_with_state, torch.<Type>Storage and _codecs.encode (for bytes)")
_WHY = {"_rebuild_tensor_v3": " (torch writes it for uint16/uint32/uint64/float8 tensors, which OneFlow 0.9 "
                              "does not have)",
        "_rebuild_qtensor": " (a quantized tensor, which OneFlow 0.9 does not have)"}


class _Sealed:
    """Refuses pickle's ``BUILD``: a file must not set attributes of what flowhub hands it."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise CheckpointFormatError("the pickle tries to set the state of a storage or tensor")


class StorageType(_Sealed):
    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class Storage(_Sealed):
    """One storage named in the pickle; the reader sets ``array`` (1-D, its element type) and, when that
    maps the file, ``file_offset``."""

    __slots__ = ("key", "dtype", "numel", "array", "file_offset")

    def __init__(self, key: str, dtype: str, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: Optional[np.ndarray] = None
        self.file_offset: Optional[int] = None


class PendingTensor(_Sealed):
    """A tensor the pickle asked for: a view of ``storage``, made real by :func:`materialize`."""

    __slots__ = ("storage", "offset", "size", "stride", "requires_grad", "parameter")

    def __init__(self, storage: Storage, offset: Any, size: Any, stride: Any, requires_grad: Any) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.requires_grad, self.parameter = bool(requires_grad), False


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                    backward_hooks: Any = None, metadata: Any = None) -> PendingTensor:
    if not isinstance(storage, Storage):
        raise CheckpointFormatError(f"a tensor is built on {type(storage).__name__}, not on a storage")
    return PendingTensor(storage, storage_offset, size, stride, requires_grad)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any = None, state: Any = None) -> PendingTensor:
    if not isinstance(data, PendingTensor):
        raise CheckpointFormatError(f"a parameter is built on {type(data).__name__}, not on a tensor")
    data.requires_grad, data.parameter = bool(requires_grad), True
    return data


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointFormatError("the pickle calls _codecs.encode other than for bytes")
    return text.encode("latin-1")


class TorchUnpickler(pickle.Unpickler):
    """Reads one torch pickle; ``storages`` collects every storage it names, by key."""

    def __init__(self, file: io.BufferedIOBase, what: str) -> None:
        super().__init__(file)
        self.what = what
        self.storages: Dict[str, Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in STORAGES:
            return StorageType(STORAGES[name])
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 pickles bytes
            return _latin1
        raise UnsafeCheckpointError(
            f"{self.what}: the pickle asks for {module}.{name}{_WHY.get(name, '')}, which flowhub does not load: "
            f"a torch checkpoint may name only {ALLOWED}. Nothing from the file was run. If you trust the file, "
            "load it with torch and save its state_dict (tensors only).")

    def persistent_load(self, pid: Any) -> Storage:
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], StorageType) and isinstance(pid[2], str)
                and type(pid[4]) is int and pid[4] >= 0):
            raise CheckpointFormatError(f"{self.what}: the pickle names an object that is not a storage "
                                        f"({pid!r:.120}). Nothing was loaded.")
        if len(pid) == 6 and pid[5] is not None:
            raise CheckpointFormatError(f"{self.what}: storage {pid[2]!r:.40} is a view of another storage (a file "
                                        "from torch before 1.0), which flowhub does not read.")
        kind, key, numel = pid[1], pid[2], pid[4]
        arrays.check_dtype(kind.dtype, f"{self.what}: storage {key!r:.40}")
        known = self.storages.get(key)
        if known is None:
            known = self.storages[key] = Storage(key, kind.dtype, numel)
        elif (known.dtype, known.numel) != (kind.dtype, numel):
            raise CheckpointFormatError(f"{self.what}: storage {key!r:.40} is named with two types or sizes.")
        return known


def unpickle(data: io.BufferedIOBase, what: str) -> Tuple[Any, Dict[str, Storage]]:
    """The object of the pickle at ``data``'s position (placeholders for its tensors) and its storages."""
    unpickler = TorchUnpickler(data, what)
    try:
        return unpickler.load(), unpickler.storages
    except CheckpointFormatError:
        raise
    except RecursionError:
        raise CheckpointFormatError(f"{what}: the pickle nests too deeply. Nothing was loaded.") from None
    except Exception as exc:  # a malformed or truncated pickle: pickle raises many kinds
        raise CheckpointFormatError(f"{what}: the pickle is not readable ({type(exc).__name__}: {exc}). "
                                    "The file is truncated or corrupt. Nothing was loaded.") from None


def plain_load(data: io.BufferedIOBase, what: str) -> Any:
    """One pickle that may name no global at all (a legacy file's header values and key list)."""
    class Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise UnsafeCheckpointError(f"{what}: the pickle asks for {module}.{name} where torch writes only "
                                        "plain values. Nothing from the file was run.")
    try:
        return Plain(data).load()
    except CheckpointFormatError:
        raise
    except Exception as exc:
        raise CheckpointFormatError(f"{what}: not readable ({type(exc).__name__}: {exc}). The file is truncated "
                                    "or corrupt. Nothing was loaded.") from None


def materialize(value: Any, what: str) -> arrays.Loaded:
    """``value`` with every placeholder replaced by a oneflow tensor (the same one wherever the pickle
    shared it), and the extents of the file those tensors map. Storages must have their arrays."""
    extents: List[arrays.Extent] = []
    done: Dict[int, Any] = {}

    def tensor(pending: PendingTensor, where: str) -> Any:
        storage = pending.storage
        array, is_view = arrays.view(storage.array, pending.offset, pending.size, pending.stride, where)
        made = arrays.to_oneflow(array, storage.dtype)
        if pending.parameter:
            import oneflow as flow  # delayed: only reading a file needs oneflow

            made = flow.nn.Parameter(made, requires_grad=pending.requires_grad)
        elif pending.requires_grad and made.is_floating_point():
            made.requires_grad_(True)
        if is_view and storage.file_offset is not None and storage.dtype != "bfloat16" and array.nbytes:
            extents.append(arrays.Extent(storage.file_offset + pending.offset * array.itemsize, array.dtype.name,
                                         tuple(array.shape), int(array.nbytes)))
        return made

    def walk(obj: Any, where: str) -> Any:
        if isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return obj
        key = id(obj)
        if key in done:
            return done[key]
        if isinstance(obj, PendingTensor):
            done[key] = tensor(obj, where)
        elif isinstance(obj, Storage):
            raise CheckpointFormatError(f"{where} is a bare storage, not a tensor; flowhub reads tensors only.")
        elif isinstance(obj, dict):  # dict or OrderedDict (and its _metadata attribute): in place
            done[key] = obj
            for k in list(obj):
                obj[k] = walk(obj[k], f"{where}[{k!r:.80}]")
            if isinstance(obj, collections.OrderedDict):
                for name, attr in vars(obj).items():
                    setattr(obj, name, walk(attr, f"{where}.{name}"))
        elif isinstance(obj, list):
            done[key] = obj
            obj[:] = [walk(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        elif isinstance(obj, (tuple, set, frozenset)):
            done[key] = type(obj)(walk(v, f"{where}[{i}]") for i, v in enumerate(obj))
        else:  # complex numbers and the like: plain values
            done[key] = obj
        return done[key]

    try:
        return arrays.Loaded(walk(value, what), extents)
    except RecursionError:
        raise CheckpointFormatError(f"{what}: the pickle nests too deeply. Nothing was loaded.") from None
