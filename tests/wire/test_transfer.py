"""flowhub.worker.wire.transfer: arrays through one sealed memfd (no oneflow: numpy and real memfds)."""
from __future__ import annotations

import fcntl
import os
import re

import numpy as np
import pytest

from flowhub.errors import TransferError
from flowhub.worker.wire import transfer
from flowhub.worker.wire.transfer import ALIGN, DTYPES, REQUIRED_SEALS

PAGE = os.sysconf("SC_PAGE_SIZE")
ALL_SEALS = REQUIRED_SEALS | fcntl.F_SEAL_SEAL


# -- helpers -------------------------------------------------------------------------------------------
def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def mapping_of(address: int):
    """``(start, end, perms, path)`` of the mapping of this process holding ``address`` (or None)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= address < end:
                return start, end, parts[1], parts[5].strip() if len(parts) > 5 else ""
    return None


def mappings_named(name: str) -> list:
    with open("/proc/self/maps") as f:
        return [line for line in f if f"/memfd:{name} " in line]


def is_closed(fd: int, ino: int) -> bool:
    """``fd`` no longer refers to the file with inode ``ino`` (closed, or its number reused since)."""
    try:
        return os.fstat(fd).st_ino != ino
    except OSError:
        return True


def memfd(size: int, seals: int = REQUIRED_SEALS, content: bytes = b"", sealable: bool = True) -> int:
    fd = os.memfd_create("wire-test", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    if content:
        os.write(fd, content)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def entry(dtype="uint8", shape=(8,), offset=0, nbytes=None):
    shape = list(shape)
    if nbytes is None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return {"dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes}


def cross(arrays, **kwargs):
    packed = transfer.pack(arrays)
    return packed, transfer.unpack(packed.fd, packed.size, packed.table, **kwargs)


def sample(dtype: str, shape) -> np.ndarray:
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.arange(1, n + 1)
    if dtype == "bool":
        out = raw % 3 == 0
    elif dtype.startswith("complex"):
        out = (raw + 1j * -raw).astype(dtype)
    else:
        out = (raw * (-1 if dtype[0] in "if" else 1)).astype(dtype)
    return out.reshape(shape)


# -- pack / unpack round trips -------------------------------------------------------------------------
SHAPES = [(), (0,), (7,), (3, 5), (2, 0, 3), (2, 3, 4, 1), (1,)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip_every_dtype_and_shape(dtype):
    """0-d, empty, 1-d..4-d arrays of one dtype, each alone and all in one payload."""
    arrays = [sample(dtype, shape) for shape in SHAPES]
    outs = [cross([arr])[1][0] for arr in arrays] + cross(arrays)[1]
    for out, arr in zip(outs, arrays + arrays):
        assert out.dtype == np.dtype(dtype) and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)


def test_mixed_arrays_aligned_without_overlaps():
    arrays = [sample(name, (n,)) for name, n in
              [("uint8", 3), ("float64", 5), ("bool", 1), ("int16", 0), ("complex128", 2), ("float16", 33)]]
    packed = transfer.pack(arrays)
    try:
        offsets = [e["offset"] for e in packed.table]
        assert all(off % ALIGN == 0 for off in offsets)
        ends = [e["offset"] + e["nbytes"] for e in packed.table]
        assert all(end <= nxt for end, nxt in zip(ends, offsets[1:]))
        assert packed.size == ends[-1] == os.fstat(packed.fd).st_size
        assert [e["nbytes"] for e in packed.table] == [a.nbytes for a in arrays]
        assert [e["shape"] for e in packed.table] == [list(a.shape) for a in arrays]
        assert [e["dtype"] for e in packed.table] == [a.dtype.name for a in arrays]
        assert transfer.validate(packed.table, packed.size)  # the sender's table passes its own checks
        out = transfer.unpack(packed.fd, packed.size, packed.table)
        packed.fd = None
        for got, want in zip(out, arrays):
            np.testing.assert_array_equal(got, want)
    finally:
        packed.close()


def test_non_contiguous_inputs():
    base = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    inputs = [base[:, ::2, 1:], base.T, np.asfortranarray(base), base[..., 0], base[1, 2, 3:4][0:1].reshape(())]
    assert not any(a.flags.c_contiguous for a in inputs[:3])
    _, out = cross(inputs)
    for got, want in zip(out, inputs):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.flags.c_contiguous


def test_zero_d_stays_zero_d():
    _, out = cross([np.array(3.5), np.array(True), np.full((), 2, np.int16)])
    assert [o.shape for o in out] == [(), (), ()]
    assert [o.item() for o in out] == [3.5, True, 2.0]


def test_large_arrays_over_a_mebibyte():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((3, 1 << 19)).astype(np.float32)  # 6 MiB
    small = np.arange(10, dtype=np.int64)
    packed, out = cross([small, big, small[::-1]])
    np.testing.assert_array_equal(out[1], big)
    np.testing.assert_array_equal(out[0], small)
    np.testing.assert_array_equal(out[2], small[::-1])


def test_only_empty_arrays_need_no_memfd():
    packed = transfer.pack([np.zeros((0, 3), np.float64), np.zeros(0, np.bool_)])
    assert packed.fd is None and packed.size == 0
    assert [e["offset"] for e in packed.table] == [0, 0]
    packed.close()  # nothing to close
    out = transfer.unpack(None, 0, packed.table)
    assert [(o.shape, o.dtype) for o in out] == [((0, 3), np.float64), ((0,), np.bool_)]


def test_nothing_at_all():
    packed = transfer.pack([])
    assert (packed.fd, packed.size, packed.table) == (None, 0, [])
    assert transfer.unpack(None, 0, []) == []


def test_packed_memfd_is_sealed_closeexec_and_exactly_sized():
    packed = transfer.pack([np.arange(100, dtype=np.int32)])
    try:
        assert fcntl.fcntl(packed.fd, fcntl.F_GET_SEALS) == ALL_SEALS
        assert fcntl.fcntl(packed.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.fstat(packed.fd).st_size == packed.size == 400
        with pytest.raises(PermissionError):
            os.pwrite(packed.fd, b"x", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(packed.fd, 800)
        assert np.frombuffer(os.pread(packed.fd, 400, 0), np.int32).tolist() == list(range(100))
    finally:
        packed.close()
    assert packed.fd is None
    packed.close()  # idempotent


def test_sender_never_maps_the_memfd():
    packed = transfer.pack([np.ones(1 << 16, np.uint8)], name="wire-sender-never-maps")
    try:
        assert mappings_named("wire-sender-never-maps") == []
    finally:
        packed.close()


@pytest.mark.parametrize("arr", [
    np.array([object()], dtype=object),
    np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]),
    np.array(["2024-01-01"], dtype="datetime64[D]"),
    np.array([1], dtype="timedelta64[s]"),
    np.array(["text"]),
    np.array([b"bytes"]),
    np.zeros(2, dtype=np.longdouble),
    np.zeros(2, dtype=np.clongdouble),
], ids=["object", "structured", "datetime", "timedelta", "str", "bytes", "longdouble", "clongdouble"])
def test_pack_refuses_dtypes_outside_the_allow_list(arr):
    with pytest.raises(TransferError, match=re.escape(f"arrays of dtype {arr.dtype} cannot be transferred")):
        transfer.pack([np.arange(3, dtype=np.uint8), arr])


@pytest.mark.parametrize("dtype", [">i4", ">f8"])
def test_big_endian_arrays_keep_their_values(dtype):
    arr = np.arange(3, dtype=dtype)
    _, (out,) = cross([arr])
    np.testing.assert_array_equal(out, arr)


# -- zero copy, MAP_PRIVATE, lifetime ------------------------------------------------------------------
def test_views_lie_in_one_private_writable_mapping_of_the_memfd():
    arrays = [np.arange(1000, dtype=np.float64), np.arange(50, dtype=np.int8), np.ones((4, 4), np.complex64)]
    packed = transfer.pack(arrays, name="wire-zero-copy")
    size = packed.size
    out = transfer.unpack(packed.fd, size, packed.table)
    regions = {mapping_of(o.ctypes.data) for o in out}
    assert len(regions) == 1, "every view lies in the same mapping"
    start, end, perms, path = regions.pop()
    assert path == "/memfd:wire-zero-copy (deleted)"
    assert perms == "rw-p", "MAP_PRIVATE, readable and writable"
    for o, e in zip(out, packed.table):
        assert start <= o.ctypes.data and o.ctypes.data + o.nbytes <= end
        assert o.ctypes.data - out[0].ctypes.data == e["offset"]  # no copy: at the table's offsets
        assert o.flags.writeable and not o.flags.owndata


def test_writes_stay_private():
    """Writing into a received array changes neither the memfd nor another receiver's copy."""
    packed = transfer.pack([np.arange(16, dtype=np.int32)])
    keep = os.dup(packed.fd)
    try:
        (mine,) = transfer.unpack(packed.fd, packed.size, packed.table)
        mine[:] = -7
        mine += 1
        assert mine.tolist() == [-6] * 16
        assert np.frombuffer(os.pread(keep, 64, 0), np.int32).tolist() == list(range(16))
        (other,) = transfer.unpack(os.dup(keep), packed.size, packed.table)
        assert other.tolist() == list(range(16))
    finally:
        os.close(keep)


def test_mapping_lives_as_long_as_a_view_and_no_longer():
    packed = transfer.pack([np.arange(4096, dtype=np.uint8), np.arange(8, dtype=np.float32)], name="wire-lifetime")
    first, second = transfer.unpack(packed.fd, packed.size, packed.table)
    assert len(mappings_named("wire-lifetime")) == 1
    derived = second[2:5]
    del first, second
    assert len(mappings_named("wire-lifetime")) == 1, "a view derived from a result keeps the mapping"
    assert derived.tolist() == [2.0, 3.0, 4.0]
    del derived
    assert mappings_named("wire-lifetime") == [], "unmapped once the last view is gone"


def test_fd_closed_after_success():
    packed = transfer.pack([np.ones(10)])
    fd, ino = packed.fd, os.fstat(packed.fd).st_ino
    transfer.unpack(fd, packed.size, packed.table)
    assert is_closed(fd, ino)


@pytest.mark.parametrize("case", ["bad-table", "bad-size", "unsealed", "size-zero-but-bytes"])
def test_fd_closed_after_every_refusal(case):
    if case == "unsealed":
        fd, size, table = memfd(8, seals=0), 8, [entry()]
    else:
        packed = transfer.pack([np.arange(8, dtype=np.uint8)])
        fd, size, table = packed.fd, packed.size, packed.table
        if case == "bad-table":
            table = [entry(dtype="object")]
        elif case == "bad-size":
            size = 16
            table = [entry(shape=(16,))]
        elif case == "size-zero-but-bytes":
            size, table = 0, []
    ino = os.fstat(fd).st_ino
    with pytest.raises(TransferError):
        transfer.unpack(fd, size, table)
    assert is_closed(fd, ino)


# -- check_fd: seals and size --------------------------------------------------------------------------
def test_check_fd_accepts_required_seals_without_seal_seal():
    fd = memfd(8)
    try:
        transfer.check_fd(fd, 8)
    finally:
        os.close(fd)


@pytest.mark.parametrize("seals", [
    0,
    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW,
    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW,
    fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK,
    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL,
], ids=["none", "no-write", "no-shrink", "no-grow", "sealed-without-write"])
def test_check_fd_refuses_missing_seals(seals):
    fd = memfd(64, seals=seals)
    try:
        with pytest.raises(TransferError, match="not sealed against writes and resizing"):
            transfer.check_fd(fd, 64)
    finally:
        os.close(fd)


def test_unpack_refuses_an_unsealed_memfd():
    fd = memfd(8, seals=0, content=b"12345678")
    with pytest.raises(TransferError, match="not sealed against writes and resizing"):
        transfer.unpack(fd, 8, [entry()])


def test_check_fd_refuses_a_memfd_without_sealing():
    fd = memfd(8, seals=0, sealable=False)  # F_GET_SEALS says F_SEAL_SEAL only
    try:
        with pytest.raises(TransferError, match="not sealed against writes"):
            transfer.check_fd(fd, 8)
    finally:
        os.close(fd)


def test_check_fd_refuses_what_is_not_a_memfd():
    r, w = os.pipe()
    fds = [r, os.open(__file__, os.O_RDONLY), os.open("/dev/null", os.O_RDONLY)]
    try:
        for fd in fds:
            with pytest.raises(TransferError, match="not a sealable memfd"):
                transfer.check_fd(fd, 8)
    finally:
        for fd in fds + [w]:
            os.close(fd)


@pytest.mark.parametrize("actual,announced", [(64, 128), (128, 64), (64, 0)])
def test_check_fd_refuses_a_size_mismatch(actual, announced):
    fd = memfd(actual)
    try:
        with pytest.raises(TransferError, match=f"holds {actual} bytes, {announced} announced"):
            transfer.check_fd(fd, announced)
    finally:
        os.close(fd)


def test_unpack_refuses_bytes_announced_without_a_memfd():
    with pytest.raises(TransferError, match="8 bytes announced but no memfd received"):
        transfer.unpack(None, 8, [entry()])


def test_unpack_size_zero_with_a_nonempty_memfd():
    fd = memfd(64)
    with pytest.raises(TransferError, match="holds 64 bytes, 0 announced"):
        transfer.unpack(fd, 0, [])


def test_unpack_size_zero_with_an_empty_sealed_memfd():
    fd = memfd(0)
    ino = os.fstat(fd).st_ino
    (out,) = transfer.unpack(fd, 0, [entry(shape=(0, 2), dtype="float32")])
    assert out.shape == (0, 2) and out.dtype == np.float32
    assert is_closed(fd, ino)


def test_table_is_checked_before_the_fd():
    """A bad table is reported as such even with a bad descriptor: nothing is looked at before it."""
    fd = memfd(8, seals=0)
    with pytest.raises(TransferError, match="refused dtype"):
        transfer.unpack(fd, 8, [entry(dtype="float128")])


# -- populate ------------------------------------------------------------------------------------------
def test_populate_prefaults_a_dense_memfd():
    n = 16 << 20
    packed = transfer.pack([np.ones(n, np.uint8)])
    before = rss()
    (out,) = transfer.unpack(packed.fd, packed.size, packed.table, populate=True)
    assert rss() - before >= n * 0.9
    del out


def test_without_populate_nothing_is_faulted_in():
    n = 16 << 20
    packed = transfer.pack([np.ones(n, np.uint8)])
    before = rss()
    (out,) = transfer.unpack(packed.fd, packed.size, packed.table)
    assert rss() - before < n * 0.1
    assert out[n // 2] == 1
    del out


def test_populate_skips_a_sparse_memfd():
    """A memfd of holes (ftruncate only) is not pre-faulted: that would allocate every hole."""
    n = 64 << 20
    fd = memfd(n)
    keep = os.dup(fd)
    try:
        before = rss()
        (out,) = transfer.unpack(fd, n, [entry(shape=(n,))], populate=True)
        assert rss() - before < (4 << 20)
        assert os.fstat(keep).st_blocks == 0, "no page of the memfd was allocated"
        assert out[:4].tolist() == [0, 0, 0, 0] and out[-1] == 0
        del out
    finally:
        os.close(keep)


# -- validate ------------------------------------------------------------------------------------------
def test_validate_returns_dtype_shape_offset_nbytes():
    table = [entry("float32", (2, 3), 0), entry("int64", (), 64), entry("bool", (0, 5), 72)]
    assert transfer.validate(table, 72) == [
        (np.dtype("float32"), (2, 3), 0, 24), (np.dtype("int64"), (), 64, 8), (np.dtype("bool"), (0, 5), 72, 0)]


@pytest.mark.parametrize("table", [None, {}, "[]", ({"dtype": "uint8"},), 3],
                         ids=["None", "dict", "str", "tuple", "int"])
def test_validate_refuses_a_table_that_is_not_a_list(table):
    with pytest.raises(TransferError, match="tensor table is not a list of acceptable length"):
        transfer.validate(table, 0)


def test_validate_max_entries():
    """Refused on the length alone (accepting exactly MAX_ENTRIES would cost a 131072-entry loop here)."""
    empty = entry(shape=(0,))
    assert len(transfer.validate([empty] * 1000, 0)) == 1000
    with pytest.raises(TransferError, match="not a list of acceptable length"):
        transfer.validate([empty] * (transfer.MAX_ENTRIES + 1), 0)


@pytest.mark.parametrize("bad", [
    None, 3, "uint8", ["uint8", [8], 0, 8],
    {"shape": [8], "offset": 0, "nbytes": 8},
    {"dtype": "uint8", "offset": 0, "nbytes": 8},
    {"dtype": "uint8", "shape": [8], "nbytes": 8},
    {"dtype": "uint8", "shape": [8], "offset": 0},
    {"dtype": ["uint8"], "shape": [8], "offset": 0, "nbytes": 8},
    {"dtype": "uint8", "shape": 8, "offset": 0, "nbytes": 8},
    {"dtype": "uint8", "shape": None, "offset": 0, "nbytes": 8},
], ids=["None", "int", "str", "list", "no-dtype", "no-shape", "no-offset", "no-nbytes", "dtype-list",
        "shape-int", "shape-None"])
def test_validate_refuses_malformed_entries(bad):
    with pytest.raises(TransferError, match="tensor table entry 1 is malformed or has a refused dtype"):
        transfer.validate([entry(), bad], 64)


@pytest.mark.parametrize("dtype", ["object", "O", "float128", "bfloat16", "<i4", ">i4", "int", "float", "U8",
                                   "datetime64", "void", "", "UINT8"])
def test_validate_refuses_dtypes_outside_the_allow_list(dtype):
    with pytest.raises(TransferError, match="refused dtype"):
        transfer.validate([entry(dtype="uint8", shape=(8,)) | {"dtype": dtype}], 8)


@pytest.mark.parametrize("change", [
    {"shape": [-8]}, {"shape": [8.0]}, {"shape": [True] * 8}, {"shape": ["8"]}, {"shape": [None]},
    {"offset": -8}, {"offset": 0.0}, {"offset": False}, {"offset": "0"},
    {"nbytes": -8}, {"nbytes": 8.0}, {"nbytes": True}, {"nbytes": None},
    {"shape": [1] * (transfer.MAX_NDIM + 1), "nbytes": 1},
], ids=["neg-dim", "float-dim", "bool-dims", "str-dim", "None-dim", "neg-offset", "float-offset",
        "bool-offset", "str-offset", "neg-nbytes", "float-nbytes", "bool-nbytes", "None-nbytes", "too-many-dims"])
def test_validate_refuses_bad_numbers(change):
    with pytest.raises(TransferError, match="tensor table entry 0 has a bad shape, offset or size"):
        transfer.validate([entry(shape=(8,)) | change], 64)


def test_validate_accepts_max_ndim():
    assert transfer.validate([entry(shape=(1,) * transfer.MAX_NDIM)], 1)[0][1] == (1,) * transfer.MAX_NDIM


@pytest.mark.parametrize("dtype,shape,nbytes", [
    ("float32", (2, 3), 25), ("float32", (2, 3), 6), ("uint8", (), 0), ("int64", (0,), 8),
    ("complex128", (1,), 8), ("uint8", (2 ** 40, 2 ** 40), 0)])
def test_validate_shape_times_itemsize_must_equal_nbytes(dtype, shape, nbytes):
    with pytest.raises(TransferError, match=r"tensor table entry 0(: shape .* x \d+ B != \d+ B| has an impossible shape)"):
        transfer.validate([entry(dtype, shape, 0, nbytes)], 256)


@pytest.mark.parametrize("dtype,offset,size", [
    ("float32", 2, 64), ("float64", 4, 64), ("complex128", 8, 64), ("int16", 1, 64),   # misaligned
    ("uint8", 63, 64), ("float64", 64, 64), ("float64", 2 ** 62, 64),                 # outside
])
def test_validate_extents_inside_and_aligned(dtype, offset, size):
    with pytest.raises(TransferError, match=r"are misaligned or outside the \d+-byte payload"):
        transfer.validate([entry(dtype, (2,), offset)], size)


def test_validate_empty_entry_must_still_lie_inside():
    assert transfer.validate([entry(shape=(0,), offset=8)], 8)  # at the very end: fine
    with pytest.raises(TransferError, match="outside the 8-byte payload"):
        transfer.validate([entry(shape=(0,), offset=9)], 8)


@pytest.mark.parametrize("table,pair", [
    ([entry(shape=(16,), offset=0), entry(shape=(16,), offset=8)], "0 and 1"),
    ([entry(shape=(16,), offset=8), entry(shape=(16,), offset=0)], "1 and 0"),
    ([entry(shape=(64,), offset=0), entry(shape=(4,), offset=64), entry(shape=(8,), offset=16)], "0 and 2"),
    ([entry(shape=(8,), offset=0), entry(shape=(8,), offset=0)], "0 and 1"),
    ([entry(shape=(8,), offset=100), entry("float64", (1,), 0), entry("uint8", (1,), 7)], "1 and 2"),
], ids=["tail", "reversed", "contained", "same", "unsorted"])
def test_validate_refuses_overlaps(table, pair):
    with pytest.raises(TransferError, match=f"tensor table entries {pair} overlap"):
        transfer.validate(table, 108)


def test_validate_adjacent_and_empty_entries_do_not_overlap():
    table = [entry(shape=(8,), offset=0), entry(shape=(8,), offset=8), entry(shape=(0,), offset=4),
             entry(shape=(0,), offset=4)]
    assert len(transfer.validate(table, 16)) == 4


def test_validate_payload_no_larger_than_used_plus_align():
    table = [entry(shape=(100,))]
    assert transfer.validate(table, 100 + ALIGN)
    with pytest.raises(TransferError, match=f"the payload is {101 + ALIGN} bytes but its tensor table uses only 100"):
        transfer.validate(table, 101 + ALIGN)
    with pytest.raises(TransferError, match="uses only 0"):
        transfer.validate([], ALIGN + 1)
    assert transfer.validate([], ALIGN) == []


def test_unpack_refuses_a_padded_sparse_payload_before_mapping():
    """A huge memfd with a one-byte table is refused from the numbers alone (never mapped)."""
    n = 1 << 30
    fd = memfd(n)
    before = rss()
    with pytest.raises(TransferError, match="uses only 1"):
        transfer.unpack(fd, n, [entry(shape=(1,))], populate=True)
    assert rss() - before < (4 << 20)


@pytest.mark.parametrize("nbytes", [1, 0], ids=["mapped", "empty"])
def test_unpack_refuses_more_dims_than_numpy_has(nbytes):
    shape = (1,) * 32 + (nbytes,)
    if nbytes:
        packed = transfer.pack([np.zeros(1, np.uint8)])
        fd, size = packed.fd, packed.size
    else:
        fd, size = None, 0
    with pytest.raises(TransferError):
        transfer.unpack(fd, size, [entry(shape=shape)])


@pytest.mark.parametrize("shape", [(0, 2 ** 63), (0, 10 ** 10, 10 ** 10)], ids=["dim>intp", "product>intp"])
def test_unpack_refuses_empty_entries_numpy_cannot_make(shape):
    with pytest.raises(TransferError):
        transfer.unpack(None, 0, [entry(dtype="float64", shape=shape, nbytes=0)])


# -- small payloads inline, in the message body -----------------------------------------------------------
def test_small_payloads_travel_inline_and_come_back_writable():
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(7, dtype=np.int64), np.zeros(0, np.uint8)]
    packed = transfer.pack(arrays, inline_max=transfer.INLINE_MAX)
    assert packed.fd is None and len(packed.inline) == packed.size > 0
    out = transfer.unpack(None, packed.size, packed.table, inline=packed.inline)
    for a, b in zip(arrays, out):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    out[0][0, 0] = 99.0  # a private, writable copy
    assert arrays[0][0, 0] == 0.0
    big = transfer.pack([np.zeros(transfer.INLINE_MAX + 8, np.uint8)], inline_max=transfer.INLINE_MAX)
    assert big.fd is not None and big.inline == b""
    big.close()


def test_inline_payloads_are_checked_like_memfds():
    packed = transfer.pack([np.arange(8, dtype=np.float64)], inline_max=transfer.INLINE_MAX)
    with pytest.raises(TransferError, match="came inline"):
        transfer.unpack(None, packed.size, packed.table, inline=packed.inline[:-1])
    with pytest.raises(TransferError, match="outside"):
        transfer.unpack(None, 32, [dict(packed.table[0], offset=0, nbytes=64, shape=[8])], inline=b"\0" * 32)
    huge = transfer.INLINE_MAX + 64
    with pytest.raises(TransferError, match="came inline"):
        transfer.unpack(None, huge, [{"dtype": "uint8", "shape": [huge], "offset": 0, "nbytes": huge}],
                        inline=b"\0" * huge)
