"""Which rank fills which cache: the lowest rank of the ranks that share it fetches, the others wait.

``FLOWHUB_CACHE_SHARED`` (``Hub(cache_shared=...)``) says how the caches are laid out:

- ``1``: one cache on a filesystem every node sees: rank 0 fetches for the whole job;
- ``0``: one cache per node: each node's first rank (``RANK - LOCAL_RANK``) fetches for its node;
- ``auto`` (default): found out once per process and hub folder, by a probe: every rank writes a marker
  named after a token from rank 0 into its cache, a barrier, then each rank lists the markers it sees.
  The ranks whose markers it sees share its cache; the lowest fetches. The cache counts as shared when
  they span more than one node.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import uuid
from typing import Dict, List, Tuple

from flowhub.cache import store
from flowhub.distributed import comm
from flowhub.distributed.job import Job


@dataclasses.dataclass(frozen=True)
class CacheRole:
    """How this rank uses its cache in the job."""

    fetcher: int  # the rank that fetches into this rank's cache
    shared: bool  # the cache is seen by more than one node
    how: str  # "probe", "FLOWHUB_CACHE_SHARED=1" or "=0"
    peers: Tuple[int, ...] = ()  # ranks found on this cache (probe only)

    @property
    def name(self) -> str:
        return "shared" if self.shared else "node-local"


_known: Dict[Tuple[str, str], CacheRole] = {}


def probe(job: Job, hub_dir: str) -> CacheRole:
    """Find who shares ``hub_dir`` with this rank (a collective: every rank calls it)."""
    token = comm.broadcast_object(job, uuid.uuid4().hex if job.rank == 0 else None)
    folder = os.path.join(store.meta_dir(hub_dir, "jobs"), token)
    os.makedirs(folder, exist_ok=True)
    mine = os.path.join(folder, f"rank-{job.rank}.json")
    store.write_json_atomic(mine, {"rank": job.rank, "host": job.host, "node": job.node_first_rank})
    comm.barrier(job)
    peers: List[int] = []
    nodes: Dict[int, object] = {}
    for entry in os.listdir(folder):
        record = store.read_json(os.path.join(folder, entry)) if entry.startswith("rank-") else None
        if isinstance(record, dict) and isinstance(record.get("rank"), int):
            peers.append(record["rank"])
            node = record.get("node")
            nodes[record["rank"]] = node if isinstance(node, int) else f"host {record.get('host')}"
    comm.barrier(job)  # everyone has listed before anyone removes
    with contextlib.suppress(OSError):
        os.remove(mine)
    with contextlib.suppress(OSError):
        os.rmdir(folder)
    peers = sorted(peers) or [job.rank]
    shared = len({nodes.get(r, r) for r in peers}) > 1
    return CacheRole(fetcher=peers[0], shared=shared, how="probe", peers=tuple(peers))


def role_for(job: Job, hub_dir: str, cache_shared: str) -> CacheRole:
    """This rank's :class:`CacheRole` for ``hub_dir``; probed (a collective) at most once per process and folder."""
    if cache_shared == "1":
        return CacheRole(fetcher=0, shared=True, how="FLOWHUB_CACHE_SHARED=1")
    if cache_shared == "0" and job.node_first_rank is not None:
        return CacheRole(fetcher=job.node_first_rank, shared=False, how="FLOWHUB_CACHE_SHARED=0")
    key = (os.path.realpath(hub_dir), job.master)
    if key not in _known:
        _known[key] = probe(job, hub_dir)
    return _known[key]
