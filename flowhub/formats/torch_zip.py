"""``torch.save``'s zip format (torch >= 1.6): ``<archive>/data.pkl`` plus one member per storage.

torch writes every member uncompressed and 64-byte aligned, so each storage is the bytes at its
member's data offset (local header + 30 + name + extra length) and maps without a copy. A compressed
member (a zip rewritten by another tool) is decompressed instead, and ``<archive>/byteorder`` =
``big`` is converted; both copy.
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib
from typing import Dict

from flowhub.errors import CheckpointFormatError
from flowhub.formats import arrays, torch_pickle

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra lengths at bytes 26 and 28


def _data_offset(f: io.BufferedIOBase, info: zipfile.ZipInfo, path: str) -> int:
    f.seek(info.header_offset)
    head = f.read(_LOCAL_HEADER.size)
    if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
        raise CheckpointFormatError(f"{path}: the zip member {info.filename!r:.80} has no local header where the "
                                    "directory says: the file is truncated or corrupt. Nothing was loaded.")
    _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def read(path: str, *, mapped: bool = False) -> arrays.Loaded:
    """Read the torch zip checkpoint at ``path`` (see :func:`flowhub.formats.read`)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointFormatError(f"{path} is not a readable zip ({exc}): the file is truncated or corrupt. "
                                    "Nothing was loaded.") from None
    with zf, open(path, "rb") as f:
        records = [i for i in zf.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
        if len(records) != 1:
            raise CheckpointFormatError(f"{path}: a torch zip checkpoint holds exactly one <name>/data.pkl; this "
                                        f"one holds {len(records)}. Nothing was loaded.")
        prefix = records[0].filename[:-len("data.pkl")]
        members: Dict[str, zipfile.ZipInfo] = {i.filename: i for i in zf.infolist()}
        try:
            pickled = zf.read(records[0])
            order = members.get(prefix + "byteorder")
            big_endian = order is not None and zf.read(order).strip() == b"big"
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError) as exc:
            raise CheckpointFormatError(f"{path}: {exc}; the file is truncated or corrupt. Nothing was loaded.") \
                from None
        value, storages = torch_pickle.unpickle(io.BytesIO(pickled), path)
        source = arrays.Source(path, mapped)
        for key, storage in storages.items():
            info = members.get(f"{prefix}data/{key}")
            what = f"storage {key!r:.40}"
            if info is None:
                raise CheckpointFormatError(f"{path}: the pickle names {what}, which the zip does not hold. "
                                            "Nothing was loaded.")
            nbytes = storage.numel * arrays.STORED_ITEMSIZE[storage.dtype]
            if info.file_size != nbytes:
                raise CheckpointFormatError(f"{path}: {what} holds {info.file_size} bytes, but the pickle says "
                                            f"{storage.numel} {storage.dtype} elements ({nbytes} bytes). Nothing "
                                            "was loaded.")
            if info.compress_type == zipfile.ZIP_STORED:
                offset = _data_offset(f, info, path)
                storage.array, storage.file_offset = arrays.storage(source, offset, nbytes, storage.dtype, what,
                                                                    big_endian)
            else:
                try:
                    data = zf.read(info)  # checks the CRC too
                except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
                    raise CheckpointFormatError(f"{path}: {what}: {exc}. Nothing was loaded.") from None
                storage.array = arrays.storage_from_bytes(data, storage.dtype, f"{path}: {what}", big_endian)
        return torch_pickle.materialize(value, path)
