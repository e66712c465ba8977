"""flowhub's exceptions, one family per way a load can fail.

Each subclasses the built-in type that ``oneflow.hub`` raises in the same situation, so code that
catches ``RuntimeError`` or ``ValueError`` around a hub call keeps working.
"""
from __future__ import annotations

import pickle
from typing import Any, Optional


class FlowhubError(Exception):
    """Base class of every error flowhub raises itself."""


# -- what the user asked for ------------------------------------------------------------------
class RepoSpecError(FlowhubError, ValueError):
    """A ``owner/repo[:ref]`` string or a ``source`` value that cannot be understood."""


class EntrypointError(FlowhubError, RuntimeError):
    """The hubconf has no callable with the requested name."""


class MissingDependenciesError(FlowhubError, RuntimeError):
    """Packages listed in the hubconf's ``dependencies`` are not importable."""


# -- resolving a ref against the server ---------------------------------------------------------
class ResolveError(FlowhubError, ValueError):
    """A ref (branch, tag or commit) that the repository does not have."""


class RateLimitError(FlowhubError, RuntimeError):
    """The GitHub API refused the request because of its rate limit."""


# -- network and offline ------------------------------------------------------------------------
class NetworkError(FlowhubError, RuntimeError):
    """A request failed after its retries (connection refused, reset, HTTP error)."""


class HTTPStatusError(NetworkError):
    """The server answered with an HTTP error status (kept in ``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> tuple:  # keeps ``status`` across processes (a worker's download error)
        return type(self), (self.args[0] if self.args else "", self.status)


class RequestTimeoutError(NetworkError):
    """The server stopped answering for longer than ``FLOWHUB_TIMEOUT`` seconds, retries included."""


class OfflineError(FlowhubError, RuntimeError):
    """``FLOWHUB_OFFLINE`` is set and what was asked for is not in the cache."""


# -- integrity of what was downloaded ------------------------------------------------------------
class IntegrityError(FlowhubError, RuntimeError):
    """Downloaded or cached bytes are not what they should be (size, hash, archive structure)."""


class IncompleteDownloadError(IntegrityError):
    """The server sent fewer (or more) bytes than it announced."""


class HashMismatchError(IntegrityError):
    """The SHA-256 of a file does not match the expected hash (prefix)."""


class ArchiveError(IntegrityError):
    """An archive is not a valid zip, or holds members that would escape its folder."""


# -- trust --------------------------------------------------------------------------------------
class UntrustedRepositoryError(FlowhubError):
    """The user did not (or, without a terminal, could not) confirm that a repository is trusted."""


# -- isolated workers ---------------------------------------------------------------------------
class WorkerError(FlowhubError, RuntimeError):
    """Something went wrong running a repository's hubconf in its worker process."""


class WorkerCrashedError(WorkerError):
    """The worker process died: ``context`` (the call), ``pid`` and ``how`` (its exit code, signal or
    the limit that ended it) say which and how. Built from a message alone for other crashes."""

    def __init__(self, message: str = "", *, context: str = "", pid: Optional[int] = None, how: str = "") -> None:
        super().__init__(message or context)
        self.context, self.pid, self.how, self.message = context, pid, how, message

    def __str__(self) -> str:
        if self.message:
            return self.message
        return (f"{self.context}: the worker process (pid {self.pid}) died: {self.how}. "
                "The next call starts a fresh worker.")

    def __reduce__(self) -> tuple:
        return _rebuild_error, (type(self), self.message, {"context": self.context, "pid": self.pid, "how": self.how})


class WorkerTimeoutError(WorkerError, TimeoutError):
    """One call into a worker took longer than ``timeout`` seconds (``FLOWHUB_WORKER_TIMEOUT``); its
    worker (``pid``) was killed. Built from a message alone for other timeouts."""

    def __init__(self, message: str = "", *, context: str = "", pid: Optional[int] = None,
                 timeout: Optional[float] = None, what: str = "worker process") -> None:
        super().__init__(message or context)
        self.context, self.pid, self.timeout, self.what, self.message = context, pid, timeout, what, message

    def __str__(self) -> str:
        if self.message:
            return self.message
        return (f"{self.context} did not finish within {self.timeout:g} s, so its {self.what} (pid {self.pid}) "
                "was killed (worker_timeout / FLOWHUB_WORKER_TIMEOUT)")

    def __reduce__(self) -> tuple:
        return _rebuild_error, (type(self), self.message, {"context": self.context, "pid": self.pid,
                                                           "timeout": self.timeout, "what": self.what})


def _rebuild_error(cls: type, message: str, fields: dict) -> BaseException:
    return cls(message, **fields)


class HubconfError(WorkerError):
    """Hubconf code raised an exception whose type cannot be rebuilt in the caller (its name and
    the worker's traceback are in the message)."""


class TransferError(WorkerError):
    """The entrypoint's result cannot be sent back to the caller by value; ``mode="proxy"`` keeps it in the worker."""


class ProxyError(WorkerError):
    """A proxy was used in a way that cannot cross to its worker (autograd, a proxy of another worker)."""


class StaleProxyError(ProxyError):
    """The worker that held a proxy's object has ended (crashed, timed out, replaced or shut down)."""


# -- weights-only loading -----------------------------------------------------------------------
class WeightsOnlyError(FlowhubError, pickle.UnpicklingError):
    """A checkpoint loaded with ``weights_only=True`` holds more than tensors and plain values, or
    could not be loaded in its sandboxed worker (``pickle.UnpicklingError``, as torch raises)."""


# -- checkpoint formats -------------------------------------------------------------------------
class CheckpointFormatError(IntegrityError):
    """A weight file is not a checkpoint flowhub knows (an HTML page, a truncated zip, ...), or is a
    single-file checkpoint that only ``torch.load`` (which unpickles it) could read in this process."""


class UnsafeCheckpointError(CheckpointFormatError, WeightsOnlyError):
    """A torch checkpoint's pickle names a global outside flowhub's allow-list (storages, tensors,
    parameters, ``OrderedDict``); it was refused before anything in it ran."""


# -- the wire between caller and worker, and the sandbox -------------------------------------------------
class PeerClosed(EOFError):
    """The other end of a worker socket closed it (usually: the process died)."""


class ProtocolError(RuntimeError):
    """The peer sent bytes that are not a well-formed message."""


class WorkerTraceback(Exception):
    """Attached as ``__cause__`` when the original message could not carry the worker's traceback."""


class SandboxError(RuntimeError):
    """The sandbox cannot be applied as asked (a multi-threaded process, for instance)."""


class LockfileDriftError(IntegrityError):
    """What a load produced differs from what the lockfile pinned."""


class DownloadTooLargeError(NetworkError, PermissionError):
    """A download announced or streamed more bytes than it may take (a sandboxed call's quota)."""


# -- a repository's own requirements (overlays) --------------------------------------------------------
class MissingModuleError(FlowhubError, ModuleNotFoundError):
    """Repository code imported a module this environment lacks. ``repo`` (repo@ref), ``entrypoint``,
    ``name`` (the module), ``declared`` (what the repository declares, one line per file) and
    ``overlays`` (whether requirement overlays were on) make the message, which says how to get it
    (``install``: the declared requirement that provides the module, if one does), or ``hint``: why
    it cannot be had (a PyTorch extension under ``mock_torch``), said instead."""

    def __init__(self, message: str = "", *, repo: str = "", entrypoint: str = "", module: str = "",
                 declared: str = "", overlays: bool = False, install: str = "", hint: str = "") -> None:
        super().__init__(message or module, name=module or None)
        self.repo, self.entrypoint, self.module, self.declared, self.overlays = repo, entrypoint, module, declared, overlays
        self.message, self.install, self.hint = message, install, hint

    def __str__(self) -> str:
        if self.message:
            return self.message
        head = (f"{self.repo}: {self.entrypoint} needs the module {self.module!r}, which this environment "
                f"does not have.\nThe repository declares:\n  " + self.declared.replace("\n", "\n  "))
        if self.hint:
            return head + "\n" + self.hint
        if self.overlays:
            return (head + "\nIts declared requirements were installed in its overlay, and none of them provides "
                    f"{self.module!r}: install the package that provides it into this environment "
                    "(the repository does not declare it).")
        how = f"pip install '{self.install}'" if self.install else "pip install ..."
        return (head + f"\nTwo ways out: install the package that provides {self.module!r} into this environment "
                f"({how}), or let flowhub install the repository's declared requirements as wheels into "
                "an overlay that only its worker sees (your environment stays as it is): "
                "FLOWHUB_INSTALL_REQUIREMENTS=1, Hub(install_requirements=True), or --install-requirements "
                "on the command line.")

    def __reduce__(self) -> tuple:
        return _rebuild_error, (type(self), self.message, {"repo": self.repo, "entrypoint": self.entrypoint,
                                                           "module": self.module, "declared": self.declared,
                                                           "overlays": self.overlays, "install": self.install,
                                                           "hint": self.hint})


class RequirementsInstallError(FlowhubError, RuntimeError):
    """A repository's requirements could not be installed as wheels into its overlay (nothing was
    published), or cannot be installed at all (a direct URL, a package-index-less offline load)."""


class OverlayImportError(FlowhubError, ImportError):
    """A module of a requirement overlay (``site``) cannot be loaded privately in the caller, so a result
    that needs it cannot be rebuilt here: ``module`` and ``reason`` (what loading it raised)."""

    def __init__(self, site: str, module: str, reason: Any) -> None:
        self.reason = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
        super().__init__(f"{module} (from the overlay {site}) cannot be imported privately in this process "
                         f"({self.reason})", name=module)
        self.site, self.module = site, module

    def __reduce__(self) -> tuple:
        return type(self), (self.site, self.module, self.reason)


class CacheWaitTimeoutError(FlowhubError, TimeoutError):
    """A rank waited too long for the process that fills its cache entry (named, with its host)."""

    def __init__(self, lock_path: str, what: str, holder: str, seconds: float) -> None:
        super().__init__(lock_path, what, holder, seconds)
        self.lock_path, self.what, self.holder, self.seconds = lock_path, what, holder, seconds

    def __str__(self) -> str:
        return (f"Waited {self.seconds:g} s for {self.holder}, which is {self.what} (lock {self.lock_path}), and it "
                "is still alive and not done. Raise FLOWHUB_JOB_TIMEOUT (Hub(job_timeout=...)) if the download is "
                "just slow; if that process is hung, stop it: once its heartbeat stops, the other ranks take over.")


class JobError(FlowhubError, RuntimeError):
    """A distributed job's ranks could not agree (rank 0 failed, or the job's variables are inconsistent)."""
