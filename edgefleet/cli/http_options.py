"""The options of ``agent run --http``: bounds (body sizes, time, connections) and security.

Defaults and what each bound answers are in :class:`edgefleet.agent.serving.limits.HttpLimits`
and docs/protocol.md (section "HTTP: KServe v2"); TLS, tokens and client certificates
in :mod:`edgefleet.agent.serving.security` and docs/security.md. A token is never taken on the
command line (``ps`` shows it to every user): it comes from ``--http-token-file`` or
the ``EDGEFLEET_HTTP_TOKEN`` variable.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from edgefleet.agent.serving.errors import HttpSetupError
from edgefleet.agent.serving.limits import HttpLimits
from edgefleet.agent.serving.security import HttpSecurity, tls_context

__all__ = ["MAX_BODY", "MAX_CONNECTIONS", "MAX_JSON", "MIN_BODY_RATE", "TIMEOUT_S", "TOKEN_ENV",
           "ClientCaOpt", "MaxBodyOpt", "MaxConnectionsOpt", "MaxJsonOpt", "MinBodyRateOpt",
           "TimeoutOpt", "TlsCertOpt", "TlsKeyOpt", "TokenFileOpt", "http_limits",
           "http_security"]

TOKEN_ENV = "EDGEFLEET_HTTP_TOKEN"
log = logging.getLogger(__name__)

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


_FILE = {"exists": True, "dir_okay": False, "readable": True, "resolve_path": True}
TlsCertOpt = Annotated[Path | None, typer.Option(
    "--http-tls-cert", help="Serve HTTPS only, with this server certificate ('edgefleet certs "
    "server'); with --http-tls-key", **_FILE)]
TlsKeyOpt = Annotated[Path | None, typer.Option(
    "--http-tls-key", help="The HTTPS certificate's private key", **_FILE)]
TokenFileOpt = Annotated[Path | None, typer.Option(
    "--http-token-file", help=f"Bearer tokens that may call the API, one a line (or set "
    f"{TOKEN_ENV}); health probes stay open", **_FILE)]
ClientCaOpt = Annotated[Path | None, typer.Option(
    "--http-client-ca", help="Also let in clients with a certificate signed by this CA "
    "(the fleet CA's ca.crt); needs --http-tls-cert", **_FILE)]


def http_security(cert: Path | None, key: Path | None, token_file: Path | None,
                  client_ca: Path | None, host: str) -> HttpSecurity | None:
    """The security the options give, checked now (files that load, tokens that are long
    enough, no token sent in clear off this machine); None for plain, open HTTP."""
    if not host and any((cert, key, token_file, client_ca)):
        raise HttpSetupError("--http-tls-cert, --http-tls-key, --http-token-file and "
                             "--http-client-ca secure the HTTP server, which is off",
                             hint="pass --http HOST:PORT too")
    tokens = _tokens(token_file)
    if cert is None or key is None:
        _plain(cert, key, tokens, client_ca, token_file)
        return None
    security = HttpSecurity(cert, key, client_ca, tokens)
    tls_context(security)  # refuse files it cannot use before anything starts
    if not security.guarded:
        log.warning("HTTPS without --http-token-file or --http-client-ca: anyone who reaches "
                    "%s may run the model", host)
    return security


def _plain(cert: Path | None, key: Path | None, tokens: tuple[bytes, ...],
           client_ca: Path | None, token_file: Path | None) -> None:
    """Refuse options that need TLS without it."""
    if cert is not None or key is not None:
        raise HttpSetupError("HTTPS needs both --http-tls-cert and --http-tls-key",
                             hint="pass the certificate and its key")
    if client_ca is not None:
        raise HttpSetupError("--http-client-ca checks clients in the TLS handshake",
                             hint="pass --http-tls-cert and --http-tls-key too")
    if tokens:
        raise HttpSetupError(f"bearer tokens ({'--http-token-file' if token_file else TOKEN_ENV}) "
                             "would cross the network in clear over plain HTTP",
                             hint="pass --http-tls-cert and --http-tls-key")


def _tokens(path: Path | None) -> tuple[bytes, ...]:
    """The tokens of ``path`` (one a line; blank lines and ``#`` comments skipped), else
    of the environment variable; a file others may read is warned about."""
    if path is None:
        value = os.environ.get(TOKEN_ENV, "").strip()
        return (value.encode(),) if value else ()
    try:
        lines = path.read_text().splitlines()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise HttpSetupError(f"cannot read the token file {path}: {exc}",
                             hint="pass a text file with one token a line") from exc
    tokens = tuple(t.strip().encode() for t in lines if t.strip() and not t.startswith("#"))
    if not tokens:
        raise HttpSetupError(f"the token file {path} holds no token",
                             hint="write one token a line into it")
    if mode & 0o077:
        log.warning("%s may be read by other users: chmod 600 %s", path, path)
    return tokens
