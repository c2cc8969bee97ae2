"""The CLI's side of the REST API: one small client over ``urllib`` (no extra dependency)."""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fleet.errors import ApiError, AuthError, ConflictError, InvalidRolloutError, NotFoundError

__all__ = ["CA_ENV", "FleetClient"]

CA_ENV = "EDGEFLEET_CA"  # the CA that signed the controller's HTTPS certificate

_BY_STATUS = {401: AuthError, 404: NotFoundError, 409: ConflictError, 400: InvalidRolloutError}


class FleetClient:
    """Calls the controller at ``url`` with ``token``; errors come back as FleetErrors."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0,
                 ca_file: Path | str | None = None) -> None:
        """``ca_file`` (default ``$EDGEFLEET_CA``) checks an ``https://`` controller."""
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self._tls = _tls_context(ca_file or os.environ.get(CA_ENV) or None)

    def get(self, path: str) -> Any:
        return self._call("GET", path, None, "application/json")

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, json.dumps(body or {}).encode(), "application/json")

    def upload(self, path: str, data: bytes) -> Any:
        return self._call("POST", path, data, "application/octet-stream")

    def download(self, path: str) -> bytes:
        """Raw bytes (a bundle from ``/bundles/<sha256>.efb``)."""
        raw: bytes = self._call("GET", path, None, "application/json", parse=False)
        return raw

    def model(self, name: str, version: str) -> dict[str, Any]:
        """One pushed version (``NAME:VERSION``) as ``GET /api/v1/models`` lists it."""
        for entry in self.get("/api/v1/models"):
            if entry["name"] == name and entry["version"] == version:
                return dict(entry)
        raise NotFoundError(f"no model {name}:{version} in the registry",
                            hint="see 'edgefleet fleet models'; push it with 'edgefleet fleet "
                                 "push BUNDLE'")

    def _call(self, method: str, path: str, data: bytes | None, content_type: str,
              parse: bool = True) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s,
                                        context=self._tls) as response:
                body = response.read()
                return json.loads(body or b"null") if parse else body
        except urllib.error.HTTPError as exc:
            raise _error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError):
                raise ApiError(f"the controller at {self.url} has a certificate this client "
                               f"does not trust: {exc}",
                               hint=f"set {CA_ENV} to the fleet CA's certificate (ca.crt), "
                                    "and dial a host name the certificate lists",
                               transient=False) from exc
            raise ApiError(f"cannot reach the controller at {self.url}: {exc}",
                           hint="start it with 'edgefleet fleet serve', or pass --controller "
                                "URL / set EDGEFLEET_CONTROLLER") from exc


def _tls_context(ca_file: Path | str | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None  # urllib's default: the system's CAs
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ValueError) as exc:
        raise ApiError(f"cannot use the CA file {ca_file}: {exc}",
                       hint=f"set {CA_ENV} to the fleet CA's certificate (ca.crt from "
                            "'edgefleet certs ca')", transient=False) from exc


def _error(exc: urllib.error.HTTPError) -> Exception:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    message = str(body.get("error") or f"HTTP {exc.code}")
    hint = str(body.get("hint") or "")
    cls = _BY_STATUS.get(exc.code, ApiError)
    return cls(message, hint=hint, transient=exc.code >= 500)
