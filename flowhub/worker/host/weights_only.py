"""Weights-only loading: a checkpoint is unpickled in a one-shot sandboxed worker, and only its tensors
and plain values come back.

``oneflow.load`` unpickles ``pickled_data`` with plain ``pickle`` (and falls back to ``torch.load``),
so loading a checkpoint is running its code. With ``weights_only=True`` that happens in a worker
forked from the sandbox zygote for this one load, which may read only the checkpoint:

* worker (:func:`flowhub.worker.proc.weights_task.serve`): ``oneflow.load`` the checkpoint, encode the result in the value form of
  :mod:`flowhub.worker.wire.codec` (tensors, numpy arrays, numbers, strings, None, bytes, devices, dtypes,
  and lists, tuples and dicts of them), refusing any other object, and send one JSON header plus one
  sealed memfd holding the raw bytes of every tensor;
* caller (:func:`load`): validate the tensor table against the memfd before mapping anything
  (:func:`flowhub.worker.wire.transfer.unpack`: dtype allow-list, ``prod(shape) * itemsize == nbytes``,
  extents inside the memfd, no overlaps, seals), decode the JSON value strictly, and wrap the
  mapped bytes with ``flow.from_numpy`` (zero-copy, on a private copy-on-write mapping, so the
  tensors are writable). Nothing the worker sends is unpickled here.

Torch ``.pth`` and ``.safetensors`` files need no worker: flowhub's allow-list readers
(:mod:`flowhub.formats`) run nothing from the file, so they are read here.

Inside a sandboxed worker (a hubconf calling ``load_state_dict_from_url(..., weights_only=True)``)
the checkpoint is loaded in place, since that process is already sandboxed, and checked the same way.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any, Optional

from flowhub import context
from flowhub.errors import TransferError, WeightsOnlyError
from flowhub.worker.wire import codec, protocol

# -- caller side -------------------------------------------------------------------------------------
def _apply_map_location(value: Any, map_location: Any) -> Any:
    if map_location is None:
        return value
    import oneflow as flow

    from flowhub.cache.checkpoints import remap

    if isinstance(map_location, (str, flow.device)):
        device = flow.device(map_location)
        if device.type == "cpu":
            return value
        return remap(value, lambda tensor, _: tensor.to(device))
    return remap(value, map_location)


def decode_reply(reply: dict, fds: list, what: str) -> Any:
    """Caller side: the value of a weights-only reply, after validating its table and JSON value."""
    from flowhub.worker.wire import transfer

    fd = fds.pop(0) if fds else None
    protocol.close_fds(fds)
    if reply.get("ok") is not True:
        if fd is not None:
            os.close(fd)
        error = reply.get("error") if isinstance(reply.get("error"), dict) else {}
        message = error.get("message") if isinstance(error.get("message"), str) else "the worker gave no reason"
        raise WeightsOnlyError(f"{what}: {message[:1 << 16]}")
    size = reply.get("size")
    if type(size) is not int or size < 0:
        if fd is not None:
            os.close(fd)
        raise TransferError(f"{what}: bad payload size {size!r:.40}")
    try:
        arrays = transfer.unpack(fd, size, reply.get("table"), populate=True)  # validates, then maps; closes fd
        return codec.Decoder(arrays, ref=codec.no_refs).decode(reply.get("value"))
    except TransferError as exc:
        raise TransferError(f"{what}: {exc}") from None


def load(path: Any, map_location: Any = None, *, lock_timeout: float = 600.0,
         timeout: Optional[float] = None) -> Any:
    """Load the checkpoint at ``path`` (a oneflow checkpoint folder, a file, or a zip of a folder, which
    is extracted here first) with ``weights_only=True`` semantics; see the module docstring."""
    from flowhub.cache import checkpoints

    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if checkpoints.weights_file_kind(path):  # torch/safetensors: allow-list readers, safe in this process
        return checkpoints.load_checkpoint(path, map_location, lock_timeout)
    if context.sandboxed_downloads():  # already in a sandboxed worker: load here
        value = checkpoints.load_checkpoint(path, "cpu", lock_timeout)
        codec.check_plain(value)
        return _apply_map_location(value, map_location)
    if zipfile.is_zipfile(path):
        path = checkpoints.extracted_checkpoint(path, lock_timeout)  # safe unzip, never runs its content
    from flowhub.worker.host.pool import get_manager

    what = f"weights-only load of {path}"
    reply, fds = get_manager().sandbox_host().run_once({"task": "weights"}, os.path.realpath(path),
                                                        {"op": "weights", "path": path}, timeout, what)
    return _apply_map_location(decode_reply(reply, fds, what), map_location)
