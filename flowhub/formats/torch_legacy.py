"""The legacy ``torch.save`` format (``_use_new_zipfile_serialization=False``): one stream of pickles.

Layout: the magic number, the protocol version (1001) and a ``sys_info`` dict, each a plain pickle;
the object's pickle (storages as persistent ids); a pickled list of storage keys; then for each key
in that order an 8-byte little-endian element count and the raw little-endian elements. Nothing
aligns the storages, so one whose offset is not a multiple of its element size is copied.
"""
from __future__ import annotations

from flowhub.errors import CheckpointFormatError
from flowhub.formats import arrays, torch_pickle

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def read(path: str, *, mapped: bool = False) -> arrays.Loaded:
    """Read the legacy torch checkpoint at ``path`` (see :func:`flowhub.formats.read`)."""
    with open(path, "rb") as f:
        if torch_pickle.plain_load(f, path) != MAGIC_NUMBER:
            raise CheckpointFormatError(f"{path} does not start with torch's magic number: not a legacy torch "
                                        "checkpoint. Nothing was loaded.")
        version = torch_pickle.plain_load(f, path)
        if version != PROTOCOL_VERSION:
            raise CheckpointFormatError(f"{path}: legacy torch protocol {version!r:.40} (flowhub reads "
                                        f"{PROTOCOL_VERSION}). Nothing was loaded.")
        torch_pickle.plain_load(f, path)  # sys_info: the data is little-endian whatever it says
        value, storages = torch_pickle.unpickle(f, path)
        keys = torch_pickle.plain_load(f, path)
        offset = f.tell()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys) \
            or set(keys) != set(storages):
        raise CheckpointFormatError(f"{path}: the list of storage keys does not match the storages the pickle "
                                    "names. Nothing was loaded.")
    source = arrays.Source(path, mapped)
    for key in keys:
        storage, what = storages[key], f"storage {key!r:.40}"
        numel = int.from_bytes(source.region(offset, 8, f"the size of {what}").tobytes(), "little")
        if numel != storage.numel:
            raise CheckpointFormatError(f"{path}: {what} has {numel} elements in the file but {storage.numel} in "
                                        "the pickle. Nothing was loaded.")
        nbytes = numel * arrays.STORED_ITEMSIZE[storage.dtype]
        storage.array, storage.file_offset = arrays.storage(source, offset + 8, nbytes, storage.dtype, what)
        offset += 8 + nbytes
    return torch_pickle.materialize(value, path)
