"""Bundles and deltas for devices to download (no token): one Range of bytes (bytes=N-M,
N-, -K) is honoured, 416 when unsatisfiable (RFC 9110); the bytes served are counted."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from edgefleet.fleet.byte_ranges import UNSATISFIABLE, byte_range, copy_span
from edgefleet.fleet.deltas import DELTA_PATH
from edgefleet.fleet.errors import NotFoundError
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["bundle_file", "delta_file", "no_bundle", "no_delta"]

_BUNDLE = re.compile(r"^/bundles/([0-9a-f]{64})\.efb$")


def bundle_file(ex: Exchange, call: Call) -> None:
    sha256 = _bundle_sha(urlsplit(ex.path).path)
    path = ex.controller.bundle_path(sha256)
    if path is None or not path.exists():
        raise NotFoundError(f"no bundle {sha256[:12]}", hint="push it first")
    _send_file(ex, path, "bundle")


def delta_file(ex: Exchange, call: Call) -> None:
    """A delta this controller built (docs/deltas.md); a request never starts a build."""
    match = DELTA_PATH.match(urlsplit(ex.path).path)
    found = ex.controller.deltas.path(*match.groups()) if match else None
    if found is None:
        raise no_delta(urlsplit(ex.path).path)
    _send_file(ex, found, "delta")


def no_bundle(path: str) -> NotFoundError:
    return NotFoundError(f"no bundle {path[len('/bundles/'):][:80]!r}: bundles are "
                         "/bundles/{sha256}.efb (64 lowercase hex digits)",
                         hint="take the URL from the rollout's desired state")


def no_delta(path: str) -> NotFoundError:
    return NotFoundError(f"no delta {path[len('/deltas/'):][:80]!r}",
                         hint="download the full bundle (the device does so by itself)")


def _bundle_sha(path: str) -> str:
    """The sha256 a ``/bundles/`` path names; any other name there is no stored bundle."""
    match = _BUNDLE.match(path)
    if match is None:
        raise no_bundle(path)
    return match.group(1)


def _send_file(ex: Exchange, path: Path, kind: str) -> None:
    size = path.stat().st_size
    ranges = ex.headers.get_all("Range") or []
    span = byte_range(ranges[0], size) if len(ranges) == 1 else None  # two: both ignored
    if span == UNSATISFIABLE:
        return _unsatisfiable(ex, size)
    partial = isinstance(span, tuple)
    start, end = span if isinstance(span, tuple) else (0, max(size - 1, 0))
    ex.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
    ex.send_header("Content-Type", "application/octet-stream")
    ex.send_header("Accept-Ranges", "bytes")
    ex.send_header("Content-Length", str(end - start + 1))
    if partial:
        ex.send_header("Content-Range", f"bytes {start}-{end}/{size}")
    ex.end_headers()
    if ex.command == "HEAD":
        return
    copy_span(path, start, end - start + 1, ex.wfile)
    ex.controller.count_served(kind, end - start + 1)


def _unsatisfiable(ex: Exchange, size: int) -> None:
    """416 with ``Content-Range: bytes */size`` (RFC 9110 section 15.5.17)."""
    body = json.dumps({"error": f"the range asked for is not within the bundle's {size} "
                                "bytes", "hint": "ask for bytes=N- with N below the size",
                       "kind": "RangeNotSatisfiable"}).encode()
    ex.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
    ex.send_header("Content-Type", "application/json")
    ex.send_header("Content-Range", f"bytes */{size}")
    ex.send_header("Content-Length", str(len(body)))
    ex.end_headers()
    if ex.command != "HEAD":
        ex.wfile.write(body)
