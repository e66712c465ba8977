"""Names both ends of the worker socket agree on: operations, exit codes, sandbox strengths."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from flowhub.errors import OverlayImportError, TransferError

#: Operations a worker runs on a repository's hubconf.
OPS = ("list", "help", "load")
#: Exit code of a worker whose sandbox is weaker than required (EX_CONFIG).
EXIT_SANDBOX_WEAK = 78
#: Policy fields the caller sets per sandboxed worker (see ``settings.SandboxLimits.policy_options``).
LIMIT_OPTIONS = ("max_memory", "max_file_size", "cpu_seconds", "max_processes", "max_scratch")


def decode_result(reply: dict, body: bytes, fds: List[int], context: str, roots: Sequence[str] = (),
                  overlay: Optional[Any] = None) -> Any:
    """A rebuild-mode reply: ``(result, weight records)``, its tensor table validated and mapped first.

    ``overlay``: the private importer of the repo's requirement overlay
    (:class:`flowhub.cache.overlay_imports.PrivateImporter`); the overlay modules the result needs are
    imported through it, and one that cannot be raises :class:`~flowhub.errors.OverlayImportError`."""
    from flowhub.worker.wire import byvalue, protocol, transfer, weightrefs  # delayed: byvalue imports oneflow

    fd = fds.pop(0) if fds else None
    protocol.close_fds(fds)
    try:
        table = reply.get("table")
        # pre-fault the pages in one madvise (no copy): cheaper than faulting them one by one later
        arrays = transfer.unpack(fd, int(reply.get("size", 0)), table, populate=True)
        # tensors sent as references to files of the hub cache (``roots``) are mapped from there
        arrays, table = weightrefs.join(table, arrays, reply.get("files"), roots)  # type: ignore[arg-type]
        for entry in table:
            if entry.get("kind") not in ("param", "tensor", "buffer") or (
                    entry.get("kind") == "buffer" and entry.get("dtype") != "uint8"):
                raise TransferError(f"bad tensor kind in the result table: {entry!r:.200}")
        result, rng, weights = byvalue.decode(body, arrays, table, overlay)
    except OverlayImportError:
        raise
    except TransferError as exc:
        raise TransferError(f"{context}: {exc}") from None
    except Exception as exc:
        raise TransferError(f"{context}: the result could not be rebuilt in this process "
                            f"({type(exc).__name__}: {exc}); use mode=\"proxy\" to keep it in the worker") from None
    if rng:
        byvalue.set_rng_state(rng)
    return result, weights


def checked_weights(weights: Any, context: str) -> List[dict]:
    """The weight files a proxy-mode load reports, checked to be plain JSON records."""
    if weights is None:
        return []
    ok = isinstance(weights, list) and all(
        isinstance(w, dict) and all(isinstance(k, str) and (v is None or type(v) in (str, int, float, bool))
                                    for k, v in w.items()) for w in weights)
    if not ok:
        raise TransferError(f"{context}: the worker reported malformed weight records")
    return weights
