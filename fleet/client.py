"""The typed Python client of the controller's REST API; the CLI uses it for every call.

One method per operation of the contract (``fleet/openapi.json``; the browser's page and
event stream aside), each returning the typed dicts of :mod:`edgefleet.fleet.api_types`::

    from edgefleet.fleet.client import FleetClient

    client = FleetClient("http://127.0.0.1:8600", token="...")
    pushed = client.push(Path("digits-1.1.0.efb"))
    rollout = client.create_rollout("digits:1.1.0", {"selectors": ["group:cams"],
                                                    "waves": ["10%", "100%"]})
    print(client.rollout(rollout["id"])["state"])

An answer of the controller that is an error raises one error per status family, carrying
the server's message and hint (:func:`error_for_status`); a controller that cannot be
reached raises :class:`ApiError` (transient). Over ``urllib`` only: no extra dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, cast
from urllib.parse import quote, urlencode, urlsplit

from edgefleet.fleet.api_types import (
    Alerts,
    AuditEntry,
    Device,
    DriftPolicies,
    DriftPolicy,
    Health,
    Keyring,
    KeyringPublished,
    ModelVersion,
    Overview,
    PushResult,
    Removal,
    Rollout,
    RolloutOptions,
    RolloutSummary,
    SavedGroup,
    TokenInfo,
)
from edgefleet.fleet.errors import (
    ApiError,
    AuthError,
    ConflictError,
    FleetError,
    ForbiddenError,
    InvalidRolloutError,
    NotFoundError,
    RefusedError,
    UnavailableError,
)

__all__ = ["CA_ENV", "FleetClient", "error_for_status"]

CA_ENV = "EDGEFLEET_CA"  # the CA that signed the controller's HTTPS certificate

_SEND_CHUNK = 256 * 1024
_JSON, _BYTES = "application/json", "application/octet-stream"
_BY_STATUS: dict[int, type[FleetError]] = {
    400: InvalidRolloutError, 401: AuthError, 403: ForbiddenError, 404: NotFoundError,
    405: RefusedError, 409: ConflictError, 411: RefusedError, 413: RefusedError,
    416: RefusedError, 422: RefusedError, 503: UnavailableError}


class FleetClient:
    """Calls the controller at ``url`` with ``token``; errors come back as FleetErrors."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0,
                 ca_file: Path | str | None = None) -> None:
        """``ca_file`` (default ``$EDGEFLEET_CA``) checks an ``https://`` controller."""
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s
        self._tls = _tls_context(ca_file or os.environ.get(CA_ENV) or None)

    # --- public: no token needed -------------------------------------------------------

    def health(self) -> Health:
        """``GET /healthz``: the controller answers, with the fleet's counts."""
        return cast(Health, self._expect(self.get("/healthz"), dict))

    def openapi(self) -> dict[str, Any]:
        """``GET /openapi.json``: the API's contract, as the controller serves it."""
        return cast(dict[str, Any], self._expect(self.get("/openapi.json"), dict))

    def metrics(self) -> str:
        """``GET /metrics``: Prometheus text."""
        return self.download("/metrics").decode("utf-8", "replace")

    def bundle(self, sha256: str) -> bytes:
        """``GET /bundles/{sha256}.efb``: a pushed bundle's bytes."""
        return self.download(f"/bundles/{_segment(sha256)}.efb")

    def delta(self, base: str, target: str) -> bytes:
        """``GET /deltas/{from}-{to}``: a delta the controller built (docs/deltas.md)."""
        return self.download(f"/deltas/{_segment(base)}-{_segment(target)}")

    # --- the fleet, its devices -------------------------------------------------------

    def overview(self) -> Overview:
        return cast(Overview, self._expect(self.get("/api/v1/overview"), dict))

    def devices(self) -> list[Device]:
        return cast(list[Device], self._expect(self.get("/api/v1/devices"), list))

    def set_group(self, devices: list[str], group: str | None) -> list[Device]:
        """Put ``devices`` in ``group`` (``None``: out of theirs); the devices as they are now."""
        body = {"devices": devices, "group": group}
        return cast(list[Device], self._expect(self.post("/api/v1/devices/group", body), list))

    def tag(self, device: str, add: list[str] | None = None,
            remove: list[str] | None = None) -> Device:
        body = {"add": add or [], "remove": remove or []}
        return cast(Device, self._expect(
            self.post(f"/api/v1/devices/{_segment(device)}/tags", body), dict))

    def label_device(self, device: str, set_labels: dict[str, str] | None = None,
                     remove: list[str] | None = None) -> Device:
        """Set and remove operator labels of a device (selectors read them)."""
        body = {"set": set_labels or {}, "remove": remove or []}
        return cast(Device, self._expect(
            self.post(f"/api/v1/devices/{_segment(device)}/labels", body), dict))

    def remove_device(self, device: str) -> Removal:
        """Decommission one device (docs/fleet.md, "Device lifecycle")."""
        return cast(Removal, self._expect(
            self.delete(f"/api/v1/devices/{_segment(device)}"), dict))

    def remove_devices(self, devices: list[str], stale_s: int | None = None) -> Removal:
        """Decommission several devices; with ``stale_s``, only those still stale."""
        body: dict[str, Any] = {"devices": devices}
        if stale_s is not None:
            body["stale_s"] = stale_s
        return cast(Removal, self._expect(self.post("/api/v1/devices/remove", body), dict))

    def stale_devices(self, stale_s: int) -> list[Device]:
        """Offline devices not heard from for ``stale_s`` seconds."""
        return cast(list[Device], self._expect(
            self.get(f"/api/v1/devices?stale_s={int(stale_s)}"), list))

    # --- dynamic groups ---------------------------------------------------------------

    def groups(self) -> list[SavedGroup]:
        return cast(list[SavedGroup], self._expect(self.get("/api/v1/groups"), list))

    def create_group(self, name: str, where: str) -> SavedGroup:
        """Save a selector as a dynamic group (rollouts use it as ``group:NAME``)."""
        return cast(SavedGroup, self._expect(
            self.post("/api/v1/groups", {"name": name, "where": where}), dict))

    def delete_group(self, name: str) -> dict[str, str]:
        return cast(dict[str, str], self._expect(
            self.post(f"/api/v1/groups/{_segment(name)}/delete"), dict))

    # --- who calls ----------------------------------------------------------------------

    def whoami(self) -> TokenInfo:
        """The calling token's name and role."""
        return cast(TokenInfo, self._expect(self.get("/api/v1/whoami"), dict))

    def tokens(self) -> list[TokenInfo]:
        """Every token's name and role (admin), never a secret."""
        return cast(list[TokenInfo], self._expect(self.get("/api/v1/tokens"), list))

    # --- model versions ---------------------------------------------------------------

    def models(self) -> list[ModelVersion]:
        return cast(list[ModelVersion], self._expect(self.get("/api/v1/models"), list))

    def model(self, name: str, version: str) -> ModelVersion:
        """One pushed version (``NAME:VERSION``) as :meth:`models` lists it."""
        for entry in self.models():
            if entry["name"] == name and entry["version"] == version:
                return entry
        raise NotFoundError(f"no model {name}:{version} in the registry",
                            hint="see 'edgefleet fleet models'; push it with 'edgefleet fleet "
                                 "push BUNDLE'")

    def push(self, bundle: Path) -> PushResult:
        """Upload a signed ``.efb``, streamed from disk; the controller verifies it first."""
        return cast(PushResult, self._expect(self.upload_file("/api/v1/models", bundle), dict))

    # --- rollouts ---------------------------------------------------------------------

    def rollouts(self) -> list[RolloutSummary]:
        return cast(list[RolloutSummary], self._expect(self.get("/api/v1/rollouts"), list))

    def rollout(self, rollout_id: str) -> Rollout:
        return cast(Rollout, self._expect(
            self.get(f"/api/v1/rollouts/{_segment(rollout_id)}"), dict))

    def create_rollout(self, model: str, options: RolloutOptions) -> Rollout:
        """Start a staged rollout of ``model`` (``NAME:VERSION``); every option is checked
        before anything is stored, a refused one named by the error."""
        body = {"model": model, **options}
        return cast(Rollout, self._expect(self.post("/api/v1/rollouts", body), dict))

    def pause_rollout(self, rollout_id: str) -> Rollout:
        return self._operate(rollout_id, "pause")

    def resume_rollout(self, rollout_id: str) -> Rollout:
        return self._operate(rollout_id, "resume")

    def abort_rollout(self, rollout_id: str) -> Rollout:
        return self._operate(rollout_id, "abort")

    def rollback_rollout(self, rollout_id: str) -> Rollout:
        return self._operate(rollout_id, "rollback")

    def rollback_group(self, group: str) -> list[RolloutSummary]:
        """Roll back every rollout that touched ``group``."""
        return cast(list[RolloutSummary], self._expect(
            self.post("/api/v1/rollback", {"group": group}), list))

    def _operate(self, rollout_id: str, verb: str) -> Rollout:
        return cast(Rollout, self._expect(
            self.post(f"/api/v1/rollouts/{_segment(rollout_id)}/{verb}"), dict))

    # --- history, keys, drift ---------------------------------------------------------

    def history(self, limit: int = 100, target: str | None = None,
                action: str | None = None) -> list[AuditEntry]:
        """The newest ``limit`` entries, newest first (only ``target``'s, and only of
        ``action`` such as ``api.refused``, if given)."""
        query = urlencode({"limit": limit, **({"target": target} if target else {}),
                           **({"action": action} if action else {})})
        return cast(list[AuditEntry], self._expect(self.get(f"/api/v1/history?{query}"), list))

    def keyring(self) -> Keyring:
        return cast(Keyring, self._expect(self.get("/api/v1/keyring"), dict))

    def publish_keyring(self, document: bytes, force: bool = False) -> KeyringPublished:
        """Send ``keyring.json``'s bytes; ``force`` past devices a dropped key signed for."""
        path = "/api/v1/keyring?force=1" if force else "/api/v1/keyring"
        return cast(KeyringPublished, self._expect(
            self._call("POST", path, document, _JSON), dict))

    def alerts(self) -> Alerts:
        return cast(Alerts, self._expect(self.get("/api/v1/alerts"), dict))

    def drift_policies(self) -> DriftPolicies:
        return cast(DriftPolicies, self._expect(self.get("/api/v1/drift"), dict))

    def set_drift_policy(self, model: str, psi: float | None = None,
                         min_samples: int | None = None, clear_after: int | None = None,
                         reset: bool = False) -> DriftPolicy:
        """Change the fields given (the others keep their value), or ``reset`` them all."""
        body: dict[str, Any] = {"reset": True} if reset else {
            k: v for k, v in (("psi", psi), ("min_samples", min_samples),
                              ("clear_after", clear_after)) if v is not None}
        return cast(DriftPolicy, self._expect(
            self.post(f"/api/v1/drift/{_segment(model)}", body), dict))

    # --- raw calls (any path) ---------------------------------------------------------

    def get(self, path: str) -> Any:
        return self._call("GET", path, None, _JSON)

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, json.dumps(body or {}).encode(), _JSON)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path, None, "application/json")

    def upload(self, path: str, data: bytes) -> Any:
        return self._call("POST", path, data, _BYTES)

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
            raise error_for_status(status, raw, "the controller refused the upload: ")
        return json.loads(raw or b"null")

    def download(self, path: str) -> bytes:
        """Raw bytes (a bundle from ``/bundles/<sha256>.efb``)."""
        raw: bytes = self._call("GET", path, None, _JSON, parse=False)
        return raw

    def _expect(self, data: Any, kind: type) -> Any:
        """``data`` if it is a ``kind`` (list or dict), else an error naming what came."""
        if not isinstance(data, kind):
            raise ApiError(f"the controller at {self.url} answered {type(data).__name__} "
                           f"where the API sends a {kind.__name__}",
                           hint="check --controller: is it an edgefleet controller?",
                           transient=False)
        return data

    def _stream(self, path: str, body: BinaryIO, size: int) -> tuple[int, bytes]:
        parts = urlsplit(self.url)
        conn = (http.client.HTTPSConnection(parts.netloc, timeout=self.timeout_s,
                                            context=self._tls or ssl.create_default_context())
                if parts.scheme == "https"
                else http.client.HTTPConnection(parts.netloc, timeout=self.timeout_s))
        try:
            conn.putrequest("POST", f"{parts.path}{path}")
            for name, value in self._headers(_BYTES, size).items():
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

    def _call(self, method: str, path: str, data: bytes | None, content_type: str,
              parse: bool = True) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s,
                                        context=self._tls) as response:
                body: bytes = response.read()
        except urllib.error.HTTPError as exc:
            raise error_for_status(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from exc
        return self._parsed(path, body) if parse else body

    def _parsed(self, path: str, body: bytes) -> Any:
        try:
            return json.loads(body or b"null")
        except ValueError as exc:
            raise ApiError(f"the controller at {self.url} answered {path} with no JSON: {exc}",
                           hint="check --controller: is it an edgefleet controller?",
                           transient=False) from exc

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


def error_for_status(status: int, raw: bytes, prefix: str = "") -> FleetError:
    """The error an answer with ``status`` raises, one class per family (400 invalid, 401
    token, 403 role, 404 unknown, 409 conflict, 405/411/413/416/422 refused, 503 retry
    later, any other: :class:`ApiError`), with the server's message and hint."""
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = prefix + str(body.get("error") or f"HTTP {status}")
    hint = str(body.get("hint") or "")
    if status == 403:
        return ForbiddenError(message, role=str(body.get("role") or ""), hint=hint)
    return _BY_STATUS.get(status, ApiError)(message, hint=hint, transient=status >= 500)


def _segment(value: str) -> str:
    """A path parameter, percent-encoded whole (a '/' in it cannot reach another route)."""
    return quote(value, safe="")


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
