"""One load in a job: rank 0 resolves the ref, every rank gets its commit SHA, each cache is filled once.

1. :func:`job_settings`: which rank fills this rank's cache (:mod:`flowhub.distributed.roles`); the
   answer travels in the settings (``job_role``), so worker processes' weight downloads follow it too.
2. :func:`checkout`: rank 0 resolves the ref (no fetch, unless only the archive can say which commit
   it is) and broadcasts the SHA, or its error; then every rank asks its cache for exactly that commit.
   The rank that fills the cache fetches it by SHA; the others wait for it on the filesystem, not on
   comm, so a fetcher that dies is taken over (see :func:`flowhub.cache.store.entry_lock`).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional, Tuple

from flowhub.cache import repos
from flowhub.distributed import comm, roles
from flowhub.distributed.job import Job, detect
from flowhub.errors import JobError
from flowhub.net.http import HttpClient
from flowhub.settings import Settings
from flowhub.spec import RepoSpec


def current_job() -> Optional[Job]:
    return detect()


def job_settings(settings: Settings, job: Optional[Job] = None) -> Settings:
    """``settings`` with this rank's ``job_role`` for its cache ("fetch" or "wait"); unchanged outside a job."""
    job = job or detect()
    if job is None:
        return settings
    if settings.broadcast_weights and settings.mode != "inprocess":
        warnings.warn(f"flowhub: broadcast_weights needs the checkpoint loaded in the rank's own process "
                      f"(mode='inprocess'); with mode={settings.mode!r} each rank's worker reads it.", stacklevel=4)
    role = roles.role_for(job, settings.hub_dir, settings.cache_shared)
    return dataclasses.replace(settings, job_role="fetch" if role.fetcher == job.rank else "wait")


def agree(job: Job, decide: Callable[[], Any], what: str) -> Any:
    """Rank 0's ``decide()`` on every rank; if it raised, every rank raises (rank 0 its own error)."""
    if job.rank == 0:
        try:
            value = decide()
        except BaseException as exc:
            comm.broadcast_object(job, ("error", f"{type(exc).__name__}: {exc}"))
            raise
        comm.broadcast_object(job, ("ok", value))
        return value
    status, value = comm.broadcast_object(job, None)
    if status != "ok":
        raise JobError(f"Rank 0 failed while {what}, so this rank stops too: {value}")
    return value


def checkout(settings: Settings, spec: RepoSpec, *, force_reload: bool, skip_validation: bool, trust_repo: Any,
             calling_fn: str, verbose: bool, untrusted_ok: bool) -> repos.Checkout:
    """The checkout of ``spec`` every rank of the job loads: the same commit on all of them."""
    job = detect()
    client = HttpClient(settings)
    common = dict(skip_validation=skip_validation, trust_repo=trust_repo, calling_fn=calling_fn,
                  untrusted_ok=untrusted_ok)

    def decide() -> Tuple[str, Optional[str], bool]:
        ref, sha = repos.resolve_commit(client, spec, force_reload=force_reload, **common)
        if sha is not None:
            return ref, sha, False
        # skip_validation on a cold cache: only the archive says which commit it is
        fetching = HttpClient(dataclasses.replace(settings, job_role="fetch"))
        sha = repos.get_checkout(fetching, spec.with_ref(ref), force_reload=force_reload, verbose=verbose,
                                 **common).sha
        return ref, sha, True

    if job is None:
        return repos.get_checkout(client, spec, force_reload=force_reload, verbose=verbose, **common)
    ref, sha, fetched = agree(job, decide, f"resolving {spec}")
    return repos.get_checkout(client, spec.with_ref(ref), force_reload=force_reload and not fetched, verbose=verbose,
                              resolved_sha=sha, **common)
