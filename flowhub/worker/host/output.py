"""What sandboxed workers print, relayed by the caller: prefixed, sanitised and capped.

A sandboxed worker never holds the caller's stdout or stderr (a hubconf could flood the terminal,
or truncate and rewrite a log the caller's output is redirected to). Its fds 1 and 2 are pipes that
one background thread of the caller reads (:class:`OutputRelay`): each line goes to the caller's
``sys.stdout`` / ``sys.stderr`` as ``[label] text``, with control characters shown escaped (no
terminal escape sequences get through), until the worker's budget for the current call is spent;
the rest is read and dropped, with one line saying how much.
"""
from __future__ import annotations

import os
import re
import selectors
import sys
import threading
from typing import Dict, Optional, Tuple

_READ = 1 << 16
_MAX_LINE = 4096
#: Control characters but tab and newline, C1 controls too: shown escaped (``\x1b``), never sent raw.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitise(text: str) -> str:
    """``text`` with every control character except tab and newline (C1 controls too) escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class _Stream:
    def __init__(self, fd: int, label: str, target: str, budget: "_Budget") -> None:
        self.fd, self.label, self.target, self.budget = fd, label, target, budget
        self.pending = b""


class _Budget:
    def __init__(self, limit: int) -> None:
        self.limit, self.used, self.dropped, self.told = limit, 0, 0, False


class OutputRelay:
    """Reads the output pipes of every sandboxed worker on one daemon thread."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._budgets: Dict[int, _Budget] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: Optional[threading.Thread] = None

    def pipes(self, key: int, label: str, limit: int) -> Tuple[int, int]:
        """New stdout and stderr pipes for worker ``key`` (its pid once known: see :meth:`rekey`);
        returns their write ends, which the caller hands to the worker and then closes."""
        budget = _Budget(limit)
        ends = []
        with self._lock:
            self._budgets[key] = budget
            for target in ("stdout", "stderr"):
                r, w = os.pipe()
                os.set_blocking(r, False)
                self._selector.register(r, selectors.EVENT_READ, _Stream(r, label, target, budget))
                ends.append(w)
        self._start()
        self._poke()
        return ends[0], ends[1]

    def rekey(self, old: int, new: int) -> None:
        with self._lock:
            if old in self._budgets:
                self._budgets[new] = self._budgets.pop(old)

    def begin_call(self, key: int) -> None:
        """A new call to worker ``key`` starts: its output budget starts afresh."""
        with self._lock:
            budget = self._budgets.get(key)
            if budget is not None:
                budget.used, budget.dropped, budget.told = 0, 0, False

    def forget(self, key: int) -> None:
        with self._lock:
            self._budgets.pop(key, None)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="flowhub-output-relay", daemon=True)
                self._thread.start()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                stream = key.data
                if stream is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                self._read(stream)

    def _read(self, stream: _Stream) -> None:
        try:
            chunk = os.read(stream.fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # every writer is gone: flush what is left, then stop watching
            if stream.pending:
                self._emit(stream, stream.pending + b"\n")
            with self._lock:
                self._selector.unregister(stream.fd)
            os.close(stream.fd)
            return
        data = stream.pending + chunk
        cut = data.rfind(b"\n") + 1
        if not cut and len(data) >= _MAX_LINE:
            cut = len(data)
        stream.pending = data[cut:]
        if cut:
            self._emit(stream, data[:cut])

    def _emit(self, stream: _Stream, data: bytes) -> None:
        budget = stream.budget
        room = max(budget.limit - budget.used, 0)
        shown, budget.used = data[:room], budget.used + min(len(data), room)
        budget.dropped += len(data) - len(shown)
        target = getattr(sys, stream.target)
        lines = shown.decode("utf-8", errors="replace").splitlines()
        text = "".join(f"[{stream.label}] {sanitise(line)}\n" for line in lines)
        if budget.dropped and not budget.told:
            budget.told = True
            text += (f"[{stream.label}] flowhub: further output of this call is dropped "
                     f"(over {budget.limit} bytes; FLOWHUB_SANDBOX_MAX_OUTPUT)\n")
        if text:
            try:
                target.write(text)
                target.flush()
            except Exception:  # a closed or broken caller stream: the worker's output is lost, not us
                pass


_relay: Optional[OutputRelay] = None
_relay_lock = threading.Lock()


def relay() -> OutputRelay:
    """The process's relay (made on first use)."""
    global _relay
    with _relay_lock:
        if _relay is None:
            _relay = OutputRelay()
        return _relay


def _forget_after_fork() -> None:
    global _relay, _relay_lock
    _relay, _relay_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
