"""The controller's HTTP server: the REST API the CLI uses, and the bundles devices download.

Standard library only (``ThreadingHTTPServer``). Every endpoint is an entry of the one
route table, :data:`edgefleet.fleet.access.ROUTES`, with the least token role it needs;
a request is looked up there, its token checked and its role compared before any
handler runs (one ``_on_<handler>`` method per entry; the module refuses to load when
the two differ)::

    GET  /healthz                                   no token
    GET  /bundles/{sha256}.efb                      no token; one Range (bytes=N-M, N-, -K)
                                                    honoured (RFC 9110; 416 when unsatisfiable)
    GET  /metrics                                   no token; Prometheus text format
    GET  /  and  /dashboard/...                     no token; the live fleet page (static)
    GET  /api/v1/stream                             viewer; server-sent events for the page
    GET  /api/v1/overview | devices[?stale_s=] | models | rollouts | history?limit=&target=
    GET  /api/v1/rollouts/{id} | keyring | alerts | drift | whoami       viewer
    POST /api/v1/rollouts                           operator; {"model": "NAME:VERSION", ...}
    POST /api/v1/rollouts/{id}/{pause|resume|abort|rollback}             operator
    POST /api/v1/rollback                           operator; {"group": G}
    POST /api/v1/devices/group                      operator; {"devices": [...], "group": G|null}
    POST /api/v1/devices/{id}/tags                  operator; {"add": [...], "remove": [...]}
    POST /api/v1/models                             admin; body: the .efb bytes
    POST /api/v1/keyring[?force=1]                  admin; body: a keyring.json (docs/keys.md)
    POST /api/v1/drift/{model}                      admin; {"psi", "min_samples",
                                                    "clear_after"} | {"reset": true}
    GET  /api/v1/tokens                             admin; names and roles, never secrets
    DELETE /api/v1/devices/{id}                     admin; decommission one device
    POST /api/v1/devices/remove                     admin; {"devices": [...], "stale_s": N?}

``/api`` needs ``Authorization: Bearer TOKEN`` (GET requests may pass ``?token=`` instead,
for a browser's EventSource); the token's name is the actor written in the audit history,
its role goes with it. A call the token's role does not allow is answered 403 with the
role it needs (``"role"``) and written to the history (``api.refused``). A call no entry
takes needs a token too, then gets 404, or 405 (with ``Allow``) when the path takes other
methods.
Errors are JSON ``{"error", "hint", "kind"}`` (and ``"field"``, the option's name, when a
rollout option is refused); the status follows the error's class
(404 unknown, 409 conflict, 400 invalid, 401 token, 403 role, 422 bundle or keyring
refused, 413 body too large, 405 method, 503 the store or the broker failed for now and a
retry may pass, 500 it failed for good).

Input is checked before it reaches the controller: a path with ``..``, a backslash or an
encoded ``/`` is refused (400) whatever the token; device ids in paths and bodies must be
contract ids (``agent.protocol.topics.check_id``), groups and tags 1-64 printable characters,
model keys ``NAME:SEMVER``, rollout ids ``r12``-like; bodies are capped
(bundles 512 MiB, keyrings 64 KiB, JSON 1 MiB) from ``Content-Length`` before they are read.
A bundle is verified in memory before a byte reaches the artifact folder, which holds files
named by sha256 only.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import secrets
import socketserver
import ssl
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from edgefleet.agent.errors import BrokerError
from edgefleet.agent.ports import bind_error
from edgefleet.agent.protocol._tar import BLOCK, check_first_block
from edgefleet.agent.protocol.errors import (
    BundleError,
    EdgefleetError,
    RequestError,
    SchemaVersionError,
)
from edgefleet.agent.protocol.keyring import MAX_KEYRING_BYTES, KeyringError
from edgefleet.agent.protocol.schema import NAME_PATTERN, SEMVER_PATTERN
from edgefleet.agent.protocol.topics import check_id
from edgefleet.fleet import access, dashboard
from edgefleet.fleet.access import Actor, Token, parse_tokens, tokens_by_secret
from edgefleet.fleet.byte_ranges import UNSATISFIABLE, byte_range, copy_span
from edgefleet.fleet.control.actions import OPERATIONS
from edgefleet.fleet.controller import FleetController
from edgefleet.fleet.domain import ModelVersion
from edgefleet.fleet.drift import DriftPolicy
from edgefleet.fleet.durations import MAX_AGE_S
from edgefleet.fleet.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidRolloutError,
    NotFoundError,
    StoreError,
)
from edgefleet.fleet.metrics import FleetMetrics
from edgefleet.fleet.rollout.validate import RolloutOptionError

__all__ = ["ApiServer", "parse_tokens"]  # parse_tokens: fleet.access, kept here for callers

log = logging.getLogger(__name__)
Params = dict[str, str]  # a route's path parameters, as sent (still %-encoded)
Caller = Actor | None  # the token's name and role; None on a route that needs no token
_BUNDLE = re.compile(r"^/bundles/([0-9a-f]{64})\.efb$")
_VERBS = tuple(OPERATIONS)
_NAME, _SEMVER = re.compile(NAME_PATTERN), re.compile(SEMVER_PATTERN)
_MAX_BODY = 512 * 1024 * 1024  # a bundle
_MAX_JSON = 1024 * 1024
_CHUNK = 256 * 1024
_DRAIN = 8 * 1024 * 1024  # an oversized body up to this is read away, so the client sees the 413
_MAX_PUSHES = 2  # bundle uploads streaming at once; one more is answered 503 + Retry-After
_RETRY_AFTER_S = 5
_STATUS: list[tuple[type[EdgefleetError], HTTPStatus]] = [
    (NotFoundError, HTTPStatus.NOT_FOUND), (ConflictError, HTTPStatus.CONFLICT),
    (InvalidRolloutError, HTTPStatus.BAD_REQUEST), (AuthError, HTTPStatus.UNAUTHORIZED),
    (ForbiddenError, HTTPStatus.FORBIDDEN), (BrokerError, HTTPStatus.SERVICE_UNAVAILABLE),
    (BundleError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (SchemaVersionError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (KeyringError, HTTPStatus.UNPROCESSABLE_ENTITY)]


class ApiServer:
    """Serves one controller on ``host:port`` (0 picks a free port) from a thread."""

    def __init__(self, controller: FleetController, tokens: dict[str, str] | dict[str, Token],
                 host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        """``tokens``: {secret: Token} (``fleet.access.parse_tokens``), or {secret: name}
        for admin tokens. ``tls`` (``fleet.certs.server_context``) serves HTTPS: tokens
        and bundles are never sent in clear. Each connection's handshake runs in its own
        thread."""
        if not tokens:
            raise AuthError("the API needs at least one token",
                            hint="pass --token NAME:ROLE=SECRET or set EDGEFLEET_TOKEN")
        self._httpd = _Server((host, port), controller, tokens_by_secret(tokens))
        self.scheme = "https" if tls else "http"
        if tls is not None:
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True,
                                                 do_handshake_on_connect=False)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._httpd.server_address[0]!s}:{self.port}"

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
                 tokens: dict[str, Token]) -> None:
        super().__init__(address, _Handler)
        self.controller, self.tokens = controller, tokens
        self.metrics = FleetMetrics(controller)
        dashboard.attach(controller)  # device events are kept from the start
        self.stopping = threading.Event()
        self.pushes = threading.BoundedSemaphore(_MAX_PUSHES)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that fails the TLS handshake or hangs up: one line, not a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ssl.SSLError, ConnectionError)):
            log.info("client %s: %s", client_address[0], exc)
            return
        super().handle_error(request, client_address)

    def server_bind(self) -> None:  # no reverse DNS lookup of the host at bind time
        try:
            socketserver.TCPServer.server_bind(self)
        except OSError as exc:
            host, port = self.server_address[:2]
            raise bind_error(str(host), int(port), "--http HOST:PORT", exc) from exc
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    _consumed = True  # whether this request's body was read (or needs no reading)
    _allow: tuple[str, ...] = ()  # the methods a 405 names

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def controller(self) -> FleetController:
        """The controller this server answers for."""
        return self.server.controller

    def do_GET(self) -> None:
        self._guard()

    def do_HEAD(self) -> None:
        self._guard()

    def do_POST(self) -> None:
        self._guard()

    def do_PUT(self) -> None:
        self._guard()

    def do_DELETE(self) -> None:
        self._guard()

    def do_PATCH(self) -> None:
        self._guard()

    def _guard(self) -> None:
        path = urlsplit(self.path).path
        self._consumed, self._allow = False, ()
        try:
            self._route(_checked_path(path))
        except EdgefleetError as exc:
            self._drop_unread_body()
            status = _status(exc)
            if status >= HTTPStatus.BAD_REQUEST and self.command != "GET":
                log.info("refused %s %s: %s", self.command, path[:200], exc.message)
            self._json(_error_body(exc), status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            log.exception("API request %s %s failed", self.command, self.path)
            self._drop_unread_body()
            self._json({"error": f"internal error: {type(exc).__name__}: {exc}",
                        "hint": "see the controller's log", "kind": "InternalError"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def _route(self, path: str) -> None:
        """Look the call up in the one route table, check its token's role, dispatch."""
        found = access.match(self.command, path)
        if found is None:
            self._caller()  # an unknown call needs a token before it learns anything
            self._allow = tuple(access.allowed_methods(path))
            if self._allow:
                raise RequestError(f"{self.command} is not a method of {path[:200]}",
                                   HTTPStatus.METHOD_NOT_ALLOWED,
                                   hint=f"it takes {', '.join(self._allow)}: see docs/fleet.md")
            raise NotFoundError(f"no such endpoint: {self.command} {path[:200]}",
                                hint="see docs/fleet.md")
        caller = None if found.route.role is None else self._caller()
        if caller is not None:
            self._check(caller, found.route, path)
        _HANDLERS[found.route.handler](self, found.params, caller)

    def _check(self, caller: Actor, route: access.Route, path: str) -> None:
        """403 naming the role ``route`` needs; the refusal is written to the history."""
        try:
            access.check(caller, route, f"{self.command} {route.template}")
        except ForbiddenError as exc:
            self.controller.audit.record(caller, "api.refused", f"{self.command} {path[:200]}",
                                         exc.message, outcome="refused", needs=exc.role)
            raise

    # --- handlers, one per route handler name in fleet.access.ROUTES -----------------

    def _on_healthz(self, params: Params, caller: Caller) -> None:
        self._json({"ok": True, **self.controller.overview(quality=False)})

    def _on_bundle(self, params: Params, caller: Caller) -> None:  # no token, whatever name
        self._bundle(_bundle_sha(f"/bundles/{params['name']}"))

    def _on_metrics(self, params: Params, caller: Caller) -> None:
        self._raw(*self.server.metrics.render())

    def _on_dashboard(self, params: Params, caller: Caller) -> None:
        self._dashboard(urlsplit(self.path).path)

    def _on_whoami(self, params: Params, caller: Caller) -> None:
        assert caller is not None  # every /api route needs a token
        self._json({"name": str(caller), "role": caller.role.value})

    def _on_tokens(self, params: Params, caller: Caller) -> None:
        self._json(access.describe_tokens(self.server.tokens))

    def _on_overview(self, params: Params, caller: Caller) -> None:
        self._json(self.controller.overview())

    def _on_stream(self, params: Params, caller: Caller) -> None:
        self._stream()

    def _on_devices(self, params: Params, caller: Caller) -> None:
        stale = self._query("stale_s")
        devices = (self.controller.devices() if stale is None
                   else self.controller.stale_devices(_seconds(stale, "stale_s")))
        self._json([d.as_dict() for d in devices])

    def _on_models(self, params: Params, caller: Caller) -> None:
        self._json([m.as_dict() for m in self.controller.store.models()])

    def _on_rollouts(self, params: Params, caller: Caller) -> None:
        self._json([r.summary() for r in self.controller.rollouts()])

    def _on_rollout(self, params: Params, caller: Caller) -> None:
        rollout_id = _rollout_id(unquote(params["rollout"]))
        self._json(self.controller.rollout(rollout_id).as_dict())

    def _on_history(self, params: Params, caller: Caller) -> None:
        limit = _limit(self._query("limit") or "100")
        entries = self.controller.history(limit, self._query("target"))
        self._json([e.as_dict() for e in entries])

    def _on_keyring(self, params: Params, caller: Caller) -> None:
        self._keyring()

    def _on_alerts(self, params: Params, caller: Caller) -> None:
        view = self.controller.drift_view()
        self._json({"alerts": [a.as_dict() for a in view.alerts], "summary": view.summary})

    def _on_drift(self, params: Params, caller: Caller) -> None:
        self._json({"default": DriftPolicy().as_dict(),
                    "models": {k: v.as_dict()
                               for k, v in self.controller.drift_policies().items()}})

    def _query(self, name: str) -> str | None:
        return parse_qs(urlsplit(self.path).query).get(name, [None])[0]

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

        dashboard.stream(self.controller, write, self.server.stopping)

    def _raw(self, content_type: str, body: bytes) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _bundle(self, sha256: str) -> None:
        path = self.controller.bundle_path(sha256)
        if path is None or not path.exists():
            raise NotFoundError(f"no bundle {sha256[:12]}", hint="push it first")
        size = path.stat().st_size
        ranges = self.headers.get_all("Range") or []
        span = byte_range(ranges[0], size) if len(ranges) == 1 else None  # two: both ignored
        if span == UNSATISFIABLE:
            return self._unsatisfiable(size)
        partial = isinstance(span, tuple)
        start, end = span if isinstance(span, tuple) else (0, max(size - 1, 0))
        self.send_response(HTTPStatus.PARTIAL_CONTENT if partial else HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        copy_span(path, start, end - start + 1, self.wfile)

    def _unsatisfiable(self, size: int) -> None:
        """416 with ``Content-Range: bytes */size`` (RFC 9110 section 15.5.17)."""
        body = json.dumps({"error": f"the range asked for is not within the bundle's {size} "
                                    "bytes", "hint": "ask for bytes=N- with N below the size",
                           "kind": "RangeNotSatisfiable"}).encode()
        self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # --- POST ---------------------------------------------------------------------------

    def _keyring(self) -> None:
        keyring = self.controller.keyring()
        if keyring is None:
            raise NotFoundError("this controller holds no keyring yet",
                                hint="write one with 'edgefleet keys rotate', then "
                                     "'edgefleet fleet keyring publish'")
        self._json({**keyring.summary(), "document": json.loads(keyring.raw)})

    def _on_push(self, params: Params, caller: Caller) -> None:
        model, added = self._push(_known(caller))
        self._json({"model": model.as_dict(), "added": added},
                   HTTPStatus.CREATED if added else HTTPStatus.OK)

    def _on_publish_keyring(self, params: Params, caller: Caller) -> None:
        force = self._query("force") in ("1", "true")
        raw = self._body(MAX_KEYRING_BYTES)
        self._json(self.controller.publish_keyring(raw, _known(caller), force))

    def _on_create_rollout(self, params: Params, caller: Caller) -> None:
        body = self._json_body()
        options = {k: v for k, v in body.items() if k != "model"}
        rollout = self.controller.create_rollout(_model_key(body.get("model")), options,
                                                 _known(caller))
        self._json(rollout.as_dict(), HTTPStatus.CREATED)

    def _on_operate(self, params: Params, caller: Caller) -> None:
        verb = params["verb"]
        if verb not in _VERBS:
            raise NotFoundError(f"no such endpoint: POST /api/v1/rollouts/ID/{verb[:40]}",
                                hint=f"the actions are {', '.join(_VERBS)}")
        self._json_body()
        rollout_id = _rollout_id(unquote(params["rollout"]))
        self._json(self.controller.operate(rollout_id, verb, _known(caller)).as_dict())

    def _on_rollback_group(self, params: Params, caller: Caller) -> None:
        group = _label(self._json_body().get("group"), "group")
        done = self.controller.rollback_group(group, _known(caller))
        self._json([r.summary() for r in done])

    def _on_set_group(self, params: Params, caller: Caller) -> None:
        body = self._json_body()
        devices = _ids(body.get("devices"), "devices", "device id")
        group = body.get("group")
        changed = self.controller.set_group(
            devices, None if group is None else _label(group, "group"), _known(caller))
        self._json([d.as_dict() for d in changed])

    def _on_tag(self, params: Params, caller: Caller) -> None:
        body = self._json_body()
        device = self.controller.tag(_id(unquote(params["device"]), "device id"),
                                     _labels(body.get("add", []), "add", "tag"),
                                     _labels(body.get("remove", []), "remove", "tag"),
                                     _known(caller))
        self._json(device.as_dict())

    def _on_set_drift_policy(self, params: Params, caller: Caller) -> None:
        body = self._json_body()
        model = _id(unquote(params["model"]), "model name")
        self._json(self._drift_policy(model, body, _known(caller)).as_dict())

    def _on_remove_device(self, params: Params, caller: Caller) -> None:
        self._drop_unread_body()  # a DELETE's body, if any, means nothing
        device = _id(unquote(params["device"]), "device id")
        self._json(self.controller.remove_devices([device], _known(caller)).as_dict())

    def _on_remove_devices(self, params: Params, caller: Caller) -> None:
        body = self._json_body()
        unknown = sorted(set(body) - {"devices", "stale_s"})
        if unknown:
            raise _invalid(f"a removal takes devices and stale_s; got {', '.join(unknown)}")
        devices = _ids(body.get("devices"), "devices", "device id")
        stale = body.get("stale_s")
        stale_s = None if stale is None else _seconds(stale, "stale_s")
        self._json(self.controller.remove_devices(devices, _known(caller), stale_s).as_dict())

    def _push(self, actor: str) -> tuple[ModelVersion, bool]:
        """At most ``_MAX_PUSHES`` uploads at once, each streamed to a file, then verified."""
        if not self.server.pushes.acquire(blocking=False):
            raise RequestError(f"{_MAX_PUSHES} pushes are already uploading",
                               HTTPStatus.SERVICE_UNAVAILABLE,
                               hint=f"retry in {_RETRY_AFTER_S} s")
        upload = self.controller.artifacts / f".upload-{secrets.token_hex(8)}.part"
        try:
            self._stream_to(upload, self._length(_MAX_BODY), actor)
            return self.controller.push(upload, actor)
        finally:
            upload.unlink(missing_ok=True)
            self.server.pushes.release()

    def _stream_to(self, path: Path, length: int, actor: str) -> None:
        """The body into ``path`` in chunks; refused at its first block if no tar header."""
        self._consumed = True
        first = self.rfile.read(min(BLOCK, length))
        self._first_block(first, actor)
        left = length - len(first)
        with open(path, "wb") as out:
            out.write(first)
            while left > 0:
                chunk = self.rfile.read(min(_CHUNK, left))
                if not chunk:
                    raise RequestError(f"the upload ended after {length - left} of {length} "
                                       "bytes", HTTPStatus.BAD_REQUEST, hint="send it again")
                out.write(chunk)
                left -= len(chunk)

    def _first_block(self, block: bytes, actor: str) -> None:
        try:
            check_first_block(block)
        except BundleError as exc:
            self.close_connection = True  # the rest of the body is never read
            self.controller.push_refused(actor, exc)
            raise

    def _drift_policy(self, model: str, body: dict[str, Any], actor: str) -> DriftPolicy:
        """A model's drift alert policy: the fields given change, the others stay."""
        if body.get("reset") is True:
            return self.controller.set_drift_policy(model, None, actor)
        fields = {"psi": float, "min_samples": int, "clear_after": int}
        unknown = sorted(set(body) - set(fields))
        if unknown or not body:
            raise _invalid(f"a drift policy takes {', '.join(fields)} (or reset: true); "
                           f"got {', '.join(unknown) or 'nothing'}")
        changes = {}
        for key, value in body.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or (
                    fields[key] is int and not isinstance(value, int)):
                raise _invalid(f"drift policy {key} must be a number, got {value!r}")
            changes[key] = value
        try:
            policy = DriftPolicy(**{**self.controller.drift_policy(model).as_dict(), **changes})
        except ValueError as exc:
            raise _invalid(f"drift policy refused: {exc}") from exc
        return self.controller.set_drift_policy(model, policy, actor)

    # --- plumbing -----------------------------------------------------------------------

    def _caller(self) -> Actor:
        """The token's name and role, from ``Authorization: Bearer`` (or a GET's
        ``?token=``, for a browser's EventSource)."""
        header = self.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header and self.command in ("GET", "HEAD"):
            scheme, secret = "bearer", self._query("token") or ""
        if scheme.lower() != "bearer" or not secret:
            raise AuthError("this endpoint needs a token",
                            hint="pass --token or set EDGEFLEET_TOKEN")
        for known, token in self.server.tokens.items():
            if hmac.compare_digest(known.encode(), secret.strip().encode()):
                return Actor(token.name, token.role)
        raise AuthError("the token is not known to this controller",
                        hint="check --token / EDGEFLEET_TOKEN against the controller's")

    def _body(self, limit: int) -> bytes:
        """The request body, refused from its ``Content-Length`` alone when above ``limit``."""
        length = self._length(limit)
        return self.rfile.read(length) if length else b""

    def _length(self, limit: int) -> int:
        """The body's ``Content-Length``, refused when missing, malformed or above ``limit``."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError("a chunked request body is not accepted",
                               HTTPStatus.LENGTH_REQUIRED, hint="send Content-Length")
        self._consumed = True
        text = (self.headers.get("Content-Length") or "0").strip()
        if not (text.isascii() and text.isdigit()):
            self.close_connection = True
            raise RequestError(f"Content-Length {text[:40]!r} is not a byte count",
                               HTTPStatus.BAD_REQUEST, hint="send a valid Content-Length")
        length = int(text)
        if length > limit:
            self._discard(length)
            raise RequestError(f"request body of {length} bytes is too large (limit {limit}) "
                               f"for {self.path}", HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               hint=f"at most {limit} bytes here")
        return length

    def _drop_unread_body(self) -> None:
        """After a refusal: a body nobody read must not be parsed as the next request."""
        if self._consumed:
            return
        self._consumed = True
        text = (self.headers.get("Content-Length") or "0").strip()
        if self.headers.get("Transfer-Encoding") or not (text.isascii() and text.isdigit()):
            self.close_connection = True
            return
        try:
            self._discard(int(text))
        except OSError:
            self.close_connection = True

    def _discard(self, length: int) -> None:
        """Read away a refused body (when small enough) so the client can read the answer."""
        if length > _DRAIN:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(_CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)

    def _json_body(self) -> dict[str, Any]:
        raw = self._body(_MAX_JSON)
        try:
            data = json.loads(raw, parse_int=_json_int) if raw else {}
        except (ValueError, RecursionError) as exc:
            raise InvalidRolloutError(f"request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRolloutError("request body must be a JSON object")
        return data

    def _json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = dashboard.json_text(data).encode()  # strict JSON: never NaN
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", ", ".join(self._allow))
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", str(_RETRY_AFTER_S))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def _checked_path(path: str) -> str:
    """Refuse a path that tries to climb or hide a separator, before any routing."""
    decoded = unquote(path)
    if (".." in decoded.split("/") or "\\" in decoded or "\x00" in decoded
            or decoded.count("/") != path.count("/")):
        raise RequestError(f"path {path[:200]!r} is not allowed", HTTPStatus.BAD_REQUEST,
                           hint="no '..' segments, backslashes or encoded '/' in API paths")
    return path


def _invalid(message: str) -> RequestError:
    return RequestError(message, HTTPStatus.BAD_REQUEST, hint="see docs/fleet.md")


def _id(value: object, what: str) -> str:
    """A contract id (1-64 of [A-Za-z0-9._-], starting with a letter or digit)."""
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string, got {type(value).__name__}")
    try:
        return check_id(value, what)
    except ValueError as exc:
        raise _invalid(str(exc)) from exc


def _ids(value: object, field: str, what: str) -> list[str]:
    if not isinstance(value, list):
        raise _invalid(f"{field} must be a list of {what}s, got {type(value).__name__}")
    return [_id(item, what) for item in value]


def _label(value: object, what: str) -> str:
    """A group or tag: free text for people (``north cams & co``), 1-64 printable characters."""
    if not isinstance(value, str):
        raise _invalid(f"{what} must be a string, got {type(value).__name__}")
    if not 1 <= len(value) <= 64 or not value.isprintable():
        raise _invalid(f"{what} {value[:80]!r} is not allowed: use 1-64 printable characters")
    return value


def _labels(value: object, field: str, what: str) -> list[str]:
    if not isinstance(value, list):
        raise _invalid(f"{field} must be a list of {what}s, got {type(value).__name__}")
    return [_label(item, what) for item in value]


def _rollout_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise _invalid(f"rollout id {value[:80]!r} is not allowed: ids look like r12")
    return value


def _json_int(text: str) -> int | float:
    """A JSON integer; one of more digits than Python reads (4300) is read as the float it
    overflows to (+-inf), which every check refuses as not finite, naming its field,
    instead of the whole body failing with Python's own message."""
    return int(text) if len(text) <= _INT_DIGITS else float(text)


_INT_DIGITS = 4000  # below sys.get_int_max_str_digits()'s default of 4300


def _model_key(value: object) -> str:
    """``NAME:VERSION`` with the manifest's name and semver patterns."""
    name, _, version = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not (_NAME.match(name) and _SEMVER.match(version)):
        raise RolloutOptionError("model", f"must be NAME:VERSION (e.g. digits:1.2.0), got "
                                          f"{value!r:.80}", hint="see docs/fleet.md")
    return f"{name}:{version}"


def _limit(text: str | None) -> int:
    text = text or ""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 10_000:
        raise _invalid(f"limit must be a whole number from 1 to 10000, got {text!r:.40}")
    return int(text)


def _bundle_sha(path: str) -> str:
    """The sha256 a ``/bundles/`` path names; any other name there is no stored bundle."""
    match = _BUNDLE.match(path)
    if match is None:
        raise NotFoundError(f"no bundle {path[len('/bundles/'):][:80]!r}: bundles are "
                            "/bundles/{sha256}.efb (64 lowercase hex digits)",
                            hint="take the URL from the rollout's desired state")
    return match.group(1)


def _status(exc: EdgefleetError) -> HTTPStatus:
    """The HTTP status an error is answered with."""
    if isinstance(exc, RequestError):
        return HTTPStatus(exc.status)
    if isinstance(exc, StoreError):
        return (HTTPStatus.SERVICE_UNAVAILABLE if exc.transient
                else HTTPStatus.INTERNAL_SERVER_ERROR)
    return next((s for cls, s in _STATUS if isinstance(exc, cls)), HTTPStatus.BAD_REQUEST)


def _error_body(exc: EdgefleetError) -> dict[str, Any]:
    """``{"error", "hint", "kind"}``, and ``field`` (a refused rollout option) or ``role``
    (the role a refused call needs)."""
    extra: dict[str, Any] = {}
    if isinstance(exc, RolloutOptionError):
        extra["field"] = exc.field
    if isinstance(exc, ForbiddenError):
        extra["role"] = exc.role
    return {"error": exc.message, "hint": exc.hint, "kind": type(exc).__name__, **extra}


def _known(caller: Caller) -> Actor:
    """The caller of a route that needs a token (the table says so; never None here)."""
    if caller is None:
        raise AuthError("this endpoint needs a token", hint="pass --token")
    return caller


def _seconds(value: object, what: str) -> int:
    """A whole number of seconds, 1 to ten years, from a query text or a JSON number."""
    text = value if isinstance(value, str) else None
    number = (int(text) if text is not None and text.isascii() and text.isdigit()
              and len(text) <= 10 else value)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_AGE_S:
        raise _invalid(f"{what} must be a whole number of seconds from 1 to {MAX_AGE_S}, got "
                       f"{value!r:.40}")
    return number


Handler = Callable[[_Handler, Params, Caller], None]
_HANDLERS: dict[str, Handler] = {
    name: getattr(_Handler, f"_on_{name}") for name in {r.handler for r in access.ROUTES}}
_UNROUTED = sorted(n for n in vars(_Handler) if n.startswith("_on_")
                   and n.removeprefix("_on_") not in _HANDLERS)
if _UNROUTED:  # a handler without its entry in fleet.access.ROUTES could never be reached
    raise ImportError(f"fleet.api handlers without a route: {', '.join(_UNROUTED)}")
