"""Moving arrays between processes through one sealed memfd.

Sender (:func:`pack`): every array is written with ``os.pwrite`` at a 64-byte aligned offset of a
fresh ``memfd`` (the sender never maps it, so its own memory stays flat), then the memfd is sealed
against writes, shrinking and growing. The fd travels over ``SCM_RIGHTS`` with a JSON table of
``{dtype, shape, offset, nbytes}`` entries.

Receiver (:func:`unpack`): checks the seals, the size and every table entry (dtype allow-list,
``prod(shape) * itemsize == nbytes``, extents inside the memfd, no overlaps) *before* making any
view, maps the memfd once ``MAP_PRIVATE`` and writable (copy-on-write: a tensor built on it can be
trained in place, and the sender's pages are never changed), and returns numpy views of it. The
mapping goes away when the last view (or tensor wrapping one) is freed. The fd itself is closed as
soon as it is mapped, so a living model holds no descriptor.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from flowhub.errors import TransferError
from flowhub.worker.wire import protocol

ALIGN = 64
MAX_ENTRIES = 1 << 17  # tensors in one payload (large models have a few thousand)
MAX_NDIM = 32  # numpy 1.x's own limit
_CHUNK = 1 << 30  # one pwrite never moves more than this (Linux caps a write near 2 GiB)

#: dtypes that may cross; everything else (object, structured, datetime...) is refused.
DTYPES = {name: np.dtype(name) for name in (
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "complex64", "complex128")}

REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
MADV_POPULATE_READ = 22

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.restype = ctypes.c_int
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass
class Packed:
    """What :func:`pack` produced: the bytes in a sealed memfd ``fd``, or (small payloads, when asked
    for) in ``inline``, to send as the message body; ``fd`` is ``None`` then, and when there are no bytes."""

    fd: Optional[int]
    size: int
    table: List[dict] = field(default_factory=list)
    inline: bytes = b""

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


#: A payload up to this size may travel inline, in the message body (``pack(..., inline_max=...)``):
#: creating, sealing, passing and mapping a memfd costs ~0.2 ms, copying 64 KiB ~10 us.
INLINE_MAX = 64 << 10


def pack(arrays: Sequence[np.ndarray], name: str = "flowhub", inline_max: int = 0) -> Packed:
    """Write ``arrays`` into a new sealed memfd (sender side), or into ``inline`` bytes when they add up
    to at most ``inline_max`` bytes."""
    table, flat, offset = _layout(arrays)
    if offset == 0:
        for entry in table:
            entry["offset"] = 0
        return Packed(None, 0, table)
    if offset <= inline_max:
        buf = bytearray(offset)
        for entry, raw in zip(table, flat):
            if raw is not None:
                buf[entry["offset"]:entry["offset"] + entry["nbytes"]] = raw.tobytes()
        return Packed(None, offset, table, bytes(buf))
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, offset)
        for entry, raw in zip(table, flat):
            if raw is None:
                continue
            view, pos, done = memoryview(raw), entry["offset"], 0
            while done < len(view):
                done += os.pwrite(fd, view[done:done + _CHUNK], pos + done)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return Packed(fd, offset, table)


def validate(table: object, size: int) -> List[tuple]:
    """Check a table from the other process against a payload of ``size`` bytes.

    Returns ``[(dtype, shape, offset, nbytes)]``; raises :class:`TransferError` on anything odd.
    """
    if not isinstance(table, list) or len(table) > MAX_ENTRIES:
        raise TransferError("tensor table is not a list of acceptable length")
    out, extents = [], []
    for i, entry in enumerate(table):
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            offset, nbytes = entry["offset"], entry["nbytes"]
        except (KeyError, TypeError):
            raise TransferError(f"tensor table entry {i} is malformed or has a refused dtype: {entry!r:.200}") from None
        ints = (offset, nbytes) + shape
        if len(shape) > MAX_NDIM or not all(type(v) is int and v >= 0 for v in ints):
            raise TransferError(f"tensor table entry {i} has a bad shape, offset or size: {entry!r:.200}")
        count, extent = 1, dtype.itemsize
        for dim in shape:
            count *= dim
            extent *= max(dim, 1)
        if extent >= 1 << 62:  # even an empty array of such a shape is beyond numpy
            raise TransferError(f"tensor table entry {i} has an impossible shape {shape!r:.200}")
        if count * dtype.itemsize != nbytes:
            raise TransferError(f"tensor table entry {i}: shape {shape} x {dtype.itemsize} B != {nbytes} B")
        if offset % dtype.itemsize or offset + nbytes > size:
            raise TransferError(f"tensor table entry {i}: bytes [{offset}, {offset + nbytes}) are misaligned "
                                f"or outside the {size}-byte payload")
        if nbytes:
            extents.append((offset, offset + nbytes, i))
        out.append((dtype, shape, offset, nbytes))
    extents.sort()
    for (_, end, i), (start, _, j) in zip(extents, extents[1:]):
        if start < end:
            raise TransferError(f"tensor table entries {i} and {j} overlap")
    used = max((end for _, end, _ in extents), default=0)
    if size > used + ALIGN:  # bytes nobody asked for: never mapped, let alone faulted in
        raise TransferError(f"the payload is {size} bytes but its tensor table uses only {used}")
    return out


class _Mapping:
    """One private writable mapping of a memfd, unmapped when the last array viewing it dies."""

    def __init__(self, fd: int, size: int, populate: bool) -> None:
        addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise TransferError(f"cannot map the transferred tensors: {os.strerror(err)}")
        self.addr, self.size = addr, size
        if populate:
            _libc.madvise(addr, size, MADV_POPULATE_READ)  # best effort: pre-fault without copying
        self.__array_interface__ = {"data": (addr, False), "shape": (size,), "typestr": "|u1", "version": 3}

    def __del__(self) -> None:
        if getattr(self, "addr", None):
            _libc.munmap(self.addr, self.size)
            self.addr = None


def check_fd(fd: int, size: int) -> None:
    """The memfd must be sealed against writes and resizing, and exactly ``size`` bytes long."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise TransferError("the transferred descriptor is not a sealable memfd") from None
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise TransferError("the transferred memfd is not sealed against writes and resizing")
    actual = os.fstat(fd).st_size
    if actual != size:
        raise TransferError(f"the transferred memfd holds {actual} bytes, {size} announced")


def unpack(fd: Optional[int], size: int, table: object, populate: bool = False,
           inline: bytes = b"") -> List[np.ndarray]:
    """Validate and map a payload (receiver side); ``inline``: the message body, when the payload came
    in it (then copied once, into writable memory). ``fd`` is always closed."""
    try:
        entries = validate(table, size)
        if size == 0:
            if fd is not None:
                check_fd(fd, 0)
            return [np.empty(shape, dtype) for dtype, shape, _, _ in entries]
        if fd is None and inline:
            if len(inline) != size or size > INLINE_MAX:
                raise TransferError(f"{size} bytes announced but {len(inline)} came inline")
            base = np.frombuffer(bytearray(inline), dtype=np.uint8)
            return [base[off:off + nbytes].view(dtype).reshape(shape) if nbytes else np.empty(shape, dtype)
                    for dtype, shape, off, nbytes in entries]
        if fd is None:
            raise TransferError(f"{size} bytes announced but no memfd received")
        check_fd(fd, size)
        # pre-fault only a memfd whose pages exist: faulting a sparse one would allocate its holes here
        populate = populate and os.fstat(fd).st_blocks * 512 >= size - ALIGN
        base = np.asarray(_Mapping(fd, size, populate))
    finally:
        if fd is not None:
            os.close(fd)
    return [base[off:off + nbytes].view(dtype).reshape(shape) if nbytes else np.empty(shape, dtype)
            for dtype, shape, off, nbytes in entries]


# -- proxy arenas: one reused memfd per direction of a proxy connection ------------------------------------
ARENA_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW  # never F_SEAL_WRITE: the sender rewrites it per message
_ARENA_STEP = 1 << 20


class Outbox:
    """The sender's side of a proxy connection: payloads over :data:`INLINE_MAX` are written into one
    memfd reused message after message (grown, as a new memfd, when one is too small), so a call faults
    no fresh pages once the arena has been used. The receiver copies each payload out at once
    (:class:`Inbox`): nothing it keeps shares pages with the arena, which the next message overwrites."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fd: Optional[int] = None
        self.capacity = 0
        self.gen = 0
        self._announced = 0
        self._map: Optional[mmap.mmap] = None

    def pack(self, arrays: Sequence[np.ndarray]) -> "tuple[Packed, dict]":
        """``(packed, header fields)``: small payloads inline (as :func:`pack`), others in the arena; the
        arena's descriptor travels (as ``packed.fd``) only with its first message."""
        table, flat, total = _layout(arrays)
        if total <= INLINE_MAX:
            return pack(arrays, name=self.name, inline_max=INLINE_MAX), {}
        if total > self.capacity:
            self._grow(total)
        assert self._map is not None
        target = np.frombuffer(self._map, dtype=np.uint8)
        for entry, raw in zip(table, flat):
            if raw is not None:
                target[entry["offset"]:entry["offset"] + entry["nbytes"]] = raw
        del target
        extra = {"arena": self.gen}
        fd = None
        if self._announced != self.gen:
            fd, self._announced = os.dup(self.fd), self.gen  # type: ignore[arg-type]
            extra["arena_size"] = self.capacity
        return Packed(fd, total, table), extra

    def _grow(self, needed: int) -> None:
        self.close()
        capacity = -(-max(needed, 2 * self.capacity) // _ARENA_STEP) * _ARENA_STEP
        fd = os.memfd_create(self.name + "-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, capacity)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, ARENA_SEALS)
        self.fd, self.capacity, self.gen = fd, capacity, self.gen + 1
        self._map = mmap.mmap(fd, capacity, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Inbox:
    """The receiver's side: the peer's current arena, mapped once; payloads in it are validated and
    handed out as views that the caller must copy before the next message (see ``copied``)."""

    def __init__(self) -> None:
        self.gen = 0
        self._base: Optional[np.ndarray] = None
        self._size = 0

    def unpack(self, header: dict, fds: List[int], inline: bytes = b"") -> "tuple[List[np.ndarray], bool]":
        """``(arrays, copied)``: ``copied`` is True when ``arrays`` view the arena (copy them now);
        otherwise they come from the message itself (as :func:`unpack`). Takes ``fds``."""
        size, table = header.get("size", 0), header.get("table") or []
        if type(size) is not int:
            _close(fds)
            raise TransferError("the payload size is not an integer")
        if "arena" not in header:
            return unpack(fds.pop(0) if fds else None, size, table, inline=inline), False
        gen = header.get("arena")
        try:
            if fds:
                self._adopt(fds.pop(0), header.get("arena_size"), gen)
        finally:
            _close(fds)
        if type(gen) is not int or gen != self.gen or self._base is None:
            raise TransferError(f"the payload names arena {gen!r:.20}, which this side does not have")
        entries = validate(table, size)
        if size > self._size:
            raise TransferError(f"a {size}-byte payload does not fit its {self._size}-byte arena")
        base = self._base
        return [base[off:off + nbytes].view(dtype).reshape(shape) if nbytes else np.empty(shape, dtype)
                for dtype, shape, off, nbytes in entries], True

    def _adopt(self, fd: int, size: object, gen: object) -> None:
        try:
            if type(size) is not int or type(gen) is not int or size <= 0:
                raise TransferError("a new arena came without its size and generation")
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & ARENA_SEALS != ARENA_SEALS or os.fstat(fd).st_size != size:
                raise TransferError("the arena is not a memfd sealed against resizing, of the announced size")
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise TransferError(f"cannot map the peer's arena: {exc}") from None
        finally:
            os.close(fd)
        self._base, self._size, self.gen = np.frombuffer(mapping, dtype=np.uint8), size, gen


def _close(fds: List[int]) -> None:
    protocol.close_fds(fds)
    fds.clear()


def _layout(arrays: Sequence[np.ndarray]) -> "tuple[List[dict], list, int]":
    """The table (aligned offsets), the flat byte views and the total size of a payload."""
    table, flat, offset = [], [], 0
    for arr in arrays:
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")
        if arr.dtype.name not in DTYPES:
            raise TransferError(f"arrays of dtype {arr.dtype} cannot be transferred")
        offset = -(-offset // ALIGN) * ALIGN
        table.append({"dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes})
        flat.append(arr.reshape(-1).view(np.uint8) if arr.nbytes else None)
        offset += arr.nbytes
    return table, flat, offset
