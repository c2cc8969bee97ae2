"""Reading a request's head: its line, its headers, and the lengths they announce.

Lengths are ASCII digits and nothing else (``str.isdigit`` also takes ``"²"``);
two different values of one length header are refused (a proxy in front may have
read the other one); every bound is checked here, before the body is read.
"""

from __future__ import annotations

import io
from typing import NamedTuple

from edgefleet.agent.serving.errors import IncompleteRequestError, RequestError
from edgefleet.agent.serving.limits import HttpLimits

__all__ = ["HEADER_LENGTH", "MAX_LINE", "Lengths", "lengths", "read_headers", "request_line"]

HEADER_LENGTH = "inference-header-content-length"
MAX_LINE = 65536
MAX_HEAD = 65536  # bytes of headers, all lines together
MAX_HEADERS = 100
_SINGLE = frozenset({"content-length", HEADER_LENGTH, "transfer-encoding"})
_ENDS = (b"\r\n", b"\n", b"")
_HUGE = 10**18  # what a length of more than 18 digits counts as: over any bound
_BINARY_HINT = ("send tensors as binary data (the binary tensor extension: "
                "Inference-Header-Content-Length), or fewer at a time")


class Lengths(NamedTuple):
    """The body's length and, for a binary request, its JSON header's length (a tuple:
    made on every request, and a frozen dataclass costs a few µs to make)."""

    body: int
    header: int | None


def request_line(line: bytes) -> tuple[str, str, str]:
    """Method, target and version of a request line."""
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        if len(line) >= MAX_LINE:
            raise RequestError(f"request line longer than {MAX_LINE - 1} bytes", status=414)
        if not line.endswith(b"\n"):
            raise IncompleteRequestError("the request line ended before its line end")
        raise RequestError(f"malformed request line {line[:60]!r}")
    return parts[0], parts[1], parts[2]


def read_headers(rfile: io.BufferedIOBase) -> dict[str, str]:
    """The headers up to the blank line, names lower-cased (a name with blanks around it
    is no name the server knows: it is kept as it came, and so never read)."""
    headers: dict[str, str] = {}
    size = 0
    for _ in range(MAX_HEADERS):
        line = rfile.readline(MAX_LINE)
        if line in _ENDS:
            if line:
                return headers
            raise IncompleteRequestError("the headers ended before the blank line after them")
        size += len(line)
        name, sep, value = line.decode("latin-1").partition(":")
        key = name.lower()
        if not sep or key in headers or size >= MAX_HEAD:  # one test on the common path
            _odd_header(line, key, value.strip(), headers, size)
        headers[key] = value.strip()
    raise _too_many()


def _too_many() -> RequestError:
    return RequestError(f"request headers over {MAX_HEADERS} lines or {MAX_HEAD - 1} bytes",
                        status=431)


def _odd_header(line: bytes, key: str, value: str, headers: dict[str, str], size: int) -> None:
    """Refuse a header line over the bounds, without a colon, repeating a length with
    another value, or a second Authorization; let any other repeated header through (the
    last one counts)."""
    if size >= MAX_HEAD:
        raise _too_many()
    if b":" not in line:
        raise RequestError(f"malformed header line {line[:40]!r}")
    if key in _SINGLE and headers[key] != value:
        raise RequestError(f"two different {key} headers", hint="send one")
    if key == "authorization":  # a proxy reading the first and this server the last disagree
        raise RequestError("two Authorization headers", hint="send one")


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
    if body > limits.max_body:
        _over(body, limits.max_body, "body", "--http-max-body", "")
    raw_header = headers.get(HEADER_LENGTH)
    if raw_header is None:
        if body > limits.max_json:
            _over(body, limits.max_json, "JSON body", "--http-max-json", _BINARY_HINT)
        return Lengths(body, None)
    header = _digits(raw_header, "Inference-Header-Content-Length")
    if header > limits.max_json:
        _over(header, limits.max_json, "JSON header", "--http-max-json", "")
    if not 0 < header <= body:
        raise RequestError(f"Inference-Header-Content-Length {header} does not fit "
                           f"a body of {body} bytes")
    return Lengths(body, header)


def _digits(raw: str, name: str) -> int:
    if raw.isdigit() and raw.isascii():
        return int(raw) if len(raw) <= 18 else _HUGE
    raise RequestError(f"{name} {raw[:40]!r} is not a byte count (ASCII digits only)")


def _over(size: int, limit: int, what: str, option: str, hint: str) -> None:
    shown = f"{size} bytes" if size < _HUGE else "more than 10^18 bytes"
    raise RequestError(f"{what} of {shown} is over this server's {limit}-byte limit "
                       f"(agent run {option})", hint=hint, status=413)
