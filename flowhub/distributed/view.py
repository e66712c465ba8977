"""``flowhub doctor``'s job view: rank, world size, whether the cache is shared or node-local, comm state.

It runs no collective and never starts OneFlow's comm (doctor may run on one rank only): the cache's
layout comes from ``FLOWHUB_CACHE_SHARED`` when set, else from the filesystem type of the hub folder
(a hint; a load finds out for certain with its probe, see :mod:`flowhub.distributed.roles`).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

from flowhub.distributed import comm
from flowhub.distributed.job import detect
from flowhub.settings import ENV_CACHE_SHARED, Settings, job_variables

#: Filesystem types whose files every client host sees (``/proc/mounts`` names).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "fuse.ceph",
                      "beegfs", "glusterfs", "fuse.glusterfs", "fuse.sshfs", "9p", "panfs", "wekafs", "fuse.juicefs")


def filesystem_type(path: str) -> Optional[str]:
    """The type of the filesystem holding ``path`` (the longest mount point above it), or None."""
    real = os.path.realpath(path)
    while not os.path.exists(real) and real != os.path.dirname(real):
        real = os.path.dirname(real)
    best, kind = "", None
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        return None
    return kind


def cache_layout(settings: Settings) -> str:
    """``shared``, ``node-local`` or a hint with the filesystem type."""
    if settings.cache_shared == "1":
        return f"shared ({ENV_CACHE_SHARED}=1)"
    if settings.cache_shared == "0":
        return f"node-local ({ENV_CACHE_SHARED}=0)"
    kind = filesystem_type(settings.hub_dir) or "unknown"
    guess = "likely shared" if kind in SHARED_FILESYSTEMS else "likely node-local"
    return f"auto: {guess} (filesystem {kind}); each load probes which ranks share it"


def job_view(settings: Settings) -> Dict[str, Any]:
    """The job this process is a rank of, as doctor shows it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = detect()
    view: Dict[str, Any] = {"in_job": job is not None, "variables": job_variables(),
                            "cache": cache_layout(settings), "comm": comm.comm_state(),
                            "broadcast_weights": settings.broadcast_weights}
    if caught:
        view["warning"] = str(caught[0].message)
    if job is not None:
        view.update(rank=job.rank, world_size=job.world_size, local_rank=job.local_rank,
                    local_world_size=job.local_world_size, node_rank=job.node_rank, master=job.master, host=job.host)
    return view
