"""The bounds the HTTP server holds every connection and request to (``agent run --http-*``).

Each bound is answered before the work it guards: a body over its limit is refused
by its ``Content-Length`` (413) before a byte of it is read, JSON nested deeper than
``max_depth`` is refused (400) before it is parsed, and a connection that takes too
long to send a request is closed (408 when part of a request had arrived).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["JSON_WEIGHT", "HttpLimits", "MiB"]

MiB = 1024 * 1024
JSON_WEIGHT = 26  # Python objects per byte of JSON text, worst case measured: 25.2x for
#                   "[{},{},...]", 22.5x for "[[],[],...]", 9x for "[0.5,0.5,...]"


@dataclass(frozen=True)
class HttpLimits:
    """Sizes in bytes, times in seconds, rates in bytes a second.

    ``max_body``: any request body (binary tensor data included).
    ``max_json``: a JSON request body, or the JSON header of a binary request: parsed
    JSON takes several times its size in memory, so it has its own, smaller bound.
    ``timeout_s``: to send a request's line and headers, counted from when the server
    starts waiting for it (so an idle keep-alive connection is closed after it too).
    ``min_body_rate``: a body of ``n`` bytes must arrive within
    ``timeout_s + n / min_body_rate``; an answer must be taken up as fast.
    ``max_connections``: open at once; one more is answered 503 and closed.
    ``max_depth``: JSON nesting (objects and arrays), checked before parsing.
    """

    max_body: int = 16 * MiB
    max_json: int = 2 * MiB
    timeout_s: float = 10.0
    min_body_rate: int = 256 * 1024
    max_connections: int = 64
    max_depth: int = 64

    @property
    def in_flight(self) -> int:
        """Bytes the server holds at once for request bodies over 16 KiB, all connections
        together, a body's JSON counted ``JSON_WEIGHT`` times more (what parsing it may
        take): room for the largest binary request and the largest JSON one, or two of
        the largest binary ones (68 MiB with the defaults)."""
        return max(2 * self.max_body, self.max_body + JSON_WEIGHT * self.max_json)

    def body_seconds(self, size: int) -> float:
        """The time a body (or an answer) of ``size`` bytes may take."""
        return self.timeout_s + size / self.min_body_rate
