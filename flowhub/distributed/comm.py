"""The few collectives flowhub needs, over OneFlow's own comm (``flow.comm``, its CPU broadcast of bytes).

oneflow is imported here only inside a job (:func:`flowhub.distributed.job.detect`): there, importing it is
what the user's script does anyway and what brings the job's comm up. Outside a job nothing here runs, so
no comm is ever initialised. Every function is a collective: all ranks call it, in the same order.
"""
from __future__ import annotations

import pickle
from typing import Any, List, Tuple

from flowhub.distributed.job import Job
from flowhub.errors import JobError


def _flow(job: Job) -> Any:
    import oneflow as flow  # delayed: only in a job, where comm is meant to come up

    world = flow.env.get_world_size()
    if world != job.world_size:
        raise JobError(f"The launcher's variables say {job.describe()}, but OneFlow runs as one of {world} "
                       "ranks (oneflow was started before the variables were set?).")
    return flow


def broadcast_object(job: Job, obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable; the others pass anything, e.g. None)."""
    flow = _flow(job)
    payload = pickle.dumps(obj) if job.rank == src else None
    return pickle.loads(flow._oneflow_internal.cpu_broadcast(payload, src))


def barrier(job: Job) -> None:
    _flow(job).comm.barrier()


def broadcast_tensors(job: Job, tensors: List[Any], specs: List[Tuple[Tuple[int, ...], str]],
                      src: int = 0) -> List[Any]:
    """Tensors of rank ``src`` on every rank: ``src`` passes them, the others get new ones of ``specs``
    (shape, dtype name) filled in place by ``flow.comm.broadcast``."""
    flow = _flow(job)
    out = []
    for i, (shape, dtype) in enumerate(specs):
        if job.rank == src:
            tensor = tensors[i].contiguous()
        else:
            kind = getattr(flow, dtype)
            tensor = flow.empty(*shape, dtype=kind) if shape else flow.tensor(0, dtype=kind)
        flow.comm.broadcast(tensor, src)
        out.append(tensor)
    return out


def comm_state() -> str:
    """For ``flowhub doctor``: whether OneFlow's comm is up in this process (never starts it)."""
    import sys

    flow = sys.modules.get("oneflow")
    if flow is None:
        return "not started (oneflow not imported in this process)"
    try:
        return f"up: OneFlow sees {flow.env.get_world_size()} rank(s), this is rank {flow.env.get_rank()}"
    except Exception as exc:  # a half-initialised oneflow
        return f"unknown ({type(exc).__name__}: {exc})"
