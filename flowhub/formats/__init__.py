"""Weight files in other frameworks' formats, read into oneflow tensors without their frameworks.

* :mod:`.torch_pickle`: the allow-list unpickler both torch formats share (storages, tensors,
  parameters, ``OrderedDict``; any other global is refused before anything runs);
* :mod:`.torch_zip`: ``torch.save``'s zip format (torch >= 1.6), each storage mapped at its member's offset;
* :mod:`.torch_legacy`: the older pickle-stream format (``_use_new_zipfile_serialization=False``);
* :mod:`.safetensors_file`: a ``.safetensors`` file, through its documented header;
* :mod:`.arrays`: the mapping, the bounds checks and the numpy -> oneflow step they share.

:func:`read` is the one entry point. With ``mapped=True`` tensors are built over one writable
copy-on-write map of the file (zero-copy where the layout allows: aligned, uncompressed, native byte
order); use it only for files that are never rewritten in place (the hub cache publishes by rename).
This package imports numpy and oneflow only when a file is read, and nothing of flowhub but ``errors``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowhub.formats.arrays import Loaded

#: The formats :func:`read` knows (the names of :func:`flowhub.cache.checkpoints.checkpoint_format`).
KINDS = ("torch-zip", "torch-legacy", "safetensors")


def read(path: str, kind: str, *, mapped: bool = False) -> "Loaded":
    """The object in the file ``path`` of format ``kind`` (one of :data:`KINDS`), with oneflow tensors,
    and the extents of the file that its tensors map (see :class:`flowhub.formats.arrays.Loaded`)."""
    # delayed: the readers import numpy (and oneflow to wrap tensors), which importing flowhub must not
    if kind == "torch-zip":
        from flowhub.formats import torch_zip as reader
    elif kind == "torch-legacy":
        from flowhub.formats import torch_legacy as reader
    elif kind == "safetensors":
        from flowhub.formats import safetensors_file as reader
    else:
        raise ValueError(f"unknown weights format {kind!r}; known: {', '.join(KINDS)}")
    return reader.read(path, mapped=mapped)
