"""Byte ranges of a file served over HTTP (RFC 9110 section 14): which span a ``Range``
header asks for, and the copy of that span to the client."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Final, Literal

__all__ = ["UNSATISFIABLE", "byte_range", "copy_span"]

_CHUNK = 256 * 1024
_RANGE_SPEC = re.compile(r"([0-9]*)-([0-9]*)")  # ASCII digits only (not "²", not "٣")
_RANGE_DIGITS = 18  # a position of more digits is beyond any file served here
_BEYOND = 10**_RANGE_DIGITS


UNSATISFIABLE: Final = "unsatisfiable"


def byte_range(header: str | None, size: int) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """RFC 9110 section 14: the inclusive (start, end) a ``Range`` header asks of ``size``
    bytes (answered 206, even when that is the whole file), :data:`UNSATISFIABLE`
    (answered 416, ``bytes */size``), or None when the header is ignored (200, the whole
    file).

    Ignored: no header, or one that is not a single valid ``bytes`` range: another unit,
    a syntax error, ``N-M`` with M < N, or several ranges (a server may ignore a Range
    header; devices ask for one range to resume). Positions are ASCII digits, read up to
    18 of them (more is beyond any file); a start at or past the end, or a suffix of 0
    bytes, is unsatisfiable; an end past it is the end, and a suffix longer than the file
    is all of it (section 14.1.2).
    """
    unit, sep, ranges = (header or "").strip().partition("=")
    specs = [r.strip(" \t") for r in ranges.split(",")] if sep else []
    specs = [r for r in specs if r]  # empty list elements are allowed, and ignored
    if unit.lower() != "bytes" or len(specs) != 1 or size == 0:
        return None
    match = _RANGE_SPEC.fullmatch(specs[0])
    if match is None or not (match.group(1) or match.group(2)):
        return None
    first, last = (_position(g) if g else None for g in match.groups())
    if first is None:  # a suffix: the last N bytes
        return UNSATISFIABLE if not last else (max(size - last, 0), size - 1)
    if last is not None and last < first:
        return None  # invalid: ignored
    if first >= size:
        return UNSATISFIABLE
    return first, size - 1 if last is None else min(last, size - 1)


def _position(digits: str) -> int:
    """A position of a range; one of more digits than any file has stands for "beyond"."""
    return _BEYOND if len(digits) > _RANGE_DIGITS else int(digits)


def copy_span(path: Path, start: int, length: int, out: Any) -> None:
    """Write ``length`` bytes of ``path`` from ``start`` to ``out`` (fewer if it ends first)."""
    with path.open("rb") as source:
        source.seek(start)
        while length > 0:
            chunk = source.read(min(_CHUNK, length))
            if not chunk:
                return
            out.write(chunk)
            length -= len(chunk)
