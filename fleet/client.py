"""The CLI's side of the REST API: one small client over ``urllib`` (no extra dependency)."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from edgefleet.fleet.errors import (
    ApiError,
    AuthError,
    ConflictError,
    FleetError,
    ForbiddenError,
    InvalidRolloutError,
    NotFoundError,
)

__all__ = ["CA_ENV", "FleetClient"]

CA_ENV = "EDGEFLEET_CA"  # the CA that signed the controller's HTTPS certificate

_SEND_CHUNK = 256 * 1024
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

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path, None, "application/json")

    def upload(self, path: str, data: bytes) -> Any:
        return self._call("POST", path, data, "application/octet-stream")

    def upload_file(self, path: str, source: Path) -> Any:
        """``source`` streamed as the body, never read whole. A refusal the controller sends
        before it reads the body (413, 422) is reported as such, not as a broken pipe."""
        try:
            with open(source, "rb") as body:
                status, raw = self._stream(path, body, os.fstat(body.fileno()).st_size)
        except OSError as exc:  # the controller's side is an ApiError by now
            raise FleetError(f"cannot read {source}: {exc.strerror}",
                             hint="pass the path of an .efb file") from exc
        if status >= 400:
            raise _error_from(status, raw, "the controller refused the upload: ")
        return json.loads(raw or b"null")

    def _stream(self, path: str, body: BinaryIO, size: int) -> tuple[int, bytes]:
        parts = urlsplit(self.url)
        conn = (http.client.HTTPSConnection(parts.netloc, timeout=self.timeout_s,
                                            context=self._tls or ssl.create_default_context())
                if parts.scheme == "https"
                else http.client.HTTPConnection(parts.netloc, timeout=self.timeout_s))
        try:
            conn.putrequest("POST", f"{parts.path}{path}")
            for name, value in self._headers("application/octet-stream", size).items():
                conn.putheader(name, value)
            conn.endheaders()
            _send(conn, body)
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from exc
        finally:
            conn.close()

    def _headers(self, content_type: str, size: int) -> dict[str, str]:
        headers = {"Content-Type": content_type, "Content-Length": str(size)}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

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
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: Exception) -> ApiError:
        if isinstance(getattr(exc, "reason", exc), ssl.SSLCertVerificationError):
            return ApiError(f"the controller at {self.url} has a certificate this client "
                            f"does not trust: {exc}",
                            hint=f"set {CA_ENV} to the fleet CA's certificate (ca.crt), "
                                 "and dial a host name the certificate lists",
                            transient=False)
        return ApiError(f"cannot reach the controller at {self.url}: {exc}",
                        hint="start it with 'edgefleet fleet serve', or pass --controller "
                             "URL / set EDGEFLEET_CONTROLLER")


def _tls_context(ca_file: Path | str | None) -> ssl.SSLContext | None:
    if ca_file is None:
        return None  # urllib's default: the system's CAs
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ValueError) as exc:
        raise ApiError(f"cannot use the CA file {ca_file}: {exc}",
                       hint=f"set {CA_ENV} to the fleet CA's certificate (ca.crt from "
                            "'edgefleet certs ca')", transient=False) from exc


def _send(conn: http.client.HTTPConnection, body: BinaryIO) -> None:
    """The body in chunks; a controller that answered early and hung up stops the sending
    (its answer is then read), it is no failure of its own."""
    try:
        while chunk := body.read(_SEND_CHUNK):
            conn.send(chunk)
    except (BrokenPipeError, ConnectionResetError):
        return  # the controller refused before reading it all: getresponse() has its answer


def _error(exc: urllib.error.HTTPError) -> FleetError:
    return _error_from(exc.code, exc.read())


def _error_from(code: int, raw: bytes, prefix: str = "") -> FleetError:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = prefix + str(body.get("error") or f"HTTP {code}")
    hint = str(body.get("hint") or "")
    if code == 403:
        return ForbiddenError(message, role=str(body.get("role") or ""), hint=hint)
    cls = _BY_STATUS.get(code, ApiError)
    return cls(message, hint=hint, transient=code >= 500)
