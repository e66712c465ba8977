"""``broadcast_weights``: rank 0 fetches and reads a checkpoint, every other rank gets its tensors over
OneFlow's collectives (``flow.comm.broadcast``) instead of reading the same file from a shared filesystem.

Rank 0 broadcasts the checkpoint's structure first (containers and plain values, each tensor replaced
by its index, shape and dtype), then each tensor's bytes into a tensor the receiver made for it. The
other ranks never touch the file, so it is fetched and read once per job. Only where the checkpoint is
loaded in the rank's own process (``mode="inprocess"``, or ``Hub.load_state_dict_from_url``): a worker
process is no rank of the job.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from flowhub.distributed import comm
from flowhub.distributed.job import Job, detect
from flowhub.errors import JobError
from flowhub.settings import job_variables

_SRC = 0


class _Slot:
    """Where tensor number ``index`` goes in the rebuilt structure."""

    def __init__(self, index: int) -> None:
        self.index = index


def job_for_broadcast() -> Optional[Job]:
    return detect() if job_variables().get("WORLD_SIZE", "1") != "1" else None


def _split(obj: Any, tensors: List[Any]) -> Any:
    import oneflow as flow  # delayed: rank 0 has just loaded a checkpoint, so oneflow is imported

    if isinstance(obj, flow.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1)
    if isinstance(obj, dict):
        return type(obj)((k, _split(v, tensors)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split(v, tensors) for v in obj)
    return obj


def _join(skeleton: Any, tensors: List[Any]) -> Any:
    if isinstance(skeleton, _Slot):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        return type(skeleton)((k, _join(v, tensors)) for k, v in skeleton.items())
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_join(v, tensors) for v in skeleton)
    return skeleton


def broadcast_load(job: Job, load: Callable[[], Tuple[Any, Dict[str, Any]]], map_location: Any = None
                   ) -> Tuple[Any, Dict[str, Any]]:
    """``load()`` (the checkpoint and its fingerprint) on rank 0, its result on every rank (a collective)."""
    tensors: List[Any] = []
    header: Any = None
    if job.rank == _SRC:
        try:
            obj, fingerprint = load()
            skeleton = _split(obj, tensors)
            specs = [(tuple(t.shape), str(t.dtype).rsplit(".", 1)[-1]) for t in tensors]
            header = ("ok", skeleton, specs, fingerprint)
        except BaseException as exc:
            comm.broadcast_object(job, ("error", f"{type(exc).__name__}: {exc}"), _SRC)
            raise
    header = comm.broadcast_object(job, header, _SRC)
    if header[0] != "ok":
        raise JobError(f"Rank {_SRC} failed to read the checkpoint it broadcasts (broadcast_weights): {header[1]}")
    _, skeleton, specs, fingerprint = header
    received = comm.broadcast_tensors(job, [t.cpu() for t in tensors], specs, _SRC)
    if job.rank == _SRC:
        return obj, fingerprint
    rebuilt = _join(skeleton, received)
    if map_location is not None:
        from flowhub.cache.checkpoints import remap

        by_device = map_location if isinstance(map_location, dict) or callable(map_location) else {"cpu": map_location}
        rebuilt = remap(rebuilt, by_device)
    return rebuilt, fingerprint
