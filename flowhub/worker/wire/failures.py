"""How an exception raised by hubconf code crosses from a worker to the caller.

Worker side (:func:`describe`): the exception's type name, message and formatted traceback go in
the JSON reply. When the type is not defined by repository code, the exception itself is also
pickled *by reference* (plain pickle), so the caller can rebuild the very same type.

Caller side (:func:`rebuild`): unpickles that exception when its type is importable in the caller
(builtins, ``flowhub.errors``, installed libraries) and puts the repo label, the entrypoint and the
worker's traceback into its message; any other type becomes a ``HubconfError`` that names it.

Proxy mode never unpickles what a worker sent: there the worker sends the JSON description only
(``describe(..., pickled=False)``, which adds the type's module and qualified name, its plain
arguments and whether repository code defines it), and :func:`from_description` rebuilds the type
by name from modules already imported in the caller (nothing is imported for it), else
``HubconfError``.
"""
from __future__ import annotations

import os
import pickle
import sys
import traceback
import types
from typing import Callable, Optional, Tuple

from flowhub.errors import HubconfError
from flowhub.errors import WorkerTraceback  # noqa: F401  (re-exported: defined in errors.py)

_MAX_TRACEBACK = 64 << 10
_FLOWHUB = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MACHINERY = (os.path.join(_FLOWHUB, "worker") + os.sep, os.path.join(_FLOWHUB, "entrypoints.py"),
              "<frozen importlib")


def _skip_machinery(tb: Optional[types.TracebackType]) -> Optional[types.TracebackType]:
    """Drop the leading frames of the worker loop and the import system, if any frame remains."""
    first = tb
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_MACHINERY):
        tb = tb.tb_next
    return tb or first


def _importable_by_name(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    if module is None or "<locals>" in cls.__qualname__:
        return False
    obj = module
    for part in cls.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is cls


def describe(exc: BaseException, is_repo_module: Callable[[object], bool],
             pickled: bool = True) -> Tuple[dict, bytes]:
    """Worker side: ``({type, message, traceback, ...}, pickled exception or b"")`` (``pickled=False``:
    never a pickle, but the fields :func:`from_description` needs)."""
    cls = type(exc)
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not hide the failure itself
        message = f"<unprintable {cls.__name__}>"
    text = "".join(traceback.format_exception(cls, exc, _skip_machinery(exc.__traceback__)))
    if len(text) > _MAX_TRACEBACK:
        text = "...\n" + text[-_MAX_TRACEBACK:]
    info = {"type": f"{cls.__module__}.{cls.__qualname__}", "message": message, "traceback": text}
    blob = b""
    module = sys.modules.get(cls.__module__)
    if not pickled:
        args = list(exc.args) if isinstance(exc.args, tuple) else []
        try:  # a type whose constructor takes more than its message says so in __reduce__ (HTTPStatusError)
            reduced = exc.__reduce__()
            if isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[0] is cls and isinstance(reduced[1], tuple):
                args = list(reduced[1])
        except Exception:
            pass
        plain = all(type(a) in (str, int, float, bool, type(None)) for a in args)
        info.update(module=cls.__module__, qualname=cls.__qualname__, repo=bool(is_repo_module(module)),
                    args=args if plain and sum(len(str(a)) for a in args) <= _MAX_TRACEBACK else None)
        return info, blob
    if isinstance(exc, Exception) and _importable_by_name(cls) and not is_repo_module(module):
        try:
            blob = pickle.dumps(exc, protocol=5)
        except Exception:
            blob = b""
    return info, blob


def _with_message(exc: BaseException, full: str, label: str) -> BaseException:
    """Put ``full`` into ``exc``'s message if its type keeps a plain one-string message."""
    if isinstance(exc, KeyError) or not (len(exc.args) <= 1 and all(isinstance(a, str) for a in exc.args)):
        exc.__cause__ = WorkerTraceback(full)
        return exc
    old_args, old_msg = exc.args, getattr(exc, "msg", None)
    exc.args = (full,)
    if isinstance(old_msg, str):  # ImportError and SyntaxError print .msg, not .args
        try:
            exc.msg = full  # type: ignore[attr-defined]
        except AttributeError:
            pass
    try:
        if label in str(exc):
            return exc
    except Exception:
        pass
    exc.args = old_args
    exc.__cause__ = WorkerTraceback(full)
    return exc


def rebuild(info: dict, blob: bytes, context: str, label: str) -> BaseException:
    """Caller side: the exception to raise for a failure the worker described."""
    type_name = str(info.get("type", "Exception"))
    message = str(info.get("message", ""))
    tb = str(info.get("traceback", "")).rstrip()
    exc: Optional[BaseException] = None
    if blob:
        try:
            candidate = pickle.loads(blob)
            if isinstance(candidate, Exception):  # never SystemExit/KeyboardInterrupt: they would end the caller
                exc = candidate
        except Exception:
            exc = None
    if exc is not None:
        full = f"{message}\n\n[{context} raised this in its worker process]\nWorker traceback:\n{tb}"
        return _with_message(exc, full, label)
    return HubconfError(f"{context} raised {type_name}: {message}\n\nWorker traceback:\n{tb}")


def _text(value: object, limit: int = 1 << 20) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _class_by_name(module_name: str, qualname: str) -> Optional[type]:
    """An exception class already defined in this process, found without importing or running anything."""
    module = sys.modules.get(module_name)
    parts = qualname.split(".")
    if module is None or not all(p.isidentifier() and not p.startswith("__") for p in parts):
        return None
    obj: object = module
    for part in parts:
        try:
            obj = vars(obj).get(part)
        except TypeError:
            return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def from_description(info: object, context: str, label: str) -> BaseException:
    """Caller side, proxy mode: the exception to raise for a failure described in JSON alone.

    Its type is rebuilt by name when a module already imported here defines it (builtins,
    flowhub's errors, oneflow, installed libraries) and repository code does not; it gets the
    worker's plain arguments (or its message), then the context and traceback like :func:`rebuild`.
    Anything else becomes a ``HubconfError`` naming the type.
    """
    info = info if isinstance(info, dict) else {}
    type_name = _text(info.get("type"), 1000) or "Exception"
    message = _text(info.get("message"))
    tb = _text(info.get("traceback")).rstrip()
    exc: Optional[BaseException] = None
    cls = None
    if info.get("repo") is False:
        cls = _class_by_name(_text(info.get("module"), 1000), _text(info.get("qualname"), 1000))
    if cls is not None:
        args = info.get("args")
        plain = isinstance(args, list) and all(type(a) in (str, int, float, bool, type(None)) for a in args)
        attempts = [(cls, tuple(args))] if plain else []
        # then the message alone, for the type or the nearest base that takes it (numpy's
        # _ArrayMemoryError needs a shape and a dtype; MemoryError does not), so `except` clauses still match
        attempts += [(base, (message,)) for base in cls.__mro__ if issubclass(base, Exception)]
        for kind, attempt in attempts:
            try:
                candidate = kind(*attempt)
            except Exception:
                continue
            if isinstance(candidate, Exception):
                exc = candidate
                break
    if exc is not None:
        full = f"{message}\n\n[{context} raised this in its worker process]\nWorker traceback:\n{tb}"
        return _with_message(exc, full, label)
    return HubconfError(f"{context} raised {type_name}: {message}\n\nWorker traceback:\n{tb}")


def from_reply(reply: dict, body: bytes, context: str, label: str) -> BaseException:
    """Caller side, rebuild mode: the exception a failed reply stands for."""
    from flowhub.errors import TransferError

    info = reply.get("error") if isinstance(reply.get("error"), dict) else {}
    if reply.get("kind") == "transfer":
        return TransferError(f"{context}: {info.get('message', 'transfer failed')}")
    return rebuild(info, body, context, label)
