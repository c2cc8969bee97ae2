"""The controller's HTTP server: the REST API the CLI uses, and the bundles devices download.

Standard library only (``ThreadingHTTPServer``). Endpoints::

    GET  /healthz                                   no token
    GET  /bundles/{sha256}.efb                      no token; Range (bytes=N-M) honoured
    GET  /metrics                                   no token; Prometheus text format
    GET  /  and  /dashboard/...                     no token; the live fleet page (static)
    GET  /api/v1/stream                             server-sent events for the dashboard
    GET  /api/v1/overview | devices | models | rollouts | history?limit=&target=
    GET  /api/v1/rollouts/{id}
    POST /api/v1/models                             body: the .efb bytes
    POST /api/v1/devices/group                      {"devices": [...], "group": G|null}
    POST /api/v1/devices/{id}/tags                  {"add": [...], "remove": [...]}
    POST /api/v1/rollouts                           {"model": "NAME:VERSION", ...options}
    POST /api/v1/rollouts/{id}/{pause|resume|abort|rollback}
    POST /api/v1/rollback                           {"group": G}

``/api`` needs ``Authorization: Bearer TOKEN`` (GET requests may pass ``?token=`` instead,
for a browser's EventSource); the token's name is the actor written in the audit history.
Errors are JSON ``{"error", "hint", "kind"}``; the status follows the error's class
(404 unknown, 409 conflict, 400 invalid, 401 token, 422 bundle refused).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socketserver
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.protocol.errors import BundleError, EdgefleetError
from fleet import dashboard
from fleet.controller import FleetController
from fleet.errors import AuthError, ConflictError, InvalidRolloutError, NotFoundError
from fleet.metrics import FleetMetrics

__all__ = ["ApiServer", "parse_tokens"]

log = logging.getLogger(__name__)
_BUNDLE = re.compile(r"^/bundles/([0-9a-f]{64})\.efb$")
_ROLLOUT = re.compile(r"^/api/v1/rollouts/([A-Za-z0-9_-]+)(?:/(pause|resume|abort|rollback))?$")
_TAGS = re.compile(r"^/api/v1/devices/([A-Za-z0-9._-]+)/tags$")
_MAX_BODY = 512 * 1024 * 1024
_CHUNK = 256 * 1024
_STATUS: list[tuple[type[EdgefleetError], HTTPStatus]] = [
    (NotFoundError, HTTPStatus.NOT_FOUND), (ConflictError, HTTPStatus.CONFLICT),
    (InvalidRolloutError, HTTPStatus.BAD_REQUEST), (AuthError, HTTPStatus.UNAUTHORIZED),
    (BundleError, HTTPStatus.UNPROCESSABLE_ENTITY)]


def parse_tokens(specs: list[str]) -> dict[str, str]:
    """``NAME=SECRET`` (or a bare ``SECRET``, named "default") -> {secret: name}."""
    tokens = {}
    for spec in specs:
        name, sep, secret = spec.partition("=")
        if not sep:
            name, secret = "default", spec
        if len(secret) < 8:
            raise AuthError(f"token {name!r} is shorter than 8 characters",
                            hint="use a long random secret: python -c 'import secrets; "
                                 "print(secrets.token_urlsafe())'")
        tokens[secret] = name
    return tokens


class ApiServer:
    """Serves one controller on ``host:port`` (0 picks a free port) from a thread."""

    def __init__(self, controller: FleetController, tokens: dict[str, str],
                 host: str = "127.0.0.1", port: int = 0) -> None:
        if not tokens:
            raise AuthError("the API needs at least one token",
                            hint="pass --token NAME=SECRET or set EDGEFLEET_TOKEN")
        self._httpd = _Server((host, port), controller, tokens)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._httpd.server_address[0]!s}:{self.port}"

    def start(self) -> ApiServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="edgefleet-api", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.stopping.set()  # ends open event streams
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], controller: FleetController,
                 tokens: dict[str, str]) -> None:
        super().__init__(address, _Handler)
        self.controller, self.tokens = controller, tokens
        self.metrics = FleetMetrics(controller)
        dashboard.attach(controller)  # device events are kept from the start
        self.stopping = threading.Event()

    def server_bind(self) -> None:  # no reverse DNS lookup of the host at bind time
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def c(self) -> FleetController:
        return self.server.controller

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_HEAD(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def _guard(self, handler: Callable[[str], None]) -> None:
        path = urlsplit(self.path).path
        try:
            handler(path)
        except EdgefleetError as exc:
            status = next((s for cls, s in _STATUS if isinstance(exc, cls)),
                          HTTPStatus.BAD_REQUEST)
            self._json({"error": exc.message, "hint": exc.hint, "kind": type(exc).__name__},
                       status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            log.exception("API request %s %s failed", self.command, self.path)
            self._json({"error": f"internal error: {type(exc).__name__}: {exc}",
                        "hint": "see the controller's log", "kind": "InternalError"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    # --- GET ----------------------------------------------------------------------------

    def _get(self, path: str) -> None:
        if path == "/healthz":
            return self._json({"ok": True, **self.c.overview(quality=False)})
        if match := _BUNDLE.match(path):
            return self._bundle(match.group(1))
        if path == "/metrics":
            return self._raw(*self.server.metrics.render())
        if path == "/" or path.startswith("/dashboard"):
            return self._dashboard(path)
        self._actor()
        query = parse_qs(urlsplit(self.path).query)
        if path == "/api/v1/overview":
            return self._json(self.c.overview())
        if path == "/api/v1/stream":
            return self._stream()
        if path == "/api/v1/devices":
            return self._json([d.as_dict() for d in self.c.devices()])
        if path == "/api/v1/models":
            return self._json([m.as_dict() for m in self.c.store.models()])
        if path == "/api/v1/rollouts":
            return self._json([r.summary() for r in self.c.rollouts()])
        if path == "/api/v1/history":
            limit = int(query.get("limit", ["100"])[0])
            target = query.get("target", [None])[0]
            return self._json([e.as_dict() for e in self.c.history(limit, target)])
        if (match := _ROLLOUT.match(path)) and not match.group(2):
            return self._json(self.c.rollout(match.group(1)).as_dict())
        raise NotFoundError(f"no such endpoint: GET {path}", hint="see docs/fleet.md")

    def _dashboard(self, path: str) -> None:
        if path in ("/", "/dashboard"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/dashboard/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        found = dashboard.static_file(path.removeprefix("/dashboard"))
        if found is None:
            raise NotFoundError(f"no such page: {path}", hint="open /dashboard/")
        self._raw(*found)

    def _stream(self) -> None:
        """Server-sent events until the client goes away or the server stops."""
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.close_connection = True

        def write(chunk: bytes) -> None:
            self.wfile.write(chunk)
            self.wfile.flush()

        dashboard.stream(self.c, write, self.server.stopping)

    def _raw(self, content_type: str, body: bytes) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _bundle(self, sha256: str) -> None:
        path = self.c.bundle_path(sha256)
        if path is None or not path.exists():
            raise NotFoundError(f"no bundle {sha256[:12]}", hint="push it first")
        size = path.stat().st_size
        start, end = _range(self.headers.get("Range"), size)
        partial = (start, end) != (0, size - 1)
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        _copy(path, start, end - start + 1, self.wfile)

    # --- POST ---------------------------------------------------------------------------

    def _post(self, path: str) -> None:
        actor = self._actor()
        if path == "/api/v1/models":
            model, added = self.c.push(self._body(), actor)
            return self._json({"model": model.as_dict(), "added": added},
                              HTTPStatus.CREATED if added else HTTPStatus.OK)
        body = self._json_body()
        if path == "/api/v1/rollouts":
            options = {k: v for k, v in body.items() if k != "model"}
            rollout = self.c.create_rollout(str(body.get("model", "")), options, actor)
            return self._json(rollout.as_dict(), HTTPStatus.CREATED)
        if (match := _ROLLOUT.match(path)) and match.group(2):
            return self._json(self.c.operate(match.group(1), match.group(2), actor).as_dict())
        if path == "/api/v1/rollback":
            done = self.c.rollback_group(str(body.get("group", "")), actor)
            return self._json([r.summary() for r in done])
        if path == "/api/v1/devices/group":
            devices = [str(d) for d in body.get("devices", [])]
            group = body.get("group")
            changed = self.c.set_group(devices, None if group is None else str(group), actor)
            return self._json([d.as_dict() for d in changed])
        if match := _TAGS.match(path):
            device = self.c.tag(match.group(1), [str(t) for t in body.get("add", [])],
                                [str(t) for t in body.get("remove", [])], actor)
            return self._json(device.as_dict())
        raise NotFoundError(f"no such endpoint: POST {path}", hint="see docs/fleet.md")

    # --- plumbing -----------------------------------------------------------------------

    def _actor(self) -> str:
        header = self.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header and self.command in ("GET", "HEAD"):
            scheme, secret = "bearer", parse_qs(urlsplit(self.path).query).get("token", [""])[0]
        if scheme.lower() != "bearer" or not secret:
            raise AuthError("this endpoint needs a token",
                            hint="pass --token or set EDGEFLEET_TOKEN")
        for known, name in self.server.tokens.items():
            if hmac.compare_digest(known.encode(), secret.strip().encode()):
                return name
        raise AuthError("the token is not known to this controller",
                        hint="check --token / EDGEFLEET_TOKEN against the controller's")

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            raise InvalidRolloutError(f"request body of {length} bytes is too large",
                                      hint=f"at most {_MAX_BODY} bytes")
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> dict[str, Any]:
        raw = self._body()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise InvalidRolloutError(f"request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRolloutError("request body must be a JSON object")
        return data

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _range(header: str | None, size: int) -> tuple[int, int]:
    """``bytes=N-``, ``bytes=N-M`` or ``bytes=-K`` -> inclusive (start, end); else the whole."""
    whole = (0, max(size - 1, 0))
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if not match or not (match.group(1) or match.group(2)):
        return whole
    first, last = match.group(1), match.group(2)
    if not first:
        return (max(size - int(last), 0), size - 1)
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return whole
    return start, end


def _copy(path: Path, start: int, length: int, out: Any) -> None:
    with path.open("rb") as source:
        source.seek(start)
        while length > 0:
            chunk = source.read(min(_CHUNK, length))
            if not chunk:
                return
            out.write(chunk)
            length -= len(chunk)
