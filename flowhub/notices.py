"""Notices to the user ("Downloading: ...", "Using cache found in ..."), through ``logging``.

They go to the ``flowhub`` logger at INFO. Unless the application configures that logger itself, a
handler writing ``%(message)s`` to the current ``sys.stderr`` is attached on first use, so by default
the reference's messages appear where the reference prints them; set the logger's level (or its
handlers) to silence or redirect them.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("flowhub")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test capture, a redirected stream)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D401
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def notice(message: str) -> None:
    """Tell the user ``message`` (INFO on the ``flowhub`` logger)."""
    if not logger.handlers and logger.level == logging.NOTSET:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logger.info(message)
