"""What every route needs to know: the served ROOT and the archive cache."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flowhub.server.git import ArchiveCache


@dataclass
class Site:
    """The served folder and its shared archive cache."""

    root: Path
    archives: ArchiveCache
