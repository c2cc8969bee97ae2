"""The controller's HTTP server: the REST API the CLI uses, and the bundles devices download.

Standard library only (``ThreadingHTTPServer``). The operations are :data:`ROUTES`, one line
each (method, path template, handler); ``fleet/openapi.json`` (:mod:`edgefleet.fleet.contract`,
served at ``GET /openapi.json``) describes every one, with its request and response schemas,
and ``tests/test_api_contract.py`` checks the two agree and fuzzes each operation. To add an
operation: a handler method, a line in :data:`ROUTES`, an entry under ``paths`` in the
document, and a method of :class:`edgefleet.fleet.client.FleetClient`.

``/healthz``, ``/openapi.json``, ``/metrics``, the page (``/``, ``/dashboard/...``) and
``/bundles/{sha256}.efb`` and ``/deltas/{from}-{to}`` (docs/deltas.md) need no token; one
Range of a bundle or delta (bytes=N-M, N-, -K) is honoured (RFC 9110; 416 when unsatisfiable).

``/api`` needs ``Authorization: Bearer TOKEN`` (GET requests may pass ``?token=`` instead,
for a browser's EventSource); the token's name is the actor written in the audit history,
its role goes with it. Each route names the least role it needs (``fleet.access``: viewer
reads, operator runs rollouts, groups, tags and labels, admin pushes, changes the keyring
and drift policies, lists tokens and removes devices); a call the token's role does not
allow is answered 403 with the role it needs (``"role"``) and written to the history
(``api.refused``).
A method no route takes on a path needs the token too, then gets 405 naming the path's methods
in ``Allow`` (on a path no route knows: 404 for GET and POST, 405 for any other method).
A write that a browser sent from a page of another origin is refused with 403 before the
token is looked at (``fleet.same_origin``); no response allows a cross-origin read (no
CORS header), and the page is served with a Content-Security-Policy
(``dashboard.PAGE_HEADERS``).
Errors are JSON ``{"error", "hint", "kind"}`` (and ``"field"``, the option's name, when a
rollout option is refused); the status follows the error's class
(404 unknown, 409 conflict, 400 invalid, 401 token, 403 role or cross-site, 422 bundle or
keyring refused, 413 body too large, 405 method, 503 the store or the broker failed for now
and a retry may pass, 500 it failed for good).

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
from dataclasses import dataclass
from functools import partial
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
from edgefleet.fleet import access, contract, dashboard
from edgefleet.fleet.access import Actor, Token, TokenRole, parse_tokens, tokens_by_secret
from edgefleet.fleet.byte_ranges import UNSATISFIABLE, byte_range, copy_span
from edgefleet.fleet.control.actions import OPERATIONS
from edgefleet.fleet.controller import FleetController
from edgefleet.fleet.deltas import DELTA_PATH
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
from edgefleet.fleet.routing import Route, allowed, find, methods
from edgefleet.fleet.same_origin import check_same_origin

__all__ = ["ROUTES", "ApiServer", "parse_tokens"]

log = logging.getLogger(__name__)
_BUNDLE = re.compile(r"^/bundles/([0-9a-f]{64})\.efb$")
_NAME, _SEMVER = re.compile(NAME_PATTERN), re.compile(SEMVER_PATTERN)
_MAX_BODY = 512 * 1024 * 1024  # a bundle
_MAX_JSON = 1024 * 1024
_CHUNK = 256 * 1024
_DRAIN = 8 * 1024 * 1024  # an oversized body up to this is read away, so the client sees the 413
_MAX_PUSHES = 2  # bundle uploads streaming at once; one more is answered 503 + Retry-After
_RETRY_AFTER_S = 5
_STATUS: list[tuple[type[EdgefleetError], HTTPStatus]] = [
    (NotFoundError, HTTPStatus.NOT_FOUND), (ConflictError, HTTPStatus.CONFLICT),
    (InvalidRolloutError, HTTPStatus.BAD_REQUEST), (ForbiddenError, HTTPStatus.FORBIDDEN),
    (AuthError, HTTPStatus.UNAUTHORIZED), (BrokerError, HTTPStatus.SERVICE_UNAVAILABLE),
    (BundleError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (SchemaVersionError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (KeyringError, HTTPStatus.UNPROCESSABLE_ENTITY)]


class ApiServer:
    """Serves one controller on ``host:port`` (0 picks a free port) from a thread."""

    def __init__(self, controller: FleetController, tokens: dict[str, str] | dict[str, Token],
                 host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        """``tokens``: {secret: Token} (``fleet.access.parse_tokens``), or {secret: name} for
        admin tokens. ``tls`` (``fleet.certs.server_context``) serves HTTPS: tokens and bundles are
        never sent in clear. Each connection's handshake runs in its own thread."""
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
    _allow = ""  # the methods a 405 names

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

    def __getattr__(self, name: str) -> Callable[[], None]:
        """Any other method (PUT, DELETE, QUERY...) is routed too: a JSON 405 after the token
        when no route takes it, instead of the standard library's HTML 501."""
        if name.startswith("do_"):
            return self._guard
        raise AttributeError(name)

    def _guard(self) -> None:
        path = urlsplit(self.path).path
        self._consumed = False
        try:
            config = self.controller.config
            check_same_origin(self.command, self.headers.get, self._scheme(),
                              config.allow_origins or config.public_url)
            self._dispatch(_checked_path(path))
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

    def _dispatch(self, path: str) -> None:
        """The route's handler, after the token unless the route is public. A path no route
        answers is 404 in a public folder; else, after the token, 404 for GET and POST and
        405 for any other method."""
        found = find(ROUTES, self.command, path)
        if found is None:
            if self.command in ("GET", "HEAD") and path.startswith("/bundles/"):
                raise _no_bundle(path)
            if self.command in ("GET", "HEAD") and path.startswith("/deltas/"):
                raise _no_delta(path)
            if self.command in ("GET", "HEAD") and path.startswith("/dashboard"):
                raise _no_page(path)
            self._actor()
            known = allowed(ROUTES, path)
            if not known and self.command in ("GET", "HEAD", "POST"):
                raise NotFoundError(f"no such endpoint: {self.command} {path}",
                                    hint="see docs/fleet.md, and /openapi.json")
            self._allow = known or _ALLOW
            raise RequestError(f"{self.command} is not an API method here",
                               HTTPStatus.METHOD_NOT_ALLOWED,
                               hint=f"{path[:200] if known else 'the API'} takes {self._allow}: "
                                    "see /openapi.json")
        actor = "" if found.route.public else self._actor()
        if isinstance(actor, Actor):
            self._check(actor, found.route, path)
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)  # ?stale_s= refused
        found.route.handler(self, _Call(found.params, query, actor))

    def _check(self, caller: Actor, route: Route[_Handle], path: str) -> None:
        """403 naming the role ``route`` needs; the refusal is written to the history."""
        try:
            access.check(caller, route.role, f"{self.command} {route.path}")
        except ForbiddenError as exc:
            self.controller.audit.refused(caller, f"{self.command} {route.path}",
                                          f"{self.command} {path[:200]}", exc.message,
                                          needs=exc.role)
            raise

    # --- public: health, the contract, metrics, bundles, the page -----------------------

    def _healthz(self, call: _Call) -> None:
        self._json({"ok": True, **self.controller.overview(quality=False)})

    def _openapi(self, call: _Call) -> None:
        self._raw("application/json", contract.document_bytes())

    def _metrics(self, call: _Call) -> None:
        self._raw(*self.server.metrics.render())

    def _bundle_file(self, call: _Call) -> None:
        self._bundle(_bundle_sha(urlsplit(self.path).path))

    def _delta_file(self, call: _Call) -> None:
        """A delta this controller built (docs/deltas.md); a request never starts a build."""
        match = DELTA_PATH.match(urlsplit(self.path).path)
        found = self.controller.deltas.path(*match.groups()) if match else None
        if found is None:
            raise _no_delta(urlsplit(self.path).path)
        self._file(found, "delta")

    def _page(self, call: _Call) -> None:
        self._dashboard(urlsplit(self.path).path)

    # --- reading ------------------------------------------------------------------------

    def _overview(self, call: _Call) -> None:
        self._json(self.controller.overview())

    def _devices(self, call: _Call) -> None:
        stale = call.query.get("stale_s", [None])[0]
        devices = (self.controller.devices() if stale is None
                   else self.controller.stale_devices(_seconds(stale, "stale_s")))
        self._json([d.as_dict() for d in devices])

    def _whoami(self, call: _Call) -> None:
        actor = call.actor
        role = actor.role.value if isinstance(actor, Actor) else TokenRole.ADMIN.value
        self._json({"name": str(actor), "role": role})

    def _tokens(self, call: _Call) -> None:
        self._json(access.describe_tokens(self.server.tokens))

    def _remove_device(self, call: _Call) -> None:
        self._drop_unread_body()  # a DELETE's body, if any, means nothing
        device = _id(unquote(call.params["device_id"]), "device id")
        self._json(self.controller.remove_devices([device], call.actor).as_dict())

    def _remove_devices(self, call: _Call) -> None:
        body = _only(self._json_body(), ("devices", "stale_s"), "a removal")
        devices = _ids(body.get("devices"), "devices", "device id")
        if not devices:
            raise _invalid("devices must list at least one device id")
        stale = body.get("stale_s")
        stale_s = None if stale is None else _seconds(stale, "stale_s")
        self._json(self.controller.remove_devices(devices, call.actor, stale_s).as_dict())

    def _models(self, call: _Call) -> None:
        self._json([m.as_dict() for m in self.controller.store.models()])

    def _rollouts(self, call: _Call) -> None:
        self._json([r.summary() for r in self.controller.rollouts()])

    def _rollout(self, call: _Call) -> None:
        self._json(self.controller.rollout(call.rollout_id()).as_dict())

    def _history(self, call: _Call) -> None:
        limit = _limit(call.query.get("limit", ["100"])[0])
        target = call.query.get("target", [None])[0] or None
        action = call.query.get("action", [None])[0] or None
        self._json([e.as_dict() for e in self.controller.history(limit, target, action)])

    def _keyring(self, call: _Call) -> None:
        keyring = self.controller.keyring()
        if keyring is None:
            raise NotFoundError("this controller holds no keyring yet",
                                hint="write one with 'edgefleet keys rotate', then "
                                     "'edgefleet fleet keyring publish'")
        self._json({**keyring.summary(), "document": json.loads(keyring.raw)})

    def _alerts(self, call: _Call) -> None:
        view = self.controller.drift_view()
        self._json({"alerts": [a.as_dict() for a in view.alerts], "summary": view.summary})

    def _groups(self, call: _Call) -> None:
        self._json(self.controller.saved_groups())

    def _drift(self, call: _Call) -> None:
        self._json({"default": DriftPolicy().as_dict(),
                    "models": {k: v.as_dict()
                               for k, v in self.controller.drift_policies().items()}})

    def _stream(self, call: _Call) -> None:
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

    # --- changing -----------------------------------------------------------------------

    def _push_model(self, call: _Call) -> None:
        model, added = self._push(call.actor)
        self._json({"model": model.as_dict(), "added": added},
                   HTTPStatus.CREATED if added else HTTPStatus.OK)

    def _publish_keyring(self, call: _Call) -> None:
        force = call.query.get("force", ["0"])[0] in ("1", "true")
        raw = self._body(MAX_KEYRING_BYTES)
        self._json(self.controller.publish_keyring(raw, call.actor, force))

    def _create_rollout(self, call: _Call) -> None:
        body = self._json_body()
        options = {k: v for k, v in body.items() if k != "model"}
        rollout = self.controller.create_rollout(_model_key(body.get("model")), options,
                                                 call.actor)
        self._json(rollout.as_dict(), HTTPStatus.CREATED)

    def _operate(self, call: _Call, verb: str) -> None:
        """pause, resume, abort or rollback; they take no options (no body, or ``{}``)."""
        if given := self._json_body():
            raise _invalid(f"{verb} takes no options, got {', '.join(sorted(given))[:80]}")
        self._json(self.controller.operate(call.rollout_id(), verb, call.actor).as_dict())

    def _rollback_group(self, call: _Call) -> None:
        body = _only(self._json_body(), ("group",), "a group rollback")
        done = self.controller.rollback_group(_label(body.get("group"), "group"), call.actor)
        self._json([r.summary() for r in done])

    def _set_group(self, call: _Call) -> None:
        body = _only(self._json_body(), ("devices", "group"), "setting a group")
        devices = _ids(body.get("devices"), "devices", "device id")
        group = body.get("group")
        changed = self.controller.set_group(
            devices, None if group is None else _label(group, "group"), call.actor)
        self._json([d.as_dict() for d in changed])

    def _tag(self, call: _Call) -> None:
        body = _only(self._json_body(), ("add", "remove"), "tagging")
        device = self.controller.tag(_id(unquote(call.params["device_id"]), "device id"),
                                     _labels(body.get("add", []), "add", "tag"),
                                     _labels(body.get("remove", []), "remove", "tag"),
                                     call.actor)
        self._json(device.as_dict())

    def _label_device(self, call: _Call) -> None:
        body = _only(self._json_body(), ("set", "remove"), "labelling")
        device = self.controller.label(
            _id(unquote(call.params["device_id"]), "device id"),
            _label_map(body.get("set", {})),
            [_id(k, "label key") for k in _list(body.get("remove", []), "remove")], call.actor)
        self._json(device.as_dict())

    def _create_group(self, call: _Call) -> None:
        body = _only(self._json_body(), ("name", "where"), "a dynamic group")
        where = body.get("where")
        if not isinstance(where, str):
            raise _invalid("where must be a selector string, e.g. profile=raspberry-pi-4")
        group = self.controller.create_group(_label(body.get("name"), "group"), where,
                                             call.actor)
        self._json(group, HTTPStatus.CREATED)

    def _delete_group(self, call: _Call) -> None:
        if given := self._json_body():
            raise _invalid(f"deleting a group takes no options, got "
                           f"{', '.join(sorted(given))[:80]}")
        name = _label(unquote(call.params["name"]), "group")
        self.controller.delete_group(name, call.actor)
        self._json({"deleted": name})

    def _set_drift_policy(self, call: _Call) -> None:
        body = self._json_body()
        model = _id(unquote(call.params["model"]), "model name")
        self._json(self._drift_policy(model, body, call.actor).as_dict())

    def _dashboard(self, path: str) -> None:
        if path in ("/", "/dashboard"):
            self.send_response(HTTPStatus.FOUND)
            self.send_header("Location", "/dashboard/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        found = dashboard.static_file(path.removeprefix("/dashboard"))
        if found is None:
            raise _no_page(path)
        self._raw(*found, headers=dashboard.PAGE_HEADERS)

    def _raw(self, content_type: str, body: bytes,
             headers: dict[str, str] | None = None) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _bundle(self, sha256: str) -> None:
        path = self.controller.bundle_path(sha256)
        if path is None or not path.exists():
            raise NotFoundError(f"no bundle {sha256[:12]}", hint="push it first")
        self._file(path, "bundle")

    def _file(self, path: Path, kind: str) -> None:
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
        self.controller.count_served(kind, end - start + 1)

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
            _only(body, ("reset",), "a drift policy reset")
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

    def _scheme(self) -> str:
        return "https" if isinstance(self.connection, ssl.SSLSocket) else "http"

    def _actor(self) -> Actor:
        header = self.headers.get("Authorization", "")
        scheme, _, secret = header.partition(" ")
        if not header and self.command in ("GET", "HEAD"):
            scheme, secret = "bearer", parse_qs(urlsplit(self.path).query).get("token", [""])[0]
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
        self.send_header("Cache-Control", "no-store")  # fleet data: not kept on disk
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", self._allow)
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", str(_RETRY_AFTER_S))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@dataclass(frozen=True)
class _Call:
    """What a handler is called with: the route's path parameters (percent-encoded), the
    query, and the token's name (empty on a public route)."""

    params: dict[str, str]
    query: dict[str, list[str]]
    actor: str

    def rollout_id(self) -> str:
        return _rollout_id(unquote(self.params["rollout_id"]))


_Handle = Callable[[_Handler, _Call], None]

# Every operation the API answers, first match wins; fleet/openapi.json describes each one
# (tests/test_api_contract.py checks both list the same). HEAD is answered as GET.
_V, _O, _A = TokenRole.VIEWER, TokenRole.OPERATOR, TokenRole.ADMIN
ROUTES: tuple[Route[_Handle], ...] = (
    # no token: liveness, the contract, Prometheus, downloads, the page (its data needs one)
    Route("GET", "/healthz", _Handler._healthz, None),
    Route("GET", "/openapi.json", _Handler._openapi, None),
    Route("GET", "/metrics", _Handler._metrics, None),
    Route("GET", "/bundles/{sha256}.efb", _Handler._bundle_file, None),
    Route("GET", "/deltas/{pair}", _Handler._delta_file, None),
    Route("GET", "/", _Handler._page, None),
    Route("GET", "/dashboard", _Handler._page, None),
    Route("GET", "/dashboard/", _Handler._page, None),
    Route("GET", "/dashboard/{file}", _Handler._page, None),
    # viewer: reading
    Route("GET", "/api/v1/whoami", _Handler._whoami, _V),
    Route("GET", "/api/v1/overview", _Handler._overview, _V),
    Route("GET", "/api/v1/stream", _Handler._stream, _V),
    Route("GET", "/api/v1/devices", _Handler._devices, _V),
    Route("GET", "/api/v1/groups", _Handler._groups, _V),
    Route("GET", "/api/v1/models", _Handler._models, _V),
    Route("GET", "/api/v1/rollouts", _Handler._rollouts, _V),
    Route("GET", "/api/v1/rollouts/{rollout_id}", _Handler._rollout, _V),
    Route("GET", "/api/v1/history", _Handler._history, _V),
    Route("GET", "/api/v1/keyring", _Handler._keyring, _V),
    Route("GET", "/api/v1/alerts", _Handler._alerts, _V),
    Route("GET", "/api/v1/drift", _Handler._drift, _V),
    # operator: rollouts, groups, tags, labels
    Route("POST", "/api/v1/devices/group", _Handler._set_group, _O),
    Route("POST", "/api/v1/devices/{device_id}/tags", _Handler._tag, _O),
    Route("POST", "/api/v1/devices/{device_id}/labels", _Handler._label_device, _O),
    Route("POST", "/api/v1/groups", _Handler._create_group, _O),
    Route("POST", "/api/v1/groups/{name}/delete", _Handler._delete_group, _O),
    Route("POST", "/api/v1/rollouts", _Handler._create_rollout, _O),
    *(Route[_Handle]("POST", f"/api/v1/rollouts/{{rollout_id}}/{verb}",
                     partial(_Handler._operate, verb=verb), _O) for verb in OPERATIONS),
    Route("POST", "/api/v1/rollback", _Handler._rollback_group, _O),
    # admin: what reaches every device or changes what the fleet trusts, and who is in it
    Route("POST", "/api/v1/models", _Handler._push_model, _A),
    Route("POST", "/api/v1/keyring", _Handler._publish_keyring, _A),
    Route("POST", "/api/v1/drift/{model}", _Handler._set_drift_policy, _A),
    Route("GET", "/api/v1/tokens", _Handler._tokens, _A),
    Route("POST", "/api/v1/devices/remove", _Handler._remove_devices, _A),
    Route("DELETE", "/api/v1/devices/{device_id}", _Handler._remove_device, _A),
)
_ALLOW = ", ".join(methods(ROUTES))


def _error_body(exc: EdgefleetError) -> dict[str, Any]:
    """``{"error", "hint", "kind"}``, and ``field`` (a refused rollout option) or ``role``
    (the role a refused call needs)."""
    extra: dict[str, Any] = {}
    if isinstance(exc, RolloutOptionError):
        extra["field"] = exc.field
    if isinstance(exc, ForbiddenError):
        extra["role"] = exc.role
    return {"error": exc.message, "hint": exc.hint, "kind": type(exc).__name__, **extra}


def _seconds(value: object, what: str) -> int:
    """A whole number of seconds, 1 to ten years, from a query text or a JSON number."""
    text = value if isinstance(value, str) else None
    number = (int(text) if text is not None and text.isascii() and text.isdigit()
              and len(text) <= 10 else value)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_AGE_S:
        raise _invalid(f"{what} must be a whole number of seconds from 1 to {MAX_AGE_S}, got "
                       f"{value!r:.40}")
    return number


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


def _only(body: dict[str, Any], fields: tuple[str, ...], what: str) -> dict[str, Any]:
    """``body``, refused if it holds a field besides ``fields`` (a typo is never ignored)."""
    unknown = sorted(str(k) for k in body if k not in fields)
    if unknown:
        raise _invalid(f"{what} takes {', '.join(fields)}; {unknown[0][:40]!r} is not one "
                       "of them")
    return body


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
        raise _no_bundle(path)
    return match.group(1)


def _no_bundle(path: str) -> NotFoundError:
    return NotFoundError(f"no bundle {path[len('/bundles/'):][:80]!r}: bundles are "
                         "/bundles/{sha256}.efb (64 lowercase hex digits)",
                         hint="take the URL from the rollout's desired state")


def _no_delta(path: str) -> NotFoundError:
    return NotFoundError(f"no delta {path[len('/deltas/'):][:80]!r}",
                         hint="download the full bundle (the device does so by itself)")


def _list(value: object, field: str) -> list[object]:
    if not isinstance(value, list):
        raise _invalid(f"{field} must be a list, got {type(value).__name__}")
    return value


def _label_map(value: object) -> dict[str, str]:
    """Labels to set: ``{KEY: VALUE}``, keys as ids, values 1-64 printable characters."""
    if not isinstance(value, dict) or len(value) > 32:
        raise _invalid("set must be an object of at most 32 labels, KEY: VALUE")
    return {_id(k, "label key"): _label(v, "label value") for k, v in value.items()}


def _no_page(path: str) -> NotFoundError:
    return NotFoundError(f"no such page: {path[:200]}", hint="open /dashboard/")


def _status(exc: EdgefleetError) -> HTTPStatus:
    """The HTTP status an error is answered with."""
    if isinstance(exc, RequestError):
        return HTTPStatus(exc.status)
    if isinstance(exc, StoreError):
        return (HTTPStatus.SERVICE_UNAVAILABLE if exc.transient
                else HTTPStatus.INTERNAL_SERVER_ERROR)
    return next((s for cls, s in _STATUS if isinstance(exc, cls)), HTTPStatus.BAD_REQUEST)
