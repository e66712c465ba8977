"""Is this process a rank of a distributed job? Read from the launcher's variables (via :mod:`flowhub.settings`).

``python -m oneflow.distributed.launch`` and torchrun set MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and
LOCAL_RANK (torchrun also LOCAL_WORLD_SIZE and GROUP_RANK/NODE_RANK). OneFlow needs the first four: with
one missing, each process silently runs as rank 0 of 1, so a partial set gets a warning naming what is
missing, and flowhub then treats the process as outside any job. Outside a job, ``import oneflow`` itself
sets all four (``WORLD_SIZE=1``, ``RANK=-1``): a world of one rank is no job.
"""
from __future__ import annotations

import dataclasses
import socket
import warnings
from typing import Mapping, Optional

from flowhub.settings import JOB_REQUIRED, job_variables


@dataclasses.dataclass(frozen=True)
class Job:
    """This process's place in a job."""

    rank: int
    world_size: int
    local_rank: Optional[int]
    local_world_size: Optional[int]
    node_rank: Optional[int]
    master: str
    host: str

    @property
    def node_first_rank(self) -> Optional[int]:
        """The lowest global rank on this node (the launchers number a node's ranks contiguously)."""
        return None if self.local_rank is None else self.rank - self.local_rank

    def describe(self) -> str:
        local = f", local rank {self.local_rank}" if self.local_rank is not None else ""
        node = f", node {self.node_rank}" if self.node_rank is not None else ""
        return f"rank {self.rank} of {self.world_size}{local}{node} on {self.host} (master {self.master})"


def _int(variables: Mapping[str, str], name: str) -> Optional[int]:
    raw = variables.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number; the launcher sets it to one.") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be >= 0.")
    return value


def detect(env: Optional[Mapping[str, str]] = None) -> Optional[Job]:
    """The job this process is a rank of, or None (no launcher variables, a partial set, or one rank)."""
    variables = job_variables(env)
    present = [name for name in JOB_REQUIRED if name in variables]
    if not present:
        return None
    missing = [name for name in JOB_REQUIRED if name not in variables]
    if variables.get("WORLD_SIZE", "").strip() in ("0", "1"):
        return None  # one rank, however the others are set
    if missing:
        warnings.warn(
            f"flowhub: {', '.join(present)} {'is' if len(present) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not, so OneFlow runs this process as rank 0 of 1 and "
            "flowhub treats it as outside any job. Start it with python -m oneflow.distributed.launch (or "
            f"set all of {', '.join(JOB_REQUIRED)}).", stacklevel=3)
        return None
    world = _int(variables, "WORLD_SIZE")
    if world is not None and world <= 1:  # one rank (also what ``import oneflow`` sets outside a job: RANK=-1)
        return None
    rank = _int(variables, "RANK")
    if world is None or rank is None or rank >= world:
        raise ValueError(f"RANK={variables['RANK']} and WORLD_SIZE={variables['WORLD_SIZE']} do not fit: the rank "
                         "must be below the world size.")
    node = _int(variables, "NODE_RANK")
    node = _int(variables, "GROUP_RANK") if node is None else node
    return Job(rank=rank, world_size=world, local_rank=_int(variables, "LOCAL_RANK"),
               local_world_size=_int(variables, "LOCAL_WORLD_SIZE"), node_rank=node,
               master=f"{variables['MASTER_ADDR']}:{variables['MASTER_PORT']}", host=socket.gethostname())
