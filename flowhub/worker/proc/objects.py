"""Inside a worker, proxy mode: the table of objects the caller holds proxies for, and their operations.

Requests carry ``"mode": "proxy"``; every reply is JSON plus raw tensor bytes, never a pickle::

    request  {"op": "list"|"help"|"load", "model", "size", "table"}   body and memfd as in rebuild mode
             {"op": "getattr", "ref", "name"}            {"op": "callmethod", "ref", "name", "args", "kwargs"}
             {"op": "call", "ref", "args", "kwargs"}     {"op": "getitem"|"contains", "ref", "key"}
             {"op": "len"|"iter"|"next"|"bool"|"describe"|"dir"|"mro", "ref"}     {"op": "stats"}
             {"op": "release"} (no reply)
             every request may carry "release": [[ref, count], ...], applied first; the
             arguments are value nodes (:mod:`flowhub.worker.wire.codec`) with their tensors in the memfd
    reply    {"ok": true, "value": node, "size", "table"[, "weights"]} + memfd of the tensors
             {"ok": true, "stop": true}                  (``next`` on an exhausted iterator)
             {"ok": false, "kind": "hubconf"|"transfer", "error": {...}, "fatal": bool}, no body

Objects without a value form are kept in an :class:`ObjectTable` under a *ref* and sent as a ref
node carrying their type, whether they are callable, iterators or always true, and (once per type)
the names of their class's methods, so the caller can call ``p.eval()`` in one round trip. A table entry counts
how often its ref was handed out; the caller releases each count it received, and the entry goes
when the count reaches zero, so a ref handed out again while a release is on its way stays valid.
"""
from __future__ import annotations

import inspect
import types
from typing import Any, Dict, List, Optional, Set, Tuple

from flowhub import context
from flowhub.errors import TransferError
from flowhub.worker.wire import codec, failures, protocol, transfer

OPS = ("list", "help", "load", "getattr", "call", "callmethod", "getitem", "contains", "len", "iter", "next",
       "bool", "describe", "dir", "mro", "stats", "release")
#: nn.Module methods that return generators: their items come back as a list (names, tensors, proxies).
LISTED = frozenset({"parameters", "named_parameters", "buffers", "named_buffers", "children", "named_children",
                    "modules", "named_modules"})
_METHOD_KINDS = (types.FunctionType, types.BuiltinFunctionType, types.MethodDescriptorType, classmethod, staticmethod)
_STOP = object()


class ObjectTable:
    """ref -> object with a count of handouts; one ref per object while it is in the table."""

    def __init__(self) -> None:
        self._entries: Dict[int, list] = {}
        self._by_id: Dict[int, int] = {}
        self._next = 1

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ref: Any) -> Any:
        entry = self._entries.get(ref) if type(ref) is int else None
        if entry is None:
            raise TransferError(f"no object with ref {ref!r:.20} in this worker (released already?)")
        return entry[0]

    def handout(self, obj: Any) -> Tuple[int, bool]:
        ref = self._by_id.get(id(obj))
        new = ref is None
        if new:
            ref = self._by_id[id(obj)] = self._next
            self._next += 1
            self._entries[ref] = [obj, 0]
        self._entries[ref][1] += 1
        return ref, new

    def release(self, ref: Any, count: Any) -> None:
        entry = self._entries.get(ref) if type(ref) is int else None
        if entry is None or type(count) is not int or count <= 0:
            return
        entry[1] -= count
        if entry[1] <= 0:
            del self._entries[ref]
            del self._by_id[id(entry[0])]

    def handouts(self) -> int:
        return sum(entry[1] for entry in self._entries.values())


def _method_names(cls: type) -> List[str]:
    names = []
    for name in dir(cls):
        if name.startswith("__"):
            continue
        try:
            attr = inspect.getattr_static(cls, name)
        except AttributeError:
            continue
        if isinstance(attr, _METHOD_KINDS):
            names.append(name)
    return names


class ObjectServer:
    """Answers proxy-mode requests for a :class:`flowhub.worker.proc.child.WorkerLoop`."""

    def __init__(self, loop: Any, failure: type) -> None:
        self.loop, self.failure = loop, failure
        self.table = ObjectTable()
        self._types: Dict[type, Tuple[int, frozenset]] = {}
        self._sent_types: Set[int] = set()
        self.outbox, self.inbox = transfer.Outbox("flowhub-proxy"), transfer.Inbox()  # large payloads

    # -- one request ------------------------------------------------------------------------------
    def handle(self, header: dict, body: bytes, fds: List[int]) -> None:
        releases = header.get("release")
        if isinstance(releases, list):
            for item in releases:
                if isinstance(item, list) and len(item) == 2:
                    self.table.release(item[0], item[1])
        op = header.get("op")
        if op == "release":
            protocol.close_fds(fds)
            return
        packed: Optional[transfer.Packed] = None
        handed: List[int] = []
        try:
            try:
                if op not in OPS:
                    raise self.failure("transfer", TransferError(f"unsupported proxy request {op!r:.50}"))
                value, extra = self._run(op, header, body, fds)
                if value is _STOP:
                    protocol.send_message(self.loop.sock, {"ok": True, "stop": True})
                    return
                try:
                    encoder = codec.Encoder(lambda obj: self._ref_node(obj, handed))
                    node = encoder.encode(value)
                    del value
                    packed, arena = self.outbox.pack(encoder.arrays)
                except Exception as exc:
                    raise self.failure("transfer", TransferError(
                        f"the result cannot be sent back ({type(exc).__name__}: {exc})")) from None
            except Exception as exc:
                for ref in handed:
                    self.table.release(ref, 1)
                failure = exc if isinstance(exc, self.failure) else self.failure("hubconf", exc, True)
                self._send_failure(failure)
                return
            reply = dict(extra, ok=True, value=node, size=packed.size, table=packed.table, **arena)
            protocol.send_message(self.loop.sock, reply, packed.inline, [packed.fd] if packed.fd is not None else [])
        finally:
            protocol.close_fds(fds)
            if packed is not None:
                packed.close()

    def _send_failure(self, failure: Any) -> None:
        self.loop.modules.refresh()
        info, _ = failures.describe(failure.exc, self.loop.modules.is_repo_module, pickled=False)
        protocol.send_message(self.loop.sock, {"ok": False, "kind": failure.kind, "error": info,
                                               "fatal": failure.fatal})

    # -- the operations ---------------------------------------------------------------------------
    def _run(self, op: str, header: dict, body: bytes, fds: List[int]) -> Tuple[Any, dict]:
        if op in ("list", "help", "load"):
            return self._entrypoint(op, header, body, fds)
        if op == "stats":
            return {"objects": len(self.table), "handouts": self.table.handouts()}, {}
        try:
            obj = self.table.get(header.get("ref"))
            args, kwargs, key = self._arguments(header, body, fds)
            name = header.get("name")
            if op in ("getattr", "callmethod") and not isinstance(name, str):
                raise TransferError("attribute name is not a string")
        except Exception as exc:
            raise self.failure("transfer", TransferError(f"bad proxy request: {exc}")) from None
        try:
            if op == "getattr":
                return getattr(obj, name), {}
            if op == "call":
                return obj(*args, **kwargs), {}
            if op == "callmethod":
                result = getattr(obj, name)(*args, **kwargs)
                if name in LISTED and isinstance(result, types.GeneratorType):
                    result = list(result)
                return result, {}
            if op == "getitem":
                return obj[key], {}
            if op == "contains":
                return key in obj, {}
            if op == "len":
                return len(obj), {}
            if op == "iter":
                return iter(obj), {}
            if op == "next":
                try:
                    return next(obj), {}
                except StopIteration:
                    return _STOP, {}
            if op == "bool":
                return bool(obj), {}
            if op == "describe":
                text = repr(obj)
                if len(text) > codec.MAX_REPR:
                    text = text[:codec.MAX_REPR - 3] + "..."
                return {"repr": text, "type": _type_name(type(obj))}, {}
            if op == "mro":
                return [_type_name(cls) for cls in type(obj).__mro__], {}
            return sorted(str(n) for n in dir(obj)), {}  # "dir"
        except (Exception, SystemExit, KeyboardInterrupt) as exc:  # hubconf code: reported, never our exit
            raise self.failure("hubconf", exc) from None

    def _arguments(self, header: dict, body: bytes, fds: List[int]) -> Tuple[list, dict, Any]:
        arrays, copied = self.inbox.unpack(header, fds, body)
        decoder = codec.Decoder(arrays, lambda node: self.table.get(node.get("r")), allow_pickle=True, copy=copied)
        args = decoder.decode(header.get("args", []))
        kwargs = decoder.decode(header["kwargs"]) if "kwargs" in header else {}
        key = decoder.decode(header.get("key"))
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise TransferError("arguments are not a list and a dict with string keys")
        return args, kwargs, key

    def _entrypoint(self, op: str, header: dict, body: bytes, fds: List[int]) -> Tuple[Any, dict]:
        args, kwargs = self.loop.begin_call(header, body, fds)
        result = self.loop.run(op, header.get("model"), args, kwargs)
        return result, ({"weights": context.take_weights_log()} if op == "load" else {})

    # -- refs -------------------------------------------------------------------------------------
    def _ref_node(self, obj: Any, handed: List[int]) -> dict:
        ref, _ = self.table.handout(obj)
        handed.append(ref)
        cls = type(obj)
        node: Dict[str, Any] = {"t": "ref", "r": ref}
        known = self._types.get(cls)
        if known is None:
            known = self._types[cls] = (len(self._types) + 1, frozenset(_method_names(cls)))
        tid, methods = known
        node.update(type=_type_name(cls), ty=tid, call=callable(obj), it=hasattr(cls, "__next__"),
                    truth=not (hasattr(cls, "__bool__") or hasattr(cls, "__len__")))
        if tid not in self._sent_types:
            node["m"] = sorted(methods)
            self._sent_types.add(tid)
        try:
            own = object.__getattribute__(obj, "__dict__")
            shadow = methods.intersection(own) if isinstance(own, dict) else ()
        except Exception:
            shadow = ()
        if shadow:
            node["sh"] = sorted(shadow)
        return node


def _type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"[:1000]
