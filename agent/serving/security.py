"""Who may use the HTTP server: TLS, bearer tokens, client certificates.

With :class:`HttpSecurity` the server speaks HTTPS only, and every endpoint but the two
health probes (``/v2/health/live``, ``/v2/health/ready``) wants a caller that proves
who it is: a client certificate signed by ``client_ca`` (checked in the TLS handshake,
so a certificate of another CA ends the connection there) or ``Authorization: Bearer
TOKEN`` with one of ``tokens``, compared in constant time. Model metadata is guarded
too: it names the model, its version and its tensors. A caller without either is
answered 401 with ``WWW-Authenticate: Bearer``.
"""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent.serving.errors import HttpSetupError

__all__ = ["MIN_TOKEN", "OPEN_PATHS", "HttpSecurity", "tls_context"]

MIN_TOKEN = 16  # characters: shorter tokens are guessable
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
_CERT_HINT = ("pass a server certificate and its own key ('edgefleet certs server --name "
              "DEVICE-https --host NAME'); a device certificate is a client certificate only")


@dataclass(frozen=True)
class HttpSecurity:
    """HTTPS with ``cert_file``/``key_file``; callers proven by ``tokens`` (bearer) or by a
    client certificate from ``client_ca``. With neither, TLS only: anyone may call."""

    cert_file: Path
    key_file: Path
    client_ca: Path | None = None
    tokens: tuple[bytes, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        short = [t for t in self.tokens if len(t) < MIN_TOKEN]
        if short:
            raise HttpSetupError(f"{len(short)} bearer token(s) shorter than {MIN_TOKEN} "
                                 "characters", hint="use random tokens, e.g. "
                                 "'python -c \"import secrets; print(secrets.token_urlsafe())\"'")

    @property
    def guarded(self) -> bool:
        """Whether callers must prove who they are (a token or a client CA was given)."""
        return bool(self.tokens) or self.client_ca is not None

    def accepts(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header value carries one of the tokens (each
        compared in constant time, all of them every time)."""
        scheme, _, given = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not self.tokens:
            return False
        token = given.strip().encode("latin-1")
        found = False
        for known in self.tokens:
            found |= hmac.compare_digest(token, known)
        return found


def tls_context(security: HttpSecurity) -> ssl.SSLContext:
    """A TLS 1.2+ server context; asks for (without requiring) a client certificate
    when ``client_ca`` is set, so the health probes stay open to any client."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(security.cert_file), str(security.key_file))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise HttpSetupError(f"cannot serve HTTPS with {security.cert_file} and "
                             f"{security.key_file}: {exc}", hint=_CERT_HINT) from exc
    if security.client_ca is not None:
        _trust_clients(context, security.client_ca)
    return context


def _trust_clients(context: ssl.SSLContext, client_ca: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(client_ca))
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise HttpSetupError(f"cannot read the client CA {client_ca}: {exc}",
                             hint="pass the fleet CA's certificate (certs/ca.crt)") from exc
    context.verify_mode = ssl.CERT_OPTIONAL
