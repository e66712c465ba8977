"""The one-shot worker of a weights-only load: unpickle a checkpoint here, send back only its tensors
and plain values (see :mod:`flowhub.worker.host.weights_only` for the caller's side)."""
from __future__ import annotations

import socket

from flowhub.errors import WeightsOnlyError
from flowhub.worker.wire import codec, protocol, transfer


def serve(sock: socket.socket, spec: dict) -> None:
    """Answer one ``{"op": "weights", "path"}`` request, then return."""
    header, _, fds = protocol.recv_message(sock)
    protocol.close_fds(fds)
    packed = None
    try:
        import oneflow as flow  # delayed: only the worker loads checkpoints

        path = header.get("path")
        if header.get("op") != "weights" or not isinstance(path, str):
            raise ValueError(f"bad weights-only request {header.get('op')!r:.40}")
        try:
            obj = flow.load(path, map_location="cpu")
        except Exception as exc:
            raise WeightsOnlyError(f"oneflow.load failed in the sandboxed worker: {type(exc).__name__}: {exc}") \
                from None
        encoder = codec.Encoder(other=codec.refuse_object)
        value = encoder.encode(obj)
        del obj
        packed = transfer.pack(encoder.arrays, name="flowhub-weights")
        reply = {"ok": True, "value": value, "size": packed.size, "table": packed.table}
        protocol.send_message(sock, reply, fds=[packed.fd] if packed.fd is not None else [])
    except Exception as exc:
        message = str(exc) if isinstance(exc, WeightsOnlyError) else f"{type(exc).__name__}: {exc}"
        protocol.send_message(sock, {"ok": False, "error": {"message": message[:1 << 16]}})
    finally:
        if packed is not None:
            packed.close()
