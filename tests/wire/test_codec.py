"""flowhub.worker.wire.codec: proxy mode's restricted JSON values (plain values and numpy arrays only).

``codec`` imports oneflow at module level (it needs ``flow.Tensor``/``flow.device``/``flow.dtype``), so
it is imported here lazily, by the ``codec`` fixture: these tests skip where oneflow is missing, and no
test here builds a oneflow tensor (only numpy arrays, plain values and refusals of malformed nodes).
The last two tests check, in a fresh interpreter, which wire modules import without oneflow.
"""
from __future__ import annotations

import base64
import collections
import json
import math
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flowhub.errors import TransferError
from flowhub.worker.wire import protocol, transfer

ROOT = Path(__file__).resolve().parents[2]

_PROBE = r"""
import json, sys
out = {}
import flowhub.worker.wire.protocol, flowhub.worker.wire.transfer
out["file"] = flowhub.__file__
out["after_protocol_transfer"] = "oneflow" in sys.modules
try:
    import flowhub.worker.wire.codec
except Exception as exc:
    out["codec_error"] = repr(exc)
out["after_codec"] = "oneflow" in sys.modules
print(json.dumps(out))
"""


@pytest.fixture(scope="module", autouse=True)
def _probe_process():
    """A fresh interpreter (cwd=/) importing protocol and transfer, then codec; started when this module's
    tests start so that it runs alongside them, read by the last two tests."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen([sys.executable, "-c", _PROBE], cwd="/", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def import_probe(_probe_process):
    out, err = _probe_process.communicate(timeout=120)
    assert _probe_process.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert Path(result["file"]).resolve() == ROOT / "flowhub" / "__init__.py", "the probe imported another flowhub"
    return result


# -- helpers -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def codec():
    pytest.importorskip("oneflow")
    from flowhub.worker.wire import codec
    return codec


class Others:
    """An ``other`` callback that records what it was given and turns it into a ref node."""

    def __init__(self):
        self.seen = []

    def __call__(self, obj):
        self.seen.append(obj)
        return {"t": "ref", "r": len(self.seen)}


class Refs:
    """A ``ref`` callback that gives back what ``Others`` was given."""

    def __init__(self, others=None):
        self.others, self.nodes = others, []

    def __call__(self, node):
        self.nodes.append(node)
        return self.others.seen[node["r"] - 1] if self.others else ("ref", node.get("r"))


def encode(codec, value, other=None):
    enc = codec.Encoder(other or Others())
    node = enc.encode(value)
    return json.loads(json.dumps(node)), enc.arrays  # the node must be plain JSON


def cross(codec, value, other=None):
    """Encoder -> JSON -> pack -> unpack -> Decoder, as proxy mode does it."""
    other = other or Others()
    node, arrays = encode(codec, value, other)
    packed = transfer.pack(arrays)
    received = transfer.unpack(packed.fd, packed.size, packed.table)
    return codec.Decoder(received, Refs(other)).decode(node)


def same(a, b):
    """Equal values of the same types, all the way down (NaN equals NaN; arrays by value and dtype)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for x, y in zip(a.values(), b.values()):
            same(x, y)
    else:
        assert a == b


# -- round trips of plain values -----------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, True, False, 0, -1, 2 ** 80, -(2 ** 70), 1.5, -0.0, float("nan"),
                                   float("inf"), float("-inf"), "", "ünïcödé ✓", "x" * 100_000],
                         ids=lambda v: repr(v)[:12])
def test_scalars_are_themselves(codec, value):
    node, arrays = encode(codec, value)
    assert arrays == []
    same(node, value)
    same(cross(codec, value), value)


def test_containers(codec):
    value = {
        "list": [1, [2, [3, []]], ()],
        "tuple": (1, ("a", None), []),
        "dict": {7: "int", 2.5: "float", True: "bool", None: "none", "s": "str", (1, "a", None): "tuple"},
        "ordered": collections.OrderedDict([("z", 1), ("a", 2), ("m", 3)]),
        "empty": [{}, (), [], collections.OrderedDict()],
        "bytes": [b"", b"\x00\xffbinary"],
        "slices": [slice(None), slice(1, None, -2), slice(-3, 10, 1)],
        "ellipsis": ...,
    }
    out = cross(codec, value)
    same(out, value)
    assert type(out["ordered"]) is collections.OrderedDict and list(out["ordered"]) == ["z", "a", "m"]
    assert type(out["dict"]) is dict


def test_node_shapes(codec):
    """The documented node forms."""
    node, _ = encode(codec, [(1,), {"a": 1}, collections.OrderedDict(b=2), b"hi", slice(1, 2), ..., [None]])
    assert node == [
        {"t": "tuple", "v": [1]},
        {"t": "dict", "k": ["a"], "v": [1]},
        {"t": "dict", "k": ["b"], "v": [2], "o": 1},
        {"t": "bytes", "v": base64.b64encode(b"hi").decode()},
        {"t": "slice", "v": [1, 2, None]},
        {"t": "ellipsis"},
        [None],
    ]


@pytest.mark.parametrize("scalar,expected", [
    (np.int64(-3), -3), (np.uint8(200), 200), (np.float32(1.5), 1.5), (np.float64(0.25), 0.25),
    (np.float16(2.0), 2.0), (np.bool_(True), True), (np.int8(-1), -1),
], ids=lambda v: type(v).__name__)
def test_numpy_scalars_become_python_numbers(codec, scalar, expected):
    node, arrays = encode(codec, scalar)
    assert arrays == [] and node == expected and type(node) is type(expected)


# -- numpy arrays --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(transfer.DTYPES))
def test_arrays_of_every_dtype(codec, dtype):
    arrays = [np.arange(6).astype(dtype).reshape(2, 3), np.zeros((), dtype), np.zeros((0, 4), dtype),
              np.arange(10).astype(dtype)[::3]]
    out = cross(codec, {"a": arrays, "t": tuple(arrays)})
    for got in (out["a"], out["t"]):
        for g, want in zip(got, arrays):
            same(g, want)


def test_array_nodes_refer_to_the_table(codec):
    a, b = np.arange(3), np.ones(2, np.float32)
    node, arrays = encode(codec, [a, b, (a,), {"k": b}])
    assert node == [{"t": "ndarray", "i": 0}, {"t": "ndarray", "i": 1}, {"t": "tuple", "v": [{"t": "ndarray", "i": 0}]},
                    {"t": "dict", "k": ["k"], "v": [{"t": "ndarray", "i": 1}]}]
    assert arrays[0] is a and arrays[1] is b, "the encoder does not copy"


def test_one_array_twice_stays_one_array(codec):
    a = np.arange(4, dtype=np.int32)
    out = cross(codec, [a, a, a.copy()])
    assert out[0] is out[1], "the same array, decoded once"
    assert out[2] is not out[0]
    out[0][0] = 99
    assert out[1][0] == 99 and out[2][0] == 0


def test_decoded_arrays_are_the_zero_copy_views(codec):
    packed = transfer.pack([np.arange(8, dtype=np.float64)])
    arrays = transfer.unpack(packed.fd, packed.size, packed.table)
    out = codec.Decoder(arrays, Refs()).decode({"t": "dict", "k": ["w"], "v": [{"t": "ndarray", "i": 0}]})
    assert out["w"] is arrays[0]
    assert out["w"].flags.writeable


def test_arrays_over_the_socket(codec):
    """The whole proxy-mode path for a value: encode, pack, send (memfd as SCM_RIGHTS), receive, decode."""
    value = {"weights": [np.random.default_rng(1).standard_normal((256, 1024)).astype(np.float32)],
             "meta": ("v1", 3, None), "mask": np.array([True, False])}
    other = Others()
    enc = codec.Encoder(other)
    node = enc.encode(value)
    packed = transfer.pack(enc.arrays)
    a, b = socket.socketpair()
    try:
        protocol.send_message(a, {"ok": True, "value": node, "size": packed.size, "table": packed.table},
                              fds=[packed.fd])
        packed.close()
        header, _, fds = protocol.recv_message(b, None)
        arrays = transfer.unpack(fds[0], header["size"], header["table"])
        out = codec.Decoder(arrays, Refs(other)).decode(header["value"])
    finally:
        a.close()
        b.close()
    same(out, value)
    assert other.seen == []


# -- what the encoder hands to ``other`` ---------------------------------------------------------------
class _Point(tuple):
    pass


@pytest.mark.parametrize("make", [
    object, set, frozenset, lambda: 1 + 2j, lambda: np.complex64(1j), lambda: np.str_("s"),
    lambda: np.datetime64("2024-01-01"), lambda: np.array([object()], dtype=object),
    lambda: np.zeros(2, dtype="datetime64[s]"), lambda: np.zeros(2, dtype=[("a", "i4")]),
    lambda: bytearray(b"x"), lambda: slice(1.5), lambda: slice("a", "b"), lambda: _Point((1, 2)),
    lambda: collections.defaultdict(int), lambda: type("L", (list,), {})(), lambda: range(3),
    lambda: collections.namedtuple("NT", "x")(1),
], ids=["object", "set", "frozenset", "complex", "np.complex64", "np.str_", "np.datetime64", "object-array",
        "datetime-array", "structured-array", "bytearray", "float-slice", "str-slice", "tuple-subclass",
        "defaultdict", "list-subclass", "range", "namedtuple"])
def test_values_without_a_form_go_to_other(codec, make):
    value = make()
    other = Others()
    node, arrays = encode(codec, [value], other)
    assert node == [{"t": "ref", "r": 1}]
    assert len(other.seen) == 1 and other.seen[0] is value
    assert arrays == []


@pytest.mark.parametrize("key", [frozenset({1}), (1, (2,)), b"bytes", np.int64(1), 1j],
                         ids=["frozenset", "nested-tuple", "bytes", "np.int64", "complex"])
def test_dicts_with_non_scalar_keys_go_to_other_whole(codec, key):
    value = {"ok": 1, key: 2}
    other = Others()
    node, _ = encode(codec, {"outer": value}, other)
    assert node == {"t": "dict", "k": ["outer"], "v": [{"t": "ref", "r": 1}]}
    assert other.seen == [value]


def test_depth_limit(codec):
    depth = codec.MAX_DEPTH
    value = leaf = []
    for _ in range(depth + 5):
        leaf.append([])
        leaf = leaf[0]
    other = Others()
    node, _ = encode(codec, value, other)
    inline = 0
    while node != {"t": "ref", "r": 1}:
        node = node[0]
        inline += 1
    assert inline == depth, "MAX_DEPTH containers inline, the next one handed to other"
    assert len(other.seen) == 1
    same(cross(codec, value), value)  # and it decodes (the ref comes back as the same object)


@pytest.mark.parametrize("kind", ["list", "dict", "tuple-in-list"])
def test_cycles_go_to_other(codec, kind):
    if kind == "list":
        value = [1]
        value.append(value)
    elif kind == "dict":
        value = {"a": 1}
        value["self"] = value
    else:
        value = [0]
        value.append((value,))
    other = Others()
    node, _ = encode(codec, value, other)
    assert other.seen == [value] and other.seen[0] is value
    assert json.dumps(node)


def test_shared_substructure_is_not_a_cycle(codec):
    shared = [1, 2]
    other = Others()
    node, _ = encode(codec, [shared, (shared, shared)], other)
    assert other.seen == []
    assert node == [[1, 2], {"t": "tuple", "v": [[1, 2], [1, 2]]}]


# -- refusals of malformed nodes -----------------------------------------------------------------------
def _nest(n):
    node = 0
    for _ in range(n):
        node = [node]
    return node


REFUSED = [
    ({"t": "nope"}, "unknown value node 'nope'"),
    ({}, "unknown value node 'None'"),
    ({"v": [1]}, "unknown value node 'None'"),
    ({"t": 5}, "unknown value node '5'"),
    ({"t": ["tuple"]}, "unknown value node"),
    ({"t": "pickle", "v": base64.b64encode(pickle.dumps(1)).decode()}, "unknown value node 'pickle'"),
    ({"t": "tuple"}, "value node field 'v' is not a list"),
    ({"t": "tuple", "v": "abc"}, "value node field 'v' is not a list"),
    ({"t": "tuple", "v": {"a": 1}}, "value node field 'v' is not a list"),
    ({"t": "dict", "k": [1], "v": []}, "dict node with different numbers of keys and values"),
    ({"t": "dict", "k": {"a": 1}, "v": [1]}, "value node field 'k' is not a list"),
    ({"t": "dict", "k": [1], "v": None}, "value node field 'v' is not a list"),
    ({"t": "dict", "k": [[1]], "v": [2]}, "dict key of type list refused"),
    ({"t": "dict", "k": [{"t": "tuple", "v": [[1]]}], "v": [2]}, "dict key of type tuple refused"),
    ({"t": "dict", "k": [{"t": "dict", "k": [], "v": []}], "v": [2]}, "dict key of type dict refused"),
    ({"t": "dict", "k": [{"t": "bytes", "v": ""}], "v": [2]}, "dict key of type bytes refused"),
    ({"t": "dict", "k": [{"t": "ndarray", "i": 0}], "v": [2]}, "dict key of type ndarray refused"),
    ({"t": "ndarray", "i": 1}, "tensor index 1 outside the table of 1"),
    ({"t": "ndarray", "i": -1}, "tensor index -1 outside the table of 1"),
    ({"t": "ndarray", "i": True}, "tensor index True outside the table of 1"),
    ({"t": "ndarray", "i": 0.0}, "tensor index 0.0 outside the table of 1"),
    ({"t": "ndarray", "i": "0"}, "tensor index '0' outside the table of 1"),
    ({"t": "ndarray"}, "tensor index None outside the table of 1"),
    ({"t": "tensor", "i": 7}, "tensor index 7 outside the table of 1"),
    ({"t": "ndarray", "i": 0, "c": "bfloat16"}, "unknown tensor cast 'bfloat16'"),
    ({"t": "ndarray", "i": 0, "c": "float8"}, "unknown tensor cast 'float8'"),
    ({"t": "tensor", "i": 0, "c": "int4"}, "unknown tensor cast 'int4'"),
    ({"t": "tensor", "i": 0, "c": ["bfloat16"]}, "unknown tensor cast"),
    ({"t": "bytes", "v": "!!!"}, "malformed value (Error: "),
    ({"t": "bytes", "v": "QUJD\nRA=="}, "malformed value (Error: "),
    ({"t": "bytes", "v": 123}, "value node field 'v' is not a string of acceptable length"),
    ({"t": "bytes"}, "value node field 'v' is not a string of acceptable length"),
    ({"t": "bytes", "v": "A" * ((16 << 20) + 4)}, "value node field 'v' is not a string of acceptable length"),
    ({"t": "slice", "v": [1, 2]}, "bad slice node"),
    ({"t": "slice", "v": [1, 2, 3, 4]}, "bad slice node"),
    ({"t": "slice", "v": [1.0, 2, 3]}, "bad slice node"),
    ({"t": "slice", "v": [True, 2, 3]}, "bad slice node"),
    ({"t": "slice", "v": ["a", None, None]}, "bad slice node"),
    ({"t": "slice", "v": "1:2"}, "value node field 'v' is not a list"),
    ({"t": "device", "v": "CPU"}, "bad device name 'CPU'"),
    ({"t": "device", "v": "cuda:0; rm -rf"}, "bad device name"),
    ({"t": "device", "v": "cuda:12345"}, "bad device name"),
    ({"t": "device", "v": "cuda:"}, "bad device name"),
    ({"t": "device", "v": "cpu\n"}, "bad device name"),
    ({"t": "device", "v": ""}, "bad device name"),
    ({"t": "device", "v": "a" * 33}, "value node field 'v' is not a string of acceptable length"),
    ({"t": "device", "v": 0}, "value node field 'v' is not a string of acceptable length"),
    ({"t": "dtype", "v": "float128"}, "unknown dtype 'float128'"),
    ({"t": "dtype", "v": "oneflow.float32"}, "unknown dtype"),
    ({"t": "dtype", "v": None}, "value node field 'v' is not a string of acceptable length"),
    (_nest(64 + 3), "value nested too deeply"),  # MAX_DEPTH + 3 lists
    ({"t": "tuple", "v": [{"t": "tuple", "v": [_nest(70)]}]}, "value nested too deeply"),
    ({1, 2}, "bad value node of type set"),
    ((1, 2), "bad value node of type tuple"),
    (b"raw", "bad value node of type bytes"),
    (object(), "bad value node of type object"),
]


@pytest.mark.parametrize("node,message", REFUSED, ids=[f"{i}-{m[:30]}" for i, (_, m) in enumerate(REFUSED)])
def test_decoder_refuses(codec, node, message):
    refs = Refs()
    with pytest.raises(TransferError) as info:
        codec.Decoder([np.zeros(2)], refs).decode(node)
    assert message in str(info.value)
    assert refs.nodes == []


def test_refusals_deep_inside_a_value(codec):
    node = {"t": "dict", "k": ["a"], "v": [[1, {"t": "tuple", "v": [{"t": "slice", "v": [1]}]}]]}
    with pytest.raises(TransferError, match="bad slice node"):
        codec.Decoder([], Refs()).decode(node)


def test_depth_limit_of_the_decoder(codec):
    assert codec.MAX_DEPTH == 64  # as REFUSED assumes
    ok = _nest(codec.MAX_DEPTH + 2)  # lists at depths 0..MAX_DEPTH+1
    assert codec.Decoder([], Refs()).decode(ok) == ok
    with pytest.raises(TransferError, match="value nested too deeply"):
        codec.Decoder([], Refs()).decode(_nest(codec.MAX_DEPTH + 3))


def test_pickle_only_where_allowed(codec):
    blob = base64.b64encode(pickle.dumps({"a": (1, 2)})).decode()
    assert codec.Decoder([], Refs(), allow_pickle=True).decode({"t": "pickle", "v": blob}) == {"a": (1, 2)}
    with pytest.raises(TransferError, match="unknown value node 'pickle'"):
        codec.Decoder([], Refs()).decode({"t": "pickle", "v": blob})


def test_refs_go_to_the_callback(codec):
    refs = Refs()
    node = [{"t": "ref", "r": 3, "x": "extra"}, {"t": "tuple", "v": [{"t": "ref", "r": 4}]}]
    out = codec.Decoder([], refs).decode(node)
    assert out == [("ref", 3), (("ref", 4),)]
    assert refs.nodes == [{"t": "ref", "r": 3, "x": "extra"}, {"t": "ref", "r": 4}]


def test_errors_of_callbacks(codec):
    def bad_ref(node):
        raise KeyError(node["r"])

    with pytest.raises(TransferError, match=r"malformed value \(KeyError: 9\)"):
        codec.Decoder([], bad_ref).decode({"t": "ref", "r": 9})

    def refusing_ref(node):
        raise TransferError("no such object")

    with pytest.raises(TransferError, match="^no such object$"):
        codec.Decoder([], refusing_ref).decode([{"t": "ref", "r": 1}])


def test_decode_leaves_the_node_unchanged(codec):
    node = {"t": "dict", "k": ["a"], "v": [[1, 2]]}
    before = json.dumps(node)
    codec.Decoder([], Refs()).decode(node)
    assert json.dumps(node) == before


def test_encoder_output_always_decodes(codec):
    value = os.urandom(64 << 10)
    same(cross(codec, value), value)


# -- weights-only helpers ------------------------------------------------------------------------------
def test_check_plain_accepts_plain_values_and_arrays(codec):
    codec.check_plain({"state": collections.OrderedDict(w=np.zeros((2, 2), np.float32)), "epoch": 3,
                       "opt": [(1e-3, None, b"x", slice(1), ...)], "tags": {("a", 1): "b"}})


@pytest.mark.parametrize("value,held", [
    (object(), "builtins.object"), ([1, {"a": {1, 2}}], "builtins.set"),
    (np.array([None], dtype=object), "numpy.ndarray"), ((1j,), "builtins.complex"),
], ids=["object", "set", "object-array", "complex"])
def test_check_plain_refuses_objects(codec, value, held):
    from flowhub.errors import WeightsOnlyError

    with pytest.raises(WeightsOnlyError, match="weights_only=True accepts tensors") as info:
        codec.check_plain(value)
    assert f"the checkpoint holds a {held};" in str(info.value)


def test_no_refs(codec):
    with pytest.raises(TransferError, match="refers to an object kept in the worker"):
        codec.Decoder([], codec.no_refs).decode([1, {"t": "ref", "r": 1}])


# -- which wire modules need oneflow (fresh interpreters) -----------------------------------------------
def test_protocol_and_transfer_import_without_oneflow(import_probe):
    assert import_probe["after_protocol_transfer"] is False


def test_wire_modules_import_without_oneflow(import_probe):
    assert "codec_error" not in import_probe
    assert import_probe["after_codec"] is False
