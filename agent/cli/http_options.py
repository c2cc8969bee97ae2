"""The bounds of ``agent run --http``: body sizes, time a request may take, connections.

Defaults and what each bound answers are in :class:`agent.serving.limits.HttpLimits`
and docs/protocol.md (section "HTTP: KServe v2").
"""

from __future__ import annotations

from typing import Annotated

import typer

from agent.serving.limits import HttpLimits

__all__ = ["MAX_BODY", "MAX_CONNECTIONS", "MAX_JSON", "MIN_BODY_RATE", "TIMEOUT_S", "MaxBodyOpt",
           "MaxConnectionsOpt", "MaxJsonOpt", "MinBodyRateOpt", "TimeoutOpt", "http_limits"]

_DEFAULT = HttpLimits()

MaxBodyOpt = Annotated[int, typer.Option(
    "--http-max-body", min=1024, help="Largest request body in bytes (binary tensors "
    "included); larger is answered 413 before it is read")]
MaxJsonOpt = Annotated[int, typer.Option(
    "--http-max-json", min=1024, help="Largest JSON request body, or JSON header of a binary "
    "request, in bytes (parsed JSON takes several times its size in memory)")]
TimeoutOpt = Annotated[float, typer.Option(
    "--http-timeout", min=0.1, help="Seconds a connection has to send a request's line and "
    "headers (idle keep-alive connections are closed after it)")]
MinBodyRateOpt = Annotated[int, typer.Option(
    "--http-min-body-rate", min=1, help="Bytes a second a body must arrive at: a body of N "
    "bytes has --http-timeout + N / this seconds")]
MaxConnectionsOpt = Annotated[int, typer.Option(
    "--http-max-connections", min=1, help="Connections open at once; one more is answered "
    "503 and closed")]

MAX_BODY, MAX_JSON, TIMEOUT_S = _DEFAULT.max_body, _DEFAULT.max_json, _DEFAULT.timeout_s
MIN_BODY_RATE, MAX_CONNECTIONS = _DEFAULT.min_body_rate, _DEFAULT.max_connections


def http_limits(max_body: int, max_json: int, timeout_s: float, min_body_rate: int,
                max_connections: int) -> HttpLimits:
    """The limits the options give (a JSON bound over the body bound is the body bound)."""
    return HttpLimits(max_body=max_body, max_json=min(max_json, max_body), timeout_s=timeout_s,
                      min_body_rate=min_body_rate, max_connections=max_connections)
