"""Values in proxy mode: a restricted JSON form, with every tensor in a sealed memfd.

Proxy mode is the path for repositories the caller does not trust, so nothing the worker sends is
ever unpickled by the caller: a reply is a JSON header (see :mod:`flowhub.worker.wire.protocol`) whose
value is one *node* of this form, plus one sealed memfd holding the raw bytes of its tensors, whose
table the caller validates with :func:`flowhub.worker.wire.transfer.unpack`::

    null, true/false, numbers (NaN, +-Infinity), strings         the value itself
    [node, ...]                                                  a list
    {"t": "tuple", "v": [node, ...]}                             a tuple (also oneflow.Size)
    {"t": "dict", "k": [node, ...], "v": [node, ...], "o": 1}    a dict (OrderedDict with "o");
                                                                 keys: scalars or tuples of scalars
    {"t": "tensor", "i": k, "c": "bfloat16"}                     a oneflow tensor: table entry k
                                                                 ("c": cast back after crossing as fp32)
    {"t": "ndarray", "i": k}                                     a numpy array: table entry k
    {"t": "bytes", "v": base64}   {"t": "device", "v": "cpu"}   {"t": "dtype", "v": "float32"}
    {"t": "slice", "v": [start, stop, step]}   {"t": "ellipsis"}
    {"t": "ref", "r": R, ...}                                    an object kept in the worker (a proxy)
    {"t": "pickle", "v": base64}                                 caller -> worker only: an argument
                                                                 the form above cannot express

Tensors cross detached, on the CPU, as copies. :class:`Encoder` turns a value into a node and a list
of arrays (its ``other`` callback decides what an object without a value form becomes: a ref in the
worker, a ref or a pickle in the caller); :class:`Decoder` checks every node strictly and rebuilds
the value (its ``ref`` callback turns ref nodes into objects).
"""
from __future__ import annotations

import base64
import collections
import pickle
import re
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from flowhub.errors import TransferError
from flowhub.worker.wire import transfer

MAX_DEPTH = 64
MAX_REPR = 1 << 16
#: base64 text of a bytes (or caller-side pickle) node: anything the message's header can hold.
MAX_BYTES_TEXT = 16 << 20
_SCALARS = (type(None), bool, int, float, str)
_DTYPES: Optional[Dict[str, Any]] = None
_DEVICE = re.compile(r"[a-z]{1,16}(:[0-9]{1,4})?\Z")


def _oneflow() -> Any:
    """oneflow if this process has imported it, else None: then no value can be a oneflow object, and
    the codec never imports it itself for values it encodes (the caller may not need oneflow at all)."""
    return sys.modules.get("oneflow")


def _import_oneflow() -> Any:
    import oneflow  # delayed: decoding a tensor, device or dtype node means this process wants oneflow

    return oneflow


def _dtype_names() -> Dict[str, Any]:
    global _DTYPES
    if _DTYPES is None:
        flow = _import_oneflow()
        _DTYPES = {repr(v).replace("oneflow.", ""): v for v in vars(flow).values() if isinstance(v, flow.dtype)}
    return _DTYPES


def _is_scalar_key(key: Any) -> bool:
    if type(key) in _SCALARS:
        return True
    return type(key) is tuple and all(type(k) in _SCALARS for k in key)


class Encoder:
    """Turns one value into a node; the arrays its tensors refer to collect in ``arrays``.

    ``other(obj)`` returns the node for an object that has no value form (and for containers that
    nest too deep, refer to themselves or have keys that are not scalars). ``tensor_check(t)`` may
    refuse a tensor (the caller refuses inputs that are part of an autograd graph).
    """

    def __init__(self, other: Callable[[Any], Any], tensor_check: Optional[Callable[[Any], None]] = None) -> None:
        self.other = other
        self.tensor_check = tensor_check
        self.arrays: List[np.ndarray] = []
        self._seen: Dict[int, dict] = {}
        self._keep: List[Any] = []  # keeps id()s stable while encoding
        self._path: set = set()

    def encode(self, value: Any, depth: int = 0) -> Any:
        kind = type(value)
        if kind in _SCALARS:
            return value
        flow = _oneflow()
        if flow is not None and isinstance(value, flow.Tensor) and not value.is_global:
            return self._tensor(value)
        if isinstance(value, np.ndarray) and value.dtype.name in transfer.DTYPES:
            return self._array(value)
        if isinstance(value, np.generic) and value.dtype.kind in "biuf":
            return value.item()
        if kind is bytes:
            return {"t": "bytes", "v": base64.b64encode(value).decode("ascii")}
        if flow is not None and isinstance(value, flow.device):
            return {"t": "device", "v": str(value)}
        if flow is not None and isinstance(value, flow.dtype):
            return {"t": "dtype", "v": repr(value).replace("oneflow.", "")}
        if kind is slice:
            parts = (value.start, value.stop, value.step)
            if all(p is None or type(p) is int for p in parts):
                return {"t": "slice", "v": list(parts)}
        if value is Ellipsis:
            return {"t": "ellipsis"}
        if kind in (list, tuple, dict, collections.OrderedDict) or (flow is not None and isinstance(value, flow.Size)):
            if depth >= MAX_DEPTH or id(value) in self._path:
                return self.other(value)
            self._path.add(id(value))
            try:
                return self._container(value, depth + 1)
            finally:
                self._path.discard(id(value))
        return self.other(value)

    def _container(self, value: Any, depth: int) -> Any:
        if type(value) is list:
            return [self.encode(v, depth) for v in value]
        if isinstance(value, tuple):
            return {"t": "tuple", "v": [self.encode(v, depth) for v in value]}
        if not all(_is_scalar_key(k) for k in value):
            return self.other(value)
        node = {"t": "dict", "k": [self.encode(k, depth) for k in value],
                "v": [self.encode(v, depth) for v in value.values()]}
        if type(value) is collections.OrderedDict:
            node["o"] = 1
        return node

    def _tensor(self, tensor: Any) -> dict:
        seen = self._seen.get(id(tensor))
        if seen is not None:
            return seen
        if self.tensor_check is not None:
            self.tensor_check(tensor)
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        node = {"t": "tensor", "i": len(self.arrays)}
        flow = _oneflow()  # imported: this is one of its tensors
        if data.dtype == flow.bfloat16:  # no numpy dtype: crosses as fp32, cast back on arrival
            node["c"] = "bfloat16"
            data = data.to(flow.float32)
        self.arrays.append(data.numpy())
        self._keep.append(tensor)
        self._seen[id(tensor)] = node
        return node

    def _array(self, array: np.ndarray) -> dict:
        seen = self._seen.get(id(array))
        if seen is None:
            seen = self._seen[id(array)] = {"t": "ndarray", "i": len(self.arrays)}
            self.arrays.append(array)
            self._keep.append(array)
        return seen


class Decoder:
    """Rebuilds a value from a node, checking every node (the node may come from a hostile worker).

    ``arrays`` are the validated arrays of the message's tensor table; ``ref(node)`` turns a ref node
    into an object; ``allow_pickle`` is set only in the worker (the caller's arguments).
    """

    def __init__(self, arrays: Sequence[np.ndarray], ref: Callable[[dict], Any], allow_pickle: bool = False,
                 copy: bool = False) -> None:
        """``copy``: the arrays view memory the peer reuses (a proxy arena): tensors and arrays are copies."""
        self.arrays = arrays
        self.ref = ref
        self.copy = copy
        self.allow_pickle = allow_pickle
        self._made: Dict[tuple, Any] = {}

    def decode(self, node: Any) -> Any:
        """The value of ``node``; anything malformed raises :class:`TransferError`."""
        try:
            return self._decode(node, 0)
        except TransferError:
            raise
        except Exception as exc:
            raise TransferError(f"malformed value ({type(exc).__name__}: {exc})") from None

    def _decode(self, node: Any, depth: int) -> Any:
        kind = type(node)
        if kind in _SCALARS:
            return node
        if depth >= MAX_DEPTH + 2:
            raise TransferError("value nested too deeply")
        if kind is list:
            return [self._decode(n, depth + 1) for n in node]
        if kind is not dict:
            raise TransferError(f"bad value node of type {kind.__name__}")
        tag = node.get("t")
        if tag == "tuple":
            return tuple(self._decode(n, depth + 1) for n in _list(node, "v"))
        if tag == "dict":
            keys, values = _list(node, "k"), _list(node, "v")
            if len(keys) != len(values):
                raise TransferError("dict node with different numbers of keys and values")
            out = collections.OrderedDict() if node.get("o") else {}
            for k, v in zip(keys, values):
                key = self._decode(k, depth + 1)
                if not _is_scalar_key(key):
                    raise TransferError(f"dict key of type {type(key).__name__} refused")
                out[key] = self._decode(v, depth + 1)
            return out
        if tag in ("tensor", "ndarray"):
            return self._array(tag, node)
        if tag == "ref":
            return self.ref(node)
        if tag == "bytes":
            return base64.b64decode(_str(node, "v", MAX_BYTES_TEXT), validate=True)
        if tag == "device":
            name = _str(node, "v", 32)
            if not _DEVICE.match(name):
                raise TransferError(f"bad device name {name!r}")
            return _import_oneflow().device(name)
        if tag == "dtype":
            name = _str(node, "v")
            if name not in _dtype_names():
                raise TransferError(f"unknown dtype {name!r:.50}")
            return _dtype_names()[name]
        if tag == "slice":
            parts = _list(node, "v")
            if len(parts) != 3 or not all(p is None or type(p) is int for p in parts):
                raise TransferError("bad slice node")
            return slice(*parts)
        if tag == "ellipsis":
            return Ellipsis
        if tag == "pickle" and self.allow_pickle:
            return pickle.loads(base64.b64decode(_str(node, "v", MAX_BYTES_TEXT)))
        raise TransferError(f"unknown value node {str(tag)!r:.50}")

    def _array(self, tag: str, node: dict) -> Any:
        index = node.get("i")
        if type(index) is not int or not 0 <= index < len(self.arrays):
            raise TransferError(f"tensor index {index!r:.20} outside the table of {len(self.arrays)}")
        cast = node.get("c")
        if cast not in (None, "bfloat16") or (cast and tag != "tensor"):
            raise TransferError(f"unknown tensor cast {cast!r:.50}")
        key = (tag, index, cast)
        made = self._made.get(key)
        if made is None:
            array = self.arrays[index]
            if tag == "ndarray":
                made = array.copy() if self.copy else array
            else:
                flow = _import_oneflow()
                made = flow.from_numpy(array)  # zero-copy on the private mapping of the memfd
                if self.copy:  # into oneflow's own (cached) memory, off the arena
                    made = made.clone()
                if cast:
                    made = made.to(flow.bfloat16)
            self._made[key] = made
        return made


def _list(node: dict, key: str) -> list:
    value = node.get(key)
    if type(value) is not list:
        raise TransferError(f"value node field {key!r} is not a list")
    return value


def _str(node: dict, key: str, limit: int = MAX_REPR) -> str:
    value = node.get(key)
    if type(value) is not str or len(value) > limit:
        raise TransferError(f"value node field {key!r} is not a string of acceptable length")
    return value


# -- the weights-only value form: tensors and plain values, nothing else -------------------------------
WEIGHTS_ONLY_ALLOWED = ("weights_only=True accepts tensors, numpy arrays and plain values (numbers, strings, "
                        "None, bytes, devices, dtypes, and lists, tuples and dicts of them)")


def refuse_object(obj: Any) -> Any:
    """``Encoder(other=...)`` for weights-only values: any object that is not plain is refused."""
    from flowhub.errors import WeightsOnlyError

    cls = type(obj)
    raise WeightsOnlyError(f"the checkpoint holds a {cls.__module__}.{cls.__qualname__}"[:300]
                           + f"; {WEIGHTS_ONLY_ALLOWED}. Load it with weights_only=False only if you trust "
                           "where it came from.")


def no_refs(node: dict) -> Any:
    """``Decoder(ref=...)`` for weights-only values: they never refer to objects kept in a worker."""
    raise TransferError("the weights-only reply refers to an object kept in the worker")


def check_plain(obj: Any) -> None:
    """Raise ``WeightsOnlyError`` unless ``obj`` is made of tensors and plain values only."""
    Encoder(other=refuse_object).encode(obj)
