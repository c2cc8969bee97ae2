"""The CLI's side of the REST API: one small client over ``urllib`` (no extra dependency)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from fleet.errors import ApiError, AuthError, ConflictError, InvalidRolloutError, NotFoundError

__all__ = ["FleetClient"]

_BY_STATUS = {401: AuthError, 404: NotFoundError, 409: ConflictError, 400: InvalidRolloutError}


class FleetClient:
    """Calls the controller at ``url`` with ``token``; errors come back as FleetErrors."""

    def __init__(self, url: str, token: str | None, timeout_s: float = 30.0) -> None:
        self.url, self.token, self.timeout_s = url.rstrip("/"), token, timeout_s

    def get(self, path: str) -> Any:
        return self._call("GET", path, None, "application/json")

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, json.dumps(body or {}).encode(), "application/json")

    def upload(self, path: str, data: bytes) -> Any:
        return self._call("POST", path, data, "application/octet-stream")

    def _call(self, method: str, path: str, data: bytes | None, content_type: str) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        request.add_header("Content-Type", content_type)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise _error(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"cannot reach the controller at {self.url}: {exc}",
                           hint="start it with 'edgefleet fleet serve', or pass --controller "
                                "URL / set EDGEFLEET_CONTROLLER") from exc


def _error(exc: urllib.error.HTTPError) -> Exception:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    message = str(body.get("error") or f"HTTP {exc.code}")
    hint = str(body.get("hint") or "")
    cls = _BY_STATUS.get(exc.code, ApiError)
    return cls(message, hint=hint, transient=exc.code >= 500)
