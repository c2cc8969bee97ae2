"""Reading a request's head: its line, its headers, and the lengths they announce.

Lengths are ASCII digits and nothing else (``str.isdigit`` also takes ``"²"``);
two different values of one length header are refused (a proxy in front may have
read the other one); every bound is checked here, before the body is read.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from agent.serving.errors import IncompleteRequestError, RequestError
from agent.serving.limits import HttpLimits

__all__ = ["HEADER_LENGTH", "MAX_LINE", "Lengths", "lengths", "read_headers", "request_line"]

HEADER_LENGTH = "inference-header-content-length"
MAX_LINE = 65536
MAX_HEAD = 65536  # bytes of headers, all lines together
MAX_HEADERS = 100
_SINGLE = frozenset({"content-length", HEADER_LENGTH, "transfer-encoding"})
_HUGE = 10**18  # what a length of more than 18 digits counts as: over any bound
_BINARY_HINT = ("send tensors as binary data (the binary tensor extension: "
                "Inference-Header-Content-Length), or fewer at a time")


@dataclass(frozen=True)
class Lengths:
    """The body's length and, for a binary request, its JSON header's length."""

    body: int
    header: int | None


def request_line(line: bytes) -> tuple[str, str, str]:
    """Method, target and version of a request line (with its line end)."""
    if not line.endswith(b"\n"):
        if len(line) >= MAX_LINE:
            raise RequestError(f"request line longer than {MAX_LINE} bytes", status=414)
        raise IncompleteRequestError("the request line ended before its line end")
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise RequestError(f"malformed request line {line[:60]!r}")
    return parts[0], parts[1], parts[2]


def read_headers(rfile: io.BufferedIOBase) -> dict[str, str]:
    """The headers up to the blank line, names lower-cased."""
    headers: dict[str, str] = {}
    size = 0
    for _ in range(MAX_HEADERS):
        line = rfile.readline(MAX_LINE)
        if line in (b"\r\n", b"\n"):
            return headers
        size += len(line)
        if size > MAX_HEAD or len(line) == MAX_LINE:
            break
        if not line.endswith(b"\n"):
            raise IncompleteRequestError("the headers ended before the blank line after them")
        _header(line, headers)
    raise RequestError(f"request headers over {MAX_HEADERS} lines or {MAX_HEAD} bytes",
                       status=431)


def _header(line: bytes, headers: dict[str, str]) -> None:
    name, sep, value = line.decode("latin-1").partition(":")
    key = name.lower()
    if not sep or not name or name != name.strip():
        raise RequestError(f"malformed header line {line[:40]!r}")
    value = value.strip()
    if key in _SINGLE and headers.get(key, value) != value:
        raise RequestError(f"two different {name} headers", hint="send one")
    headers[key] = value


def lengths(headers: dict[str, str], method: str, limits: HttpLimits) -> Lengths:
    """The lengths the headers announce, each within its bound (else 400, 411, 413, 415)."""
    if "transfer-encoding" in headers:
        raise RequestError("chunked request bodies are not supported", status=411,
                           hint="send Content-Length")
    if headers.get("content-encoding", "identity").lower() != "identity":
        raise RequestError(f"Content-Encoding {headers['content-encoding'][:40]!r} is not "
                           "supported", status=415, hint="send the request uncompressed")
    raw = headers.get("content-length")
    if raw is None:
        if method == "POST":
            raise RequestError("Content-Length is required", status=411)
        return Lengths(0, None)
    body = _digits(raw, "Content-Length")
    _bound(body, limits.max_body, "body", "--http-max-body", "")
    raw_header = headers.get(HEADER_LENGTH)
    if raw_header is None:
        _bound(body, limits.max_json, "JSON body", "--http-max-json", _BINARY_HINT)
        return Lengths(body, None)
    header = _digits(raw_header, "Inference-Header-Content-Length")
    _bound(header, limits.max_json, "JSON header", "--http-max-json", "")
    if not 0 < header <= body:
        raise RequestError(f"Inference-Header-Content-Length {header} does not fit "
                           f"a body of {body} bytes")
    return Lengths(body, header)


def _digits(raw: str, name: str) -> int:
    if not (raw.isascii() and raw.isdigit()):
        raise RequestError(f"{name} {raw[:40]!r} is not a byte count (ASCII digits only)")
    return int(raw) if len(raw) <= 18 else _HUGE


def _bound(size: int, limit: int, what: str, option: str, hint: str) -> None:
    if size > limit:
        shown = f"{size} bytes" if size < _HUGE else "more than 10^18 bytes"
        raise RequestError(f"{what} of {shown} is over this server's {limit}-byte limit "
                           f"(agent run {option})", hint=hint, status=413)
