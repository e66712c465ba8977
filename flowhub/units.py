"""Sizes and ages as people write them (``2G``, ``512M``, ``30d``) and as we print them."""
from __future__ import annotations

import re

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1.5GiB``, ``1024`` → bytes; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size like 500M or 2G")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def parse_age(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``2w`` (a bare number is days) → seconds; ValueError otherwise."""
    t = text.strip().lower()
    try:
        return float(t[:-1]) * _AGE_UNITS[t[-1]] if t and t[-1] in _AGE_UNITS else float(t) * 86400
    except ValueError:
        raise ValueError(f"{text!r} is not an age like 30d, 12h or 2w") from None


def human_size(n: float) -> str:
    """Bytes as ``123 B``, ``4.5 MiB``, ``2.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
