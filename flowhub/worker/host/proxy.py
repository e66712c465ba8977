"""The caller's side of proxy mode: :class:`Proxy` handles to objects that stay in their worker.

``Hub(mode="proxy").load(...)`` (or ``FLOWHUB_MODE=proxy``) runs the entrypoint in the repository's
worker and keeps its result there; the caller gets a :class:`Proxy`. Every use of the proxy is one
round trip over the worker's socket (see :mod:`flowhub.worker.proc.objects` for the requests):

* what comes back is decoded from the restricted JSON form of :mod:`flowhub.worker.wire.codec` (plain
  values, tensors from a sealed memfd whose table is validated first, and refs, which become new
  proxies): the caller never unpickles anything a proxy-mode worker sent;
* arguments go the same way; an argument the form cannot express (a caller-side dataclass, a
  function) is pickled by the caller, which trusts itself, and unpickled by the worker.

A :class:`Connection` is the caller's state for one worker process: its live proxies by ref (the
same ref gives the same proxy), the names of each remote type's methods, and the releases waiting
to be sent. A proxy's ``weakref.finalize`` only queues a release and sends it at once if the
worker's lock is free (without waiting), else it rides on the next request to that worker: it
never blocks, so it cannot deadlock with a call in progress, and it does nothing once the worker is
gone. The worker keeps a handout count per ref, so a release that crosses a new handout of the same
object is harmless.
"""
from __future__ import annotations

import base64
import collections
import os
import weakref
from typing import NamedTuple, Any, Dict, List, Optional

from flowhub.errors import ProxyError, StaleProxyError, TransferError

__all__ = ["Proxy", "ProxyError", "StaleProxyError", "remote_type", "remote_isinstance", "worker_stats"]

_MISSING = object()


class RemoteType(NamedTuple):
    """What a proxy knows of its object's type, from the worker's description of it."""

    type_name: str  # module.qualname, for messages and repr
    type_id: int  # the connection's id of the type (its method names are in ``Connection.types``)
    callable: bool
    always_true: bool  # the type has neither __bool__ nor __len__
    shadowed: frozenset  # method names the instance shadows with attributes of its own


class Proxy:
    """A handle to an object that lives in a worker process (``mode="proxy"``).

    Forwarded to the worker, one round trip each:

    * attribute reads (``p.training``, ``p.fc.out_features``, ``p.cfg.width``), calls (``p(x)``),
      method calls with positional and keyword arguments (``p.eval()``, ``p.to("cpu")``,
      ``p.state_dict()``), ``p[i]`` (``p.features[0]``), ``len(p)``, ``iter(p)`` / ``next``,
      ``x in p``, ``bool(p)``, ``repr(p)`` and ``dir(p)``;
    * what comes back: ``None``, bools, numbers and strings, lists, tuples and dicts (with scalar
      keys) of values, bytes, devices and dtypes are returned as values; oneflow tensors and numpy
      arrays come back as real caller-side tensors and arrays (copies, through shared memory, on
      the CPU); anything else comes back as a new proxy for that object (``callable(p)`` says
      whether it is callable). An object returned again (``p.eval()`` returns ``p``) comes back as
      the same proxy. ``parameters()``, ``named_parameters()``, ``buffers()``, ``children()``,
      ``modules()`` and their ``named_`` forms return lists, not generators;
    * arguments: the same values, tensors and arrays through shared memory, proxies of the same
      worker by reference; anything else (a caller-side dataclass, a function) is pickled here and
      unpickled by the worker;
    * ``p.eval`` for a method of the remote object's class is looked up when it is called, so
      ``p.eval()`` is one round trip too.

    Limits (the proxy is for inference):

    * No autograd across the boundary: returned tensors are detached (``requires_grad`` is False,
      so ``p(x).sum().backward()`` raises oneflow's "does not require grad" error), and an input
      tensor that is part of an autograd graph (``requires_grad`` and not an ``nn.Parameter``) raises
      :class:`ProxyError` while grad mode is on; detach it or call under ``oneflow.no_grad()``.
      Parameters (``state_dict()`` of a caller-side model) cross as plain data.
    * A proxy is not a module: ``isinstance(p, nn.Module)`` is False (:func:`remote_isinstance`
      asks the worker), hooks cannot be added, and it cannot be given to an optimizer
      (``flow.optim.SGD(p, lr=...)`` raises ``TypeError``) or to ``nn.Graph``. ``p.parameters()``
      returns copies; an optimizer over them would train the copies, never the worker's model.
    * Tensors that come back are copies: changing them in place does not change the worker's object.
      Change it through its methods (``p.load_state_dict(sd)``).
    * Attributes cannot be set or deleted (``p.x = 1`` raises ``AttributeError``), nor items
      (``TypeError``): call a method of the object instead.
    * Special attributes (``p.__dict__``, ``p.__doc__``) are not forwarded; ``type(p)`` is a proxy
      class (:func:`remote_type` names the remote type). Proxies cannot be pickled or copied.
    * Calls draw random numbers from the worker's generator, not the caller's; a proxy-mode load
      sends the caller's generator state (so ``manual_seed`` before ``load`` initialises the model
      as in-process) but does not take the worker's state back.
    * A proxy is valid as long as its worker lives. A worker holding live proxies is not reaped for
      idleness nor evicted for ``max_workers``; but if it crashes or times out, if its
      ``hubconf.py`` changes on disk and a new load replaces it, or at ``shutdown()``, every later
      use raises :class:`StaleProxyError`. A forked child cannot use its parent's proxies.
    * Every call uses the ``worker_timeout`` of the last proxy-mode load from that worker.
    """

    __slots__ = ("_flowhub_conn", "_flowhub_ref", "_flowhub_info", "_flowhub_count", "__weakref__")

    # -- attribute access ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_flowhub_") or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(name)
        conn, info = self._flowhub_conn, self._flowhub_info
        if name in conn.types.get(info.type_id, ()) and name not in info.shadowed:
            return RemoteMethod(self, name)  # called with one round trip ("callmethod")
        return conn.request(self, {"op": "getattr", "name": name}, f".{name}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot set .{name} on a proxy of {_short(self)}: the object lives in a worker "
                             f"process and its attributes are read-only from here; call one of its methods instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete .{name} of a proxy of {_short(self)}: the object lives in a worker process")

    def __dir__(self) -> List[str]:
        names = self._flowhub_conn.request(self, {"op": "dir"}, ".__dir__()")
        return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []

    # -- containers and iteration -----------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        return self._flowhub_conn.request(self, {"op": "getitem"}, "[...]", key=key)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise TypeError(f"cannot assign items of a proxy of {_short(self)}: the object lives in a worker process")

    def __delitem__(self, key: Any) -> None:
        raise TypeError(f"cannot delete items of a proxy of {_short(self)}: the object lives in a worker process")

    def __len__(self) -> int:
        n = self._flowhub_conn.request(self, {"op": "len"}, " len()")
        if type(n) is not int or n < 0:
            raise TransferError(f"len() of a proxy of {_short(self)} came back as {n!r:.50}")
        return n

    def __contains__(self, item: Any) -> bool:
        return bool(self._flowhub_conn.request(self, {"op": "contains"}, " in", key=item))

    def __iter__(self) -> Any:
        return self._flowhub_conn.request(self, {"op": "iter"}, " iter()")

    def __bool__(self) -> bool:
        if self._flowhub_info.always_true:  # neither __bool__ nor __len__
            return True
        return self._flowhub_conn.request(self, {"op": "bool"}, " bool()") is True

    # -- description --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        try:
            described = self._flowhub_conn.request(self, {"op": "describe"}, " repr()")
            return str(described["repr"])
        except Exception as exc:  # a repr must not raise: the worker may be gone
            return f"<flowhub.Proxy of {remote_type(self)} (unavailable: {type(exc).__name__})>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(f"a proxy of {_short(self)} cannot be pickled or copied: its object lives in a worker process")


class CallableProxy(Proxy):
    """A :class:`Proxy` of a callable object: ``p(*args, **kwargs)`` calls it in the worker."""

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._flowhub_conn.request(self, {"op": "call"}, "(...)", args, kwargs)


class IteratorProxy(Proxy):
    """A :class:`Proxy` of an iterator: ``next(p)`` advances it in the worker."""

    __slots__ = ()

    def __next__(self) -> Any:
        return self._flowhub_conn.request(self, {"op": "next"}, " next()")


class _CallableIteratorProxy(CallableProxy, IteratorProxy):
    __slots__ = ()


_CLASSES = {(False, False): Proxy, (True, False): CallableProxy, (False, True): IteratorProxy,
            (True, True): _CallableIteratorProxy}


class RemoteMethod:
    """``p.name`` for a method of the remote object's class: calling it is one round trip."""

    __slots__ = ("__self__", "__name__")

    def __init__(self, proxy: Proxy, name: str) -> None:
        self.__self__, self.__name__ = proxy, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = self.__self__
        return proxy._flowhub_conn.request(proxy, {"op": "callmethod", "name": self.__name__}, f".{self.__name__}()",
                                           args, kwargs)

    def __repr__(self) -> str:
        return f"<remote method {_short(self.__self__)}.{self.__name__} (flowhub proxy)>"

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a remote method of a proxy cannot be pickled or copied")


def remote_type(proxy: Proxy) -> str:
    """The qualified name of the type of the object ``proxy`` stands for (no round trip)."""
    return object.__getattribute__(proxy, "_flowhub_info").type_name


def remote_isinstance(obj: Any, classinfo: Any) -> bool:
    """``isinstance`` that sees through proxies: for a :class:`Proxy`, whether the remote object's
    class or one of its bases has the qualified name of ``classinfo`` (a class or a tuple of
    classes; one round trip). For anything else, plain ``isinstance``."""
    if not isinstance(obj, Proxy):
        return isinstance(obj, classinfo)
    classes = classinfo if isinstance(classinfo, tuple) else (classinfo,)
    mro = object.__getattribute__(obj, "_flowhub_conn").request(obj, {"op": "mro"}, " mro")
    names = {f"{c.__module__}.{c.__qualname__}" for c in classes}
    return isinstance(mro, list) and any(name in names for name in mro)


def worker_stats(proxy: Proxy) -> Dict[str, int]:
    """How many objects the proxy's worker keeps for the caller (``objects``) and how many handouts of
    them the caller holds (``handouts``); pending releases are applied first. For tests and debugging."""
    stats = object.__getattribute__(proxy, "_flowhub_conn").request(None, {"op": "stats"}, "stats")
    return {k: int(v) for k, v in stats.items()}


def _short(proxy: Any) -> str:
    try:
        return remote_type(proxy).rsplit(".", 1)[-1]
    except Exception:
        return "an object"


def _check_input(tensor: Any) -> None:
    import oneflow as flow

    if tensor.requires_grad and flow.is_grad_enabled() and not isinstance(tensor, flow.nn.Parameter):
        raise ProxyError("a tensor that requires grad was passed to a proxy: gradients do not cross to the worker "
                         "process (outputs come back detached). Pass x.detach(), or call under oneflow.no_grad().")


def _text(node: dict, key: str, limit: int = 1000) -> str:
    value = node.get(key)
    if type(value) is not str or len(value) > limit:
        raise TransferError(f"ref node field {key!r} is not a string of acceptable length")
    return value


def _names(node: dict, key: str) -> frozenset:
    value = node.get(key, [])
    if type(value) is not list or len(value) > 100_000 or not all(type(v) is str for v in value):
        raise TransferError(f"ref node field {key!r} is not a list of names")
    return frozenset(value)


class Connection:
    """The caller's state for one worker process in proxy mode (made by the manager, used by proxies)."""

    def __init__(self, manager: Any, worker: Any, timeout: Optional[float]) -> None:
        self.manager, self.worker = manager, worker
        self.gen, self.pid, self.label = worker.gen, worker.pid, worker.label
        self.owner = os.getpid()
        self.timeout = timeout
        self.proxies: "weakref.WeakValueDictionary[int, Proxy]" = weakref.WeakValueDictionary()
        self.types: Dict[int, frozenset] = {}
        self.pending: "collections.deque[List[int]]" = collections.deque()
        from flowhub.worker.wire import transfer

        self.outbox, self.inbox = transfer.Outbox("flowhub-args"), transfer.Inbox()  # large payloads, both ways

    def live(self) -> bool:
        """Whether the caller still holds proxies of this worker's objects."""
        return len(self.proxies) > 0

    def take_releases(self) -> List[List[int]]:
        items = []
        while True:
            try:
                items.append(self.pending.popleft())
            except IndexError:
                return items

    def _released(self, ref: int, count: List[int]) -> None:
        """A proxy's finalizer: queue its release, then send it if that needs no waiting."""
        try:
            self.pending.append([ref, count[0]])
            self.manager.flush_releases(self)
        except Exception:  # never raise from a finalizer (the worker may be gone, the interpreter ending)
            pass

    # -- requests -----------------------------------------------------------------------------------
    def request(self, proxy: Optional[Proxy], header: dict, what: str, args: Optional[tuple] = None,
                kwargs: Optional[dict] = None, key: Any = _MISSING) -> Any:
        """Send one proxy-mode request about ``proxy``'s object and return the decoded value."""
        from flowhub.worker.wire import codec

        context = f"{_short(proxy) if proxy is not None else 'proxy'}{what} of {self.label}"
        if proxy is not None:
            header["ref"] = object.__getattribute__(proxy, "_flowhub_ref")
        encoder = codec.Encoder(self._argument, _check_input)
        if args is not None:
            header["args"] = encoder.encode(list(args))
        if kwargs:
            header["kwargs"] = encoder.encode(dict(kwargs))
        if key is not _MISSING:
            header["key"] = encoder.encode(key)
        return self.manager.proxy_request(self, header, encoder.arrays, context)

    def _argument(self, obj: Any) -> dict:
        """An argument without a value form: a proxy of this worker goes as its ref, others are pickled."""
        if isinstance(obj, Proxy):
            if object.__getattribute__(obj, "_flowhub_conn") is not self:
                raise ProxyError(f"a proxy of {_short(obj)} was passed to another worker (or to a newer process "
                                 f"of the same one); proxies can only be passed back to the worker holding them")
            return {"t": "ref", "r": object.__getattribute__(obj, "_flowhub_ref")}
        if isinstance(obj, RemoteMethod):
            raise ProxyError("a remote method cannot be passed as an argument; pass the proxy itself")
        import cloudpickle

        try:
            blob = cloudpickle.dumps(obj, protocol=5)
        except Exception as exc:
            raise TransferError(f"an argument of type {type(obj).__name__} cannot be sent to the worker "
                                f"({type(exc).__name__}: {exc})") from None
        return {"t": "pickle", "v": base64.b64encode(blob).decode("ascii")}

    # -- replies (called by the manager with the worker's lock held) -----------------------------------
    def decode(self, reply: dict, fds: List[int], context: str, body: bytes = b"") -> Any:
        """Validate and map the reply's tensors (from its memfd, or its body when small), then rebuild its
        value (refs become proxies)."""
        from flowhub.worker.wire import codec

        try:
            arrays, copied = self.inbox.unpack(reply, fds, body)
            return codec.Decoder(arrays, self._proxy_for, copy=copied).decode(reply.get("value"))
        except TransferError as exc:
            raise TransferError(f"{context}: {exc}") from None
        except Exception as exc:
            raise TransferError(f"{context}: the worker's reply is malformed ({type(exc).__name__}: {exc})") from None

    def _proxy_for(self, node: dict) -> Proxy:
        ref = node.get("r")
        if type(ref) is not int or ref <= 0:
            raise TransferError(f"bad object ref {ref!r:.20}")
        proxy = self.proxies.get(ref)
        if proxy is not None:
            object.__getattribute__(proxy, "_flowhub_count")[0] += 1
            return proxy
        tid = node.get("ty")
        flags = [node.get(k) for k in ("call", "it", "truth")]
        if type(tid) is not int or not all(type(f) is bool for f in flags):
            raise TransferError("malformed ref node")
        info = RemoteType(_text(node, "type"), tid, flags[0], flags[2], _names(node, "sh"))
        if "m" in node:
            self.types[tid] = _names(node, "m")
        cls = _CLASSES[(flags[0], flags[1])]
        proxy = object.__new__(cls)
        count = [1]
        for name, value in (("_flowhub_conn", self), ("_flowhub_ref", ref), ("_flowhub_info", info),
                            ("_flowhub_count", count)):
            object.__setattr__(proxy, name, value)
        self.proxies[ref] = proxy
        weakref.finalize(proxy, self._released, ref, count).atexit = False
        return proxy

    def check(self, context: str) -> None:
        """Raise :class:`StaleProxyError` unless this connection's worker process still serves it."""
        if os.getpid() != self.owner:
            raise StaleProxyError(f"{context}: proxies belong to the process that loaded them, not to a forked child")
        worker = self.worker
        if worker.dead or worker.gen != self.gen:
            why = worker.ended.get(self.gen, "has ended")
            raise StaleProxyError(f"{context}: the object lived in worker process {self.pid}, which {why}; "
                                  f"load it again to get a new proxy")
