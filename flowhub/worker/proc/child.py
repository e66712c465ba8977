"""The code that runs inside a worker process (forked from the zygote), serving one repository.

The worker imports the repository's ``hubconf.py`` once (with ``oneflow.mock_torch`` enabled first
when asked), then answers requests until its socket closes::

    request  {"op": "list"|"help"|"load", "model", "mode", "size", "table"}
             body = encoded (settings, args, kwargs, rng state), optional memfd of their tensors
    reply    {"ok": true, "size", "table"}  body = encoded (result, rng state), optional memfd
             {"ok": false, "kind": "hubconf"|"transfer", "error": {...}, "fatal": bool}
             body = the exception pickled by reference (or empty)

Requests with ``"mode": "proxy"`` go to :class:`flowhub.worker.proc.objects.ObjectServer`, which keeps
the results here and replies in JSON only (never a pickle).

Before every request it hands the caller's settings to :func:`flowhub.context.adopt`, so weight
downloads the hubconf makes (through flowhub or ``oneflow.hub``) use the caller's cache and
options. ``SystemExit`` and ``KeyboardInterrupt`` from hubconf code are reported like any error (the
caller raises ``HubconfError`` naming them) instead of ending the worker or the caller.
"""
from __future__ import annotations

import os
import socket
import sys
import types
from typing import Any, List, Optional, Tuple

from flowhub import context, entrypoints
from flowhub.errors import TransferError
from flowhub.cache import checkpoints, mapping
from flowhub.worker.wire import byvalue, failures, protocol, transfer, weightrefs
from flowhub.worker.proc import deferred, objects

from flowhub.worker.wire.messages import OPS  # noqa: E402
#: What hubconf code may raise and the caller is told about: ``SystemExit`` and ``KeyboardInterrupt``
#: too (they become a ``HubconfError`` there, never the caller's own exit).
HUBCONF_EXCEPTIONS = (Exception, SystemExit, KeyboardInterrupt)


class _Failure(Exception):
    """Carries an exception out of a request together with how the caller should see it."""

    def __init__(self, kind: str, exc: BaseException, fatal: bool = False) -> None:
        super().__init__(kind)
        self.kind, self.exc, self.fatal = kind, exc, fatal


class WorkerLoop:
    """Serves list/help/load requests for the repository at ``repo_dir`` over ``sock``."""

    def __init__(self, sock: socket.socket, repo_dir: str, mock_torch: bool) -> None:
        self.sock = sock
        self.repo_dir = repo_dir
        self.mock_torch = mock_torch
        self.modules = byvalue.ByValueModules(repo_dir, ignore=list(sys.modules))  # the zygote's, no repo code
        self._hubconf: Optional[types.ModuleType] = None
        self.deferred_init = True  # the caller's setting, taken with each call's settings
        self.proxies = objects.ObjectServer(self, _Failure)  # mode="proxy": objects kept here, JSON replies

    # -- the repository ---------------------------------------------------------------------------
    def hubconf(self) -> types.ModuleType:
        """Import ``hubconf.py`` on first use; the repo folder stays first on this process's path."""
        if self._hubconf is None:
            if self.mock_torch:
                import oneflow.mock_torch

                oneflow.mock_torch.enable()
            if self.repo_dir not in sys.path:
                sys.path.insert(0, self.repo_dir)
            try:
                self._hubconf = entrypoints.import_hubconf(self.repo_dir)
            except HUBCONF_EXCEPTIONS as exc:
                raise _Failure("hubconf", exc, fatal=True) from None
        return self._hubconf

    def run(self, op: str, model: Optional[str], args: tuple, kwargs: dict) -> Any:
        module = self.hubconf()
        try:
            if op == "list":
                return entrypoints.list_entrypoints(module)
            if op == "help":
                return entrypoints.entrypoint_doc(module, model)
            return deferred.run_entrypoint(entrypoints.find_entrypoint(module, model), args, kwargs,
                                           self.deferred_init)
        except HUBCONF_EXCEPTIONS as exc:
            raise _Failure("hubconf", exc) from None

    # -- one request --------------------------------------------------------------------------------
    def decode_request(self, header: dict, body: bytes, fds: List[int]) -> Tuple[Optional[dict], tuple, dict,
                                                                                Optional[bytes]]:
        try:
            table = header.get("table") or []
            arrays = transfer.unpack(fds[0] if fds else None, int(header.get("size", 0)), table)
            fds.clear()
            settings, args, kwargs, rng = byvalue.decode(body, arrays, table)
            return settings, tuple(args), dict(kwargs), rng
        except Exception as exc:
            raise _Failure("transfer", TransferError(
                f"the arguments could not be rebuilt in the worker: {type(exc).__name__}: {exc}")) from None

    def begin_call(self, header: dict, body: bytes, fds: List[int]) -> Tuple[tuple, dict]:
        """Decode a list/help/load request and take on the caller's settings and random state for it;
        returns its arguments."""
        settings, args, kwargs, rng = self.decode_request(header, body, fds)
        if settings is not None:
            call = context.CallSettings.from_wire(settings)
            context.adopt(call)
            self.deferred_init = call.settings.deferred_init
            mapping.install([call.settings.hub_dir])  # oneflow.load maps what the hub cache holds
            checkpoints.install_weights_files_loader([call.settings.hub_dir])  # ... and reads torch files
        if rng:
            byvalue.set_rng_state(rng)
        return args, kwargs

    def handle(self, header: dict, body: bytes, fds: List[int]) -> None:
        if header.get("mode") == "proxy":
            return self.proxies.handle(header, body, fds)
        op, model = header.get("op"), header.get("model")
        packed: Optional[transfer.Packed] = None
        try:
            if op not in OPS or header.get("mode", "rebuild") != "rebuild":
                raise _Failure("transfer", ValueError(f"unsupported worker request {op!r} / {header.get('mode')!r}"))
            args, kwargs = self.begin_call(header, body, fds)
            result = self.run(op, model, args, kwargs)
            del args, kwargs
            self.modules.refresh()
            try:
                encoded = byvalue.encode((result, byvalue.rng_state(), context.take_weights_log()))
                del result
                # tensors that are bytes of a cached checkpoint file go as references to it, not as bytes
                refs = weightrefs.match(encoded.arrays, encoded.meta, mapping.take_loaded())
                arrays, meta, files = weightrefs.split(encoded.arrays, encoded.meta, refs)
                packed = transfer.pack(arrays, name="flowhub-result")
            except Exception as exc:
                raise _Failure("transfer", TransferError(
                    f"the result of {model or op!r} cannot be sent back by value "
                    f"({type(exc).__name__}: {exc}); use mode=\"proxy\" to keep it in the worker")) from None
            table = [dict(entry, **info) for entry, info in zip(packed.table, meta)]
            protocol.send_message(self.sock, {"ok": True, "size": packed.size, "table": table, "files": files},
                                  encoded.blob, [packed.fd] if packed.fd is not None else [])
        except _Failure as failure:
            self._send_failure(failure)
        except Exception as exc:  # outside hubconf code (settings, our own loop): report, then retire
            self._send_failure(_Failure("hubconf", exc, fatal=True))
        finally:
            protocol.close_fds(fds)
            if packed is not None:
                packed.close()

    def _send_failure(self, failure: _Failure) -> None:
        self.modules.refresh()
        info, blob = failures.describe(failure.exc, self.modules.is_repo_module)
        protocol.send_message(self.sock, {"ok": False, "kind": failure.kind, "error": info,
                                          "fatal": failure.fatal}, blob)

    def serve(self) -> None:
        """Answer requests until the caller closes the socket."""
        while True:
            try:
                header, body, fds = protocol.recv_message(self.sock)
                self.handle(header, body, fds)
            except (protocol.PeerClosed, ConnectionError):  # the caller is gone or dropped us
                return
            del body


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def main(sock_fd: int, spec: dict) -> None:
    """Entry point of a freshly forked worker; never returns (ends with ``os._exit``)."""
    code = 0
    try:
        sock = socket.socket(fileno=sock_fd)
        if spec.get("sandbox"):  # already locked down by the zygote (flowhub.worker.proc.sandbox_child)
            from flowhub.worker.proc import sandbox_child, weights_task

            if spec.get("task") == "weights":  # a one-shot weights-only load
                return weights_task.serve(sock, spec)
            sandbox_child.attach(sock)  # downloads are made by the caller
        WorkerLoop(sock, spec["repo_dir"], bool(spec.get("mock_torch"))).serve()
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # a bug in this loop, not in hubconf code: say so, then exit
        import traceback

        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
