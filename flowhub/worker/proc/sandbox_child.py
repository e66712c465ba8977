"""Inside a sandboxed worker: lock the process down before repository code runs, then ask the caller
for the downloads the worker may no longer make itself.

:func:`enter` runs in the zygote's fresh fork of a worker whose spec carries ``"sandbox"``, while the
process is still single-threaded and before ``hubconf.py`` is imported: it applies
``SandboxPolicy.for_worker(repo_dir, scratch, hub_dir)`` (no network, scrubbed environment, read-only
repository and hub cache, writes only in the worker's scratch folder, rlimits, seccomp) and exits
with :data:`EXIT_SANDBOX_WEAK` if the sandbox came out weaker than the caller requires.

:func:`attach` hands the worker's socket to a :class:`Channel` and installs :class:`RemoteDownloads`
as the process's download strategy (:mod:`flowhub.context`). From then on every download a hubconf
asks for (flowhub's or ``oneflow.hub``'s) sends the caller a ``fetch`` request in the middle
of the call (see :mod:`flowhub.worker.wire.protocol`); the caller downloads through its own settings,
cache, locks and progress bars and answers with the path of the file, which the worker reads through
its read-only view of the hub cache, or with an error that is raised here.
"""
from __future__ import annotations

import builtins
import os
import shutil
import socket
import threading
from typing import Any, Dict, Optional, Tuple

from flowhub import context, errors
from flowhub.worker.wire import protocol
from flowhub.settings import STRENGTHS
from flowhub.worker.wire.messages import EXIT_SANDBOX_WEAK, LIMIT_OPTIONS



def prepare() -> None:
    """In the sandbox zygote, once: import what :func:`enter` needs and warm the sandbox's caches,
    so a forked worker locks itself down in ~2 ms (see :func:`flowhub.sandbox.prepare`)."""
    import flowhub.sandbox as sandbox
    from flowhub.worker.proc import weights_task  # noqa: F401  (the weights-only task)

    sandbox.prepare()  # last: it caches a scan of sys.modules


def enter(spec: dict) -> None:
    """Apply the worker's sandbox (irreversible); exit if it is weaker than ``min_strength``."""
    options = spec["sandbox"]
    required = options.get("min_strength") or "strong"
    try:
        import flowhub.sandbox as sandbox

        limits = {k: options[k] for k in LIMIT_OPTIONS if options.get(k) is not None}
        policy = sandbox.SandboxPolicy.for_worker(
            spec["repo_dir"], options["scratch"], options.get("hub_dir"),
            read_paths=tuple(options.get("read_paths") or ()), **limits)
        report = sandbox.apply(policy)
        strength = report.strength()
        problem = None if STRENGTHS.index(strength) >= STRENGTHS.index(required) else (
            f"the worker sandbox is {strength} on this machine and {required} is required "
            f"(FLOWHUB_SANDBOX_MIN_STRENGTH):\n{sandbox.format_report(report)}")
    except BaseException as exc:  # not even a weak sandbox: never run repository code unprotected
        problem = f"the worker sandbox could not be applied: {type(exc).__name__}: {exc}"
    if problem is not None:
        try:
            os.write(2, f"flowhub: {problem}\n".encode(errors="replace"))
        finally:
            os._exit(EXIT_SANDBOX_WEAK)


class Channel:
    """The worker's end of its requests to the caller: one request, then its reply, on the socket
    the worker loop serves (only ever while a call from the caller is running)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def ask(self, request: str, **fields: Any) -> dict:
        with self._lock:
            protocol.send_message(self.sock, dict(fields, request=request))
            reply, _, fds = protocol.recv_message(self.sock)
            protocol.close_fds(fds)
        if reply.get("reply") != request:
            raise protocol.ProtocolError(f"the caller answered {reply.get('reply')!r:.40} to a {request!r} request")
        if reply.get("ok") is not True:
            raise _error(reply.get("error"))
        return reply


_channel: Optional[Channel] = None


def attach(sock: socket.socket) -> None:
    """Route this (sandboxed) worker's downloads through the caller, over ``sock``."""
    global _channel
    _channel = Channel(sock)
    context.install_downloads(RemoteDownloads())


def channel() -> Optional[Channel]:
    """The channel to the caller in a sandboxed worker, else ``None`` (in the caller, or unsandboxed)."""
    return _channel


def _error(info: Any) -> BaseException:
    """The exception the caller reported: its flowhub or built-in type when known, else RuntimeError."""
    info = info if isinstance(info, dict) else {}
    message = str(info.get("message") or "the caller could not fetch the file")
    module, _, name = str(info.get("type") or "").rpartition(".")
    cls = vars(errors).get(name) if module == "flowhub.errors" else vars(builtins).get(name) \
        if module == "builtins" else None
    if cls is errors.HTTPStatusError and type(info.get("status")) is int:
        return errors.HTTPStatusError(message, info["status"])
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return errors.NetworkError(f"{info.get('type') or 'error'}: {message}")


def _need_channel() -> Channel:
    if _channel is None:
        raise RuntimeError("not in a sandboxed flowhub worker")
    return _channel


def _fingerprint(reply: dict) -> Tuple[str, Dict[str, Any]]:
    path, fingerprint = reply.get("path"), reply.get("fingerprint")
    if not isinstance(path, str) or not isinstance(fingerprint, dict):
        raise protocol.ProtocolError("malformed fetch reply from the caller")
    return path, fingerprint


def fetch_weights(url: str, model_dir: Optional[str], progress: bool, check_hash: bool,
                  file_name: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """``checkpoints.fetch_weights`` done by the caller: ``(path of the cached file, fingerprint)``.

    ``model_dir`` is not honoured: the caller uses a file already in ``<hub>/checkpoints`` or caches a
    new one in ``<hub>/checkpoints/.sandboxed/`` (see :mod:`flowhub.worker.host.sandbox`), and
    extracts a zipped checkpoint there, since this worker cannot write it.
    """
    reply = _need_channel().ask(
        "fetch", kind="weights", url=str(url), progress=bool(progress), check_hash=bool(check_hash),
        model_dir=os.path.abspath(os.fspath(model_dir)) if model_dir is not None else None,
        file_name=None if file_name is None else str(file_name))
    return _fingerprint(reply)


def download_file(url: str, dst: str, hash_prefix: Optional[str], progress: bool) -> Dict[str, Any]:
    """``download_url_to_file`` done by the caller (into a folder this worker may read), then copied to
    ``dst`` here (so ``dst`` must be writable in the sandbox: the scratch folder). Returns the fingerprint."""
    reply = _need_channel().ask("fetch", kind="file", url=str(url), progress=bool(progress),
                                hash_prefix=None if hash_prefix is None else str(hash_prefix))
    path, fingerprint = _fingerprint(reply)
    shutil.copyfile(path, dst)
    return dict(fingerprint, file=os.path.basename(os.fspath(dst)))


class RemoteDownloads:
    """The download strategy of a sandboxed worker (see :class:`flowhub.context.Downloads`): the
    caller fetches, under the settings it sent for the call."""

    def fetch_weights(self, settings: Any, url: str, model_dir: Optional[str], progress: bool, check_hash: bool,
                      file_name: Optional[str], refresh: Any) -> Tuple[str, Dict[str, Any]]:
        return fetch_weights(url, model_dir, progress, check_hash, file_name)

    def download_file(self, settings: Any, url: str, dst: str, hash_prefix: Optional[str],
                      progress: bool) -> Dict[str, Any]:
        return download_file(url, dst, hash_prefix, progress)
