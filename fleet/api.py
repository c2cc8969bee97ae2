"""The controller's HTTP server: the REST API the CLI uses, and the bundles devices download.

Standard library only (``ThreadingHTTPServer``). The operations are :data:`ROUTES`, one line
each (method, path template, handler); ``fleet/openapi.json`` (:mod:`edgefleet.fleet.contract`,
served at ``GET /openapi.json``) describes every one, with its request and response schemas,
and ``tests/test_api_contract.py`` checks the two agree and fuzzes each operation. The
handlers live in :mod:`edgefleet.fleet.handlers`, one module per area; this module routes
to them. To add an operation: a handler function in its area's module, a line in
:data:`ROUTES`, an entry under ``paths`` in the document, and a method of
:class:`edgefleet.fleet.client.FleetClient`.

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

Input is checked before it reaches the controller (``fleet.handlers._checks``): a path
with ``..``, a backslash or an encoded ``/`` is refused (400) whatever the token; device ids
in paths and bodies must be contract ids (``agent.protocol.topics.check_id``), groups and
tags 1-64 printable characters, model keys ``NAME:SEMVER``, rollout ids ``r12``-like; bodies
are capped (bundles 512 MiB, keyrings 64 KiB, JSON 1 MiB) from ``Content-Length`` before
they are read. A bundle is verified in memory before a byte reaches the artifact folder,
which holds files named by sha256 only.
"""

from __future__ import annotations

import hmac
import logging
import socketserver
import ssl
import sys
import threading
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

from edgefleet.agent.errors import BrokerError
from edgefleet.agent.ports import bind_error
from edgefleet.agent.protocol.errors import (
    BundleError,
    EdgefleetError,
    RequestError,
    SchemaVersionError,
)
from edgefleet.agent.protocol.keyring import KeyringError
from edgefleet.fleet import access, dashboard
from edgefleet.fleet.access import Actor, Token, TokenRole, parse_tokens, tokens_by_secret
from edgefleet.fleet.control.actions import OPERATIONS
from edgefleet.fleet.controller import FleetController
from edgefleet.fleet.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    InvalidRolloutError,
    NotFoundError,
    StoreError,
)
from edgefleet.fleet.handlers import (
    devices,
    downloads,
    drift,
    groups,
    keys,
    models,
    public,
    rollouts,
    status,
)
from edgefleet.fleet.handlers._exchange import ApiHttpServer, Call, Exchange, Handle
from edgefleet.fleet.metrics import FleetMetrics
from edgefleet.fleet.rollout.validate import RolloutOptionError
from edgefleet.fleet.routing import Route, allowed, find, methods
from edgefleet.fleet.same_origin import check_same_origin

__all__ = ["ROUTES", "ApiServer", "parse_tokens"]

log = logging.getLogger(__name__)
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


class _Server(ApiHttpServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], controller: FleetController,
                 tokens: dict[str, Token]) -> None:
        super().__init__(address, _Handler)
        self.controller, self.tokens = controller, tokens
        self.metrics = FleetMetrics(controller)
        dashboard.attach(controller)  # device events are kept from the start
        self.stopping = threading.Event()
        self.pushes = threading.BoundedSemaphore(models.MAX_PUSHES)

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


class _Handler(Exchange):
    """Routes each request: the path checked, the token (unless the route is public) and
    its role, then the route's handler; an error is answered as JSON by its class."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

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
            self.drop_unread_body()
            status = _status(exc)
            if status >= HTTPStatus.BAD_REQUEST and self.command != "GET":
                log.info("refused %s %s: %s", self.command, path[:200], exc.message)
            self.send_json(_error_body(exc), status)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:
            log.exception("API request %s %s failed", self.command, self.path)
            self.drop_unread_body()
            self.send_json({"error": f"internal error: {type(exc).__name__}: {exc}",
                            "hint": "see the controller's log", "kind": "InternalError"},
                           HTTPStatus.INTERNAL_SERVER_ERROR)

    def _dispatch(self, path: str) -> None:
        """The route's handler, after the token unless the route is public. A path no route
        answers is 404 in a public folder; else, after the token, 404 for GET and POST and
        405 for any other method."""
        found = find(ROUTES, self.command, path)
        if found is None:
            self._no_route(path)
        actor = "" if found.route.public else self._actor()
        if isinstance(actor, Actor):
            self._check(actor, found.route, path)
        query = parse_qs(urlsplit(self.path).query, keep_blank_values=True)  # ?stale_s= refused
        found.route.handler(self, Call(found.params, query, actor))

    def _no_route(self, path: str) -> NoReturn:
        if self.command in ("GET", "HEAD") and path.startswith("/bundles/"):
            raise downloads.no_bundle(path)
        if self.command in ("GET", "HEAD") and path.startswith("/deltas/"):
            raise downloads.no_delta(path)
        if self.command in ("GET", "HEAD") and path.startswith("/dashboard"):
            raise public.no_page(path)
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

    def _check(self, caller: Actor, route: Route[Handle], path: str) -> None:
        """403 naming the role ``route`` needs; the refusal is written to the history."""
        try:
            access.check(caller, route.role, f"{self.command} {route.path}")
        except ForbiddenError as exc:
            self.controller.audit.refused(caller, f"{self.command} {route.path}",
                                          f"{self.command} {path[:200]}", exc.message,
                                          needs=exc.role)
            raise

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


# Every operation the API answers, first match wins; fleet/openapi.json describes each one
# (tests/test_api_contract.py checks both list the same). HEAD is answered as GET.
_V, _O, _A = TokenRole.VIEWER, TokenRole.OPERATOR, TokenRole.ADMIN
ROUTES: tuple[Route[Handle], ...] = (
    # no token: liveness, the contract, Prometheus, downloads, the page (its data needs one)
    Route("GET", "/healthz", public.healthz, None),
    Route("GET", "/openapi.json", public.openapi, None),
    Route("GET", "/metrics", public.metrics, None),
    Route("GET", "/bundles/{sha256}.efb", downloads.bundle_file, None),
    Route("GET", "/deltas/{pair}", downloads.delta_file, None),
    Route("GET", "/", public.page, None),
    Route("GET", "/dashboard", public.page, None),
    Route("GET", "/dashboard/", public.page, None),
    Route("GET", "/dashboard/{file}", public.page, None),
    # viewer: reading
    Route("GET", "/api/v1/whoami", keys.whoami, _V),
    Route("GET", "/api/v1/overview", status.overview, _V),
    Route("GET", "/api/v1/stream", status.stream, _V),
    Route("GET", "/api/v1/devices", devices.devices, _V),
    Route("GET", "/api/v1/groups", groups.groups, _V),
    Route("GET", "/api/v1/models", models.models, _V),
    Route("GET", "/api/v1/rollouts", rollouts.rollouts, _V),
    Route("GET", "/api/v1/rollouts/{rollout_id}", rollouts.rollout, _V),
    Route("GET", "/api/v1/history", status.history, _V),
    Route("GET", "/api/v1/keyring", keys.keyring, _V),
    Route("GET", "/api/v1/alerts", drift.alerts, _V),
    Route("GET", "/api/v1/drift", drift.drift, _V),
    # operator: rollouts, groups, tags, labels
    Route("POST", "/api/v1/devices/group", groups.set_group, _O),
    Route("POST", "/api/v1/devices/{device_id}/tags", groups.tag, _O),
    Route("POST", "/api/v1/devices/{device_id}/labels", devices.label_device, _O),
    Route("POST", "/api/v1/groups", groups.create_group, _O),
    Route("POST", "/api/v1/groups/{name}/delete", groups.delete_group, _O),
    Route("POST", "/api/v1/rollouts", rollouts.create_rollout, _O),
    *(Route[Handle]("POST", f"/api/v1/rollouts/{{rollout_id}}/{verb}",
                    partial(rollouts.operate, verb=verb), _O) for verb in OPERATIONS),
    Route("POST", "/api/v1/rollback", rollouts.rollback_group, _O),
    # admin: what reaches every device or changes what the fleet trusts, and who is in it
    Route("POST", "/api/v1/models", models.push_model, _A),
    Route("POST", "/api/v1/keyring", keys.publish_keyring, _A),
    Route("POST", "/api/v1/drift/{model}", drift.set_drift_policy, _A),
    Route("GET", "/api/v1/tokens", keys.tokens, _A),
    Route("POST", "/api/v1/devices/remove", devices.remove_devices, _A),
    Route("DELETE", "/api/v1/devices/{device_id}", devices.remove_device, _A),
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


def _checked_path(path: str) -> str:
    """Refuse a path that tries to climb or hide a separator, before any routing."""
    decoded = unquote(path)
    if (".." in decoded.split("/") or "\\" in decoded or "\x00" in decoded
            or decoded.count("/") != path.count("/")):
        raise RequestError(f"path {path[:200]!r} is not allowed", HTTPStatus.BAD_REQUEST,
                           hint="no '..' segments, backslashes or encoded '/' in API paths")
    return path


def _status(exc: EdgefleetError) -> HTTPStatus:
    """The HTTP status an error is answered with."""
    if isinstance(exc, RequestError):
        return HTTPStatus(exc.status)
    if isinstance(exc, StoreError):
        return (HTTPStatus.SERVICE_UNAVAILABLE if exc.transient
                else HTTPStatus.INTERNAL_SERVER_ERROR)
    return next((s for cls, s in _STATUS if isinstance(exc, cls)), HTTPStatus.BAD_REQUEST)
