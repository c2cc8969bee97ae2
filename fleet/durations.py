"""How long ago, as an operator writes it: ``90s``, ``30m``, ``12h``, ``7d``, ``2w``, or
parts of them together (``1d12h``). Whole numbers of ASCII digits, each unit once at
most and from the largest down; from one second to ten years. Pure: ``ValueError``
says what is wrong, the caller adds where it came from.
"""

from __future__ import annotations

import re

__all__ = ["MAX_AGE_S", "UNITS", "format_age", "parse_age"]

UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}
MAX_AGE_S = 3650 * 86_400
_PART = re.compile(r"([0-9]{1,10})([wdhms])")


def parse_age(text: str) -> int:
    """Seconds in ``text`` (``7d``, ``1d12h``, ``90m``)."""
    parts = _PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text[:40]!r} is not a duration: write it like 90s, 30m, 12h, "
                         "7d, 2w or 1d12h")
    units = [unit for _, unit in parts]
    order = list(UNITS)
    if [order.index(u) for u in units] != sorted({order.index(u) for u in units}):
        raise ValueError(f"{text[:40]!r}: give each unit once, largest first (1d12h, not "
                         "12h1d)")
    seconds = sum(int(number) * UNITS[unit] for number, unit in parts)
    if not 1 <= seconds <= MAX_AGE_S:
        raise ValueError(f"{text[:40]!r} is {seconds} s: a duration is from 1s to "
                         f"{MAX_AGE_S // 86_400}d")
    return seconds


def format_age(seconds: int) -> str:
    """The shortest text :func:`parse_age` reads back as ``seconds`` (``0s`` for 0)."""
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in UNITS.items():
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
