"""A local HTTP server speaking KServe v2 / Open Inference Protocol for the models of a
:class:`~edgefleet.agent.models.ModelSet` (or one :class:`Agent`), routed by name.

Standard library only (a device needs nothing more): ``ThreadingHTTPServer``
with one daemon thread per connection, HTTP/1.1 keep-alive, Nagle off, one
write per response, nothing logged per request. Endpoints::

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200, or 503 until every model is loaded
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Errors are JSON ``{"error": "..."}``: 400 for a request the model cannot take
(naming what it expects) or that breaks the protocol's schema (naming the field),
404 for an unknown model, 503 before the named model is loaded. A request runs on
the agent of the model it names: another model switching never touches it.

Every connection is held to :class:`~agent.serving.limits.HttpLimits`: bodies
over their bound are answered 413 by their ``Content-Length`` before being read,
a request that does not arrive in time is answered 408 (an idle keep-alive
connection is closed), a connection over ``max_connections`` is answered 503 and
closed, and large bodies held at once share one byte budget (else 503).

With :class:`~agent.serving.security.HttpSecurity` the server speaks HTTPS only: each
connection's TLS handshake runs in its own thread under the same deadline as a
request's head (the watchdog cuts a client that never finishes it), plain HTTP sent to
the port is answered 400 in plain text and closed, and callers of every endpoint but
the health probes prove who they are (a bearer token or a client certificate), else
401 before any body is read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
import weakref
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from edgefleet.agent import __version__
from edgefleet.agent.core import Agent, NotReadyError
from edgefleet.agent.loader import LoadedModel
from edgefleet.agent.models import ModelSet
from edgefleet.agent.ports import bind_error
from edgefleet.agent.runtime.errors import InferenceError, ModelClosedError
from edgefleet.agent.serving._head import MAX_LINE, Lengths, lengths, read_headers, request_line
from edgefleet.agent.serving.errors import IncompleteRequestError, RequestError
from edgefleet.agent.serving.guard import Budget, Every, Watch, Watchdog
from edgefleet.agent.serving.kserve import ModelView, decode_infer, encode_infer
from edgefleet.agent.serving.limits import JSON_WEIGHT, HttpLimits
from edgefleet.agent.serving.security import OPEN_PATHS, HttpSecurity, tls_context

__all__ = ["InferenceServer"]

log = logging.getLogger(__name__)

_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?")
_SERVER_META = json.dumps({"name": "edgefleet", "version": __version__,
                           "extensions": ["binary_tensor_data"]}).encode()
_SERVER = f"edgefleet/{__version__}"
_JSON = "application/json"
_SMALL = 16 * 1024  # bodies up to this size take nothing from the shared budget
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\nServer: {_SERVER}\r\n"
                 for s in HTTPStatus}
_ROUTES_KEPT = 64
_TLS_RECORD = 0x16  # the first byte a TLS client sends (a handshake record)
_NOT_TLS = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 46\r\n"
            b"Connection: close\r\n\r\nthis port speaks HTTPS: use an https:// URL.\r\n")
_BEARER = 'WWW-Authenticate: Bearer realm="edgefleet"'
_ONE = ""  # the key of a lone agent: it answers to the name of whatever model it serves
_Route = tuple[Agent, ModelView, str | None]


class InferenceServer:
    """Serve ``models`` (or one agent's model) on ``host:port`` (port 0 picks a free one).

    ``start()`` serves from a background thread; ``serve_forever()`` serves in the
    calling thread (a CLI) until ``stop()`` is called from another thread or Ctrl-C.
    """

    def __init__(self, models: ModelSet | Agent, host: str = "127.0.0.1", port: int = 0,
                 limits: HttpLimits | None = None, security: HttpSecurity | None = None) -> None:
        served = models if isinstance(models, ModelSet) else ModelSet.of(models, _ONE)
        self._httpd = _Server((host, port), served, limits or HttpLimits(), security)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """``host:port``, as ``tritonclient`` takes it (no scheme)."""
        return f"{self._httpd.server_address[0]!s}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://host:port``, or ``https://`` when it serves TLS."""
        return f"{'https' if self._httpd.tls else 'http'}://{self.url}"

    @property
    def limits(self) -> HttpLimits:
        return self._httpd.limits

    def start(self) -> InferenceServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name=f"edgefleet-http-{self.port}", daemon=True)
        self._httpd.begin()
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` (from another thread) or Ctrl-C."""
        self._httpd.begin()
        try:
            self._httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self._httpd.close()

    def stop(self) -> None:
        """Stop accepting, close open keep-alive connections; requests in flight may fail."""
        self._httpd.stop_loop()
        self._httpd.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    """Owns the models, their protocol views and the open connections."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], models: ModelSet, limits: HttpLimits,
                 security: HttpSecurity | None) -> None:
        self.tls = tls_context(security) if security is not None else None
        self.guard = security if security is not None and security.guarded else None
        self.tls_clients = security is not None and security.client_ca is not None
        super().__init__(address, _Handler)
        self.models, self.started, self.limits = models, False, limits
        self._views: dict[str, tuple[weakref.ref[LoadedModel], ModelView]] = {}
        self._routes: dict[str, tuple[weakref.ref[LoadedModel], _Route]] = {}
        self.watchdog = Watchdog(period_s=min(0.5, limits.timeout_s / 4))
        self.budget = Budget(limits.in_flight)
        self._refusals, self._unproven = Every(10.0), Every(10.0)

    def begin(self) -> None:
        self.started = True
        self.watchdog.start(f"edgefleet-http-watchdog-{self.server_address[1]}")

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves getfqdn(host): seconds on a device without DNS.
        try:
            socketserver.TCPServer.server_bind(self)
        except OSError as exc:
            host, port = self.server_address[:2]
            raise bind_error(str(host), int(port), "--http HOST:PORT", exc) from exc
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def view(self, model: LoadedModel) -> ModelView:
        """The protocol view of ``model``, made once per loaded model."""
        cached = self._views.get(model.name)
        if cached is not None and cached[0]() is model:
            return cached[1]
        platform = f"{model.bundle.manifest.format}_{model.runtime.name}"
        view = ModelView(model.name, model.version, platform, model.runtime.inputs,
                         model.runtime.outputs)
        if len(self._views) >= _ROUTES_KEPT:
            self._views.clear()
        self._views[model.name] = (weakref.ref(model), view)
        return view

    def agent_of(self, name: str) -> Agent | None:
        """The agent serving model ``name`` (a lone agent answers to its model's name)."""
        agent = self.models.get(name)
        if agent is None:
            lone = self.models.get(_ONE)
            model = lone.model if lone is not None else None
            agent = lone if model is not None and model.name == name else None
        return agent

    def routed(self, path: str) -> _Route | None:
        """The agent, view and suffix ``path`` was routed to, while that model still serves."""
        hit = self._routes.get(path)
        if hit is None:
            return None
        agent = hit[1][0]
        return hit[1] if hit[0]() is agent.model else None

    def remember_route(self, path: str, model: LoadedModel, route: _Route) -> None:
        if len(self._routes) >= _ROUTES_KEPT:
            self._routes.clear()
        self._routes[path] = (weakref.ref(model), route)

    def served(self) -> str:
        """What this device serves, for a 404."""
        served = [(m.name if key == _ONE else key, m) for key, agent in self.models.items()
                  if (m := agent.model) is not None]  # by the name a request routes by
        return ", ".join(f"{name} version {m.version}" for name, m in served) or "none"

    def get_request(self) -> tuple[Any, Any]:
        """The next connection, wrapped for TLS without its handshake (that runs in the
        connection's own thread, under its deadline, so the accept loop never waits)."""
        sock, address = super().get_request()
        if self.tls is None:
            return sock, address
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), \
            address

    def process_request(self, request: Any, client_address: Any) -> None:
        if len(self.watchdog) >= self.limits.max_connections:
            self._refuse(request)
            return
        self.watchdog.add(request)
        super().process_request(request, client_address)

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 on a connection over the bound, without a thread, and close it."""
        self._log_refusal()
        if isinstance(request, ssl.SSLSocket):  # no handshake here: the accept loop waits
            self.shutdown_request(request)      # for nobody; the client sees it closed
            return
        body = _error_json(RequestError(f"{self.limits.max_connections} connections are "
                                        "open, the most this server takes",
                                        hint="retry in a second"))
        with contextlib.suppress(OSError):  # the peer may be gone already
            request.settimeout(1.0)
            request.sendall(_head(503, _JSON, len(body), "Retry-After: 1\r\n", True) + body)
        self.shutdown_request(request)

    def _log_refusal(self) -> None:
        """A warning at most every 10 s, with the count since (a flood floods no log)."""
        refused = self._refusals.count(_monotonic())
        if refused:
            log.warning("refused %d connection(s): %d open, the most this server takes "
                        "(agent run --http-max-connections)", refused, len(self.watchdog))

    def log_unproven(self, client: Any) -> None:
        """A warning at most every 10 s: requests answered 401, the last one's address."""
        refused = self._unproven.count(_monotonic())
        if refused:
            log.warning("answered %d request(s) 401: no valid bearer token or client "
                        "certificate (the last from %s)", refused, client[0])

    def shutdown_request(self, request: Any) -> None:
        self.watchdog.remove(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # the peer went away, or stop() closed it
            log.debug("connection from %s: %s", client_address, sys.exc_info()[1])
        else:
            log.exception("connection from %s failed", client_address)

    def stop_loop(self) -> None:
        """``shutdown()``, waking the accept loop now rather than at its next poll."""
        if not self.started:
            return
        stopper = threading.Thread(target=self.shutdown, daemon=True)
        stopper.start()
        while stopper.is_alive():
            self._wake()
            stopper.join(0.02)

    def _wake(self) -> None:
        host, port = self.server_address[:2]
        target = "127.0.0.1" if host in ("0.0.0.0", "") else str(host)
        with contextlib.suppress(OSError):
            socket.create_connection((target, port), timeout=0.1).close()

    def close(self) -> None:
        self.server_close()
        self.watchdog.stop()
        for connection in self.watchdog.take_all():
            with contextlib.suppress(OSError):  # the TCP socket under a TLS one too
                socket.socket.shutdown(connection, socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """A lean HTTP/1.1 keep-alive loop: request line, headers, a Content-Length body.

    ``BaseHTTPRequestHandler`` gives the socket setup; the request parsing is
    replaced by a smaller one (``email.parser`` costs tens of µs a request). Each
    step sets the connection's deadline; the server's watchdog enforces it.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server
    watch: Watch
    limits: HttpLimits
    proven: bool  # the caller showed a client certificate, or no proof is asked for

    def setup(self) -> None:
        self.watch, self.limits = self.server.watchdog.get(self.request), self.server.limits
        self.proven = self.server.guard is None
        if isinstance(self.request, ssl.SSLSocket):
            self._handshake(self.request)
        super().setup()

    def _handshake(self, sock: ssl.SSLSocket) -> None:
        """TLS, within the time a request's head has; a client speaking plain HTTP is told
        so in plain text. Raises OSError (ending the connection quietly) when it fails."""
        self.watch.deadline = _monotonic() + self.limits.timeout_s
        first = socket.socket.recv(sock, 1, socket.MSG_PEEK)  # the TCP bytes, not TLS's
        if not first:
            raise ConnectionAbortedError("closed (or out of time) before the TLS handshake")
        if first[0] != _TLS_RECORD:
            socket.socket.sendall(sock, _NOT_TLS)
            raise ConnectionAbortedError("plain HTTP on the HTTPS port")
        sock.do_handshake()
        self.proven = self.proven or bool(sock.getpeercert())  # a client CA's certificate

    def handle(self) -> None:
        try:
            while self._one_request():
                pass
        except OSError as exc:  # the peer went away, or stop() closed the connection
            log.debug("connection %s ended: %s", self.client_address, exc)

    def _one_request(self) -> bool:
        self.watch.deadline = _monotonic() + self.limits.timeout_s
        line = self.rfile.readline(MAX_LINE)
        if not line.strip():
            return False  # closed, idle past the timeout, or a stray line end
        try:
            method, self.path, version = request_line(line)
            headers = read_headers(self.rfile)
            if not self.proven and not self._allowed(headers):
                return not _has_body(headers)  # a body announced, unread: the connection ends
            size = lengths(headers, method, self.limits)
        except RequestError as exc:
            self._refuse(exc)
            return False
        taken = self._take(size)
        if taken is None:
            return False
        try:
            return self._answer(method, version, headers, size)
        finally:
            if taken:
                self.server.budget.give(taken)

    def _allowed(self, headers: dict[str, str]) -> bool:
        """Whether the request may go on (a health probe, or a valid token); else it is
        answered 401 here, before its lengths are checked or its body is read."""
        assert self.server.guard is not None
        if self.path.partition("?")[0].rstrip("/") in OPEN_PATHS:
            return True
        given = headers.get("authorization")
        if given is not None and self.server.guard.accepts(given):
            return True
        self.server.log_unproven(self.client_address)
        error = "" if given is None else ', error="invalid_token"'
        what = "no bearer token" if given is None else "a bearer token this server does not take"
        certificate = " or a client certificate from the fleet CA" if self.server.tls_clients \
            else ""
        body = _error_json(RequestError(f"{what}: {self.path[:100]} needs "
                                        f"'Authorization: Bearer TOKEN'{certificate}"))
        self._send(401, body, _JSON, f"{_BEARER}{error}\r\n", close=_has_body(headers))
        return False

    def _take(self, size: Lengths) -> int | None:
        """The share of the body budget this request holds (0 for a small body), or None
        when it waited for one in vain (then answered 503)."""
        if size.body <= _SMALL:
            return 0
        self.watch.deadline = _NEVER  # the wait for the budget has its own bound
        taken = _weight(size)
        if self.server.budget.take(taken, self.limits.timeout_s):
            return taken
        self._refuse(RequestError("too many large requests are being read at once",
                                  hint="retry in a second", status=503))
        return None

    def _answer(self, method: str, version: str, headers: dict[str, str],
                size: Lengths) -> bool:
        if headers.get("expect", "").lower() == "100-continue":
            self.request.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self._body(size.body) if size.body else b""
        if body is None:
            return False
        self.watch.deadline = _NEVER  # the answer may take as long as inference does
        self._dispatch(method, body, size.header)
        return version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"

    def _body(self, length: int) -> bytes | None:
        """The body, or None (answered) when it stopped short or ran out of time."""
        self.watch.deadline = _monotonic() + self.limits.body_seconds(length)
        body = self.rfile.read(length)
        if len(body) < length:
            self._refuse(IncompleteRequestError(f"the body ended after {len(body)} of the "
                                                f"{length} bytes its Content-Length announced"))
            return None
        return body

    def _refuse(self, exc: RequestError) -> None:
        """Answer an error that ends the connection (408 if its time ran out mid-request)."""
        if self.watch.expired and isinstance(exc, IncompleteRequestError):
            exc = RequestError(f"the request did not arrive within its time "
                               f"({self.limits.timeout_s:g} s for the head, then "
                               f"{self.limits.min_body_rate} bytes a second)", status=408)
        self._send(exc.status, _error_json(exc), _JSON, close=True)

    def _dispatch(self, method: str, body: bytes, header_length: int | None) -> None:
        try:
            if method == "POST":
                self._post(body, header_length)
            elif method == "GET":
                self._get()
            else:
                raise RequestError(f"method {method[:20]} is not supported", status=405)
        except RequestError as exc:
            self._send(exc.status, _error_json(exc), _JSON)
        except (NotReadyError, ModelClosedError) as exc:  # the next model answers: retry
            self._send(503, _error_json(exc), _JSON)
        except InferenceError as exc:
            self._send(400, _error_json(exc), _JSON)
        except OSError:
            raise  # the connection failed: nothing to answer, handle() ends it quietly
        except Exception as exc:  # a bug: answer 500 with its name, keep the connection
            log.exception("%s %s failed", method, self.path)
            self._send(500, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode(),
                       _JSON)

    def _post(self, body: bytes, header_length: int | None) -> None:
        agent, view, suffix = self._route()
        if suffix != "/infer":
            raise RequestError(f"no POST endpoint at {self.path}", status=405)
        request = decode_infer(body, header_length, view, self.limits.max_depth)
        results = agent.predict(request.inputs)
        payload, json_length = encode_infer(view, request, results)
        if json_length is None:
            self._send(200, payload, _JSON)
        else:
            self._send(200, payload, "application/octet-stream",
                       f"Inference-Header-Content-Length: {json_length}\r\n")

    def _get(self) -> None:
        path = self.path.partition("?")[0].rstrip("/")
        if path == "/v2/health/live":
            self._send(200, b'{"live":true}', _JSON)
        elif path == "/v2/health/ready":
            ready = self.server.models.ready
            self._send(200 if ready else 503, b'{"ready":%s}' % (b"true" if ready else b"false"),
                       _JSON)
        elif path == "/v2":
            self._send(200, _SERVER_META, _JSON)
        else:
            _, view, suffix = self._route()
            if suffix == "/infer":
                raise RequestError(f"{path} takes POST", status=405)
            self._send(200, view.ready_json if suffix == "/ready" else view.metadata_json, _JSON)

    def _route(self) -> _Route:
        hit = self.server.routed(self.path)
        if hit is not None:
            return hit
        path = self.path.partition("?")[0].rstrip("/")
        match = _MODEL_PATH.fullmatch(unquote(path) if "%" in path else path)
        if match is None:
            raise RequestError(f"no endpoint at {path[:200] or '/'}", status=404)
        name, version, suffix = match.groups()
        agent = self.server.agent_of(name)
        model = agent.model if agent is not None else None
        broken = self.server.models.broken().get(name) if agent is None else None
        if broken is not None:
            raise RequestError(f"model {name!r} is installed but cannot be served: {broken}",
                               hint="install a bundle of it that loads ('edgefleet agent "
                                    "install BUNDLE') or remove it", status=503)
        if model is None and agent is not None:
            raise RequestError(f"model {name!r} is not loaded yet (its first bundle is on its "
                               f"way)", hint=f"retry when /v2/models/{name}/ready is 200",
                               status=503)
        if model is None and not self.server.models.ready:
            raise RequestError("no model is loaded yet", hint="retry when /v2/health/ready is 200",
                               status=503)
        if agent is None or model is None or (version is not None and version != model.version):
            asked = f"{name[:100]!r}" + (f" version {version[:100]!r}" if version else "")
            raise RequestError(f"unknown model {asked}; this device serves "
                               f"{self.server.served()}", status=404)
        route = (agent, self.server.view(model), suffix)
        self.server.remember_route(self.path, model, route)
        return route

    def _send(self, status: int, body: bytes, content_type: str, extra: str = "",
              close: bool = False) -> None:
        self.watch.deadline = _monotonic() + self.limits.body_seconds(len(body))
        self.request.sendall(_head(status, content_type, len(body), extra, close) + body)


_NEVER = float("inf")
_monotonic = time.monotonic


def _head(status: int, content_type: str, length: int, extra: str, close: bool) -> bytes:
    if close:
        extra += "Connection: close\r\n"
    return (f"{_STATUS_LINES[status]}Content-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode("latin-1")


def _has_body(headers: dict[str, str]) -> bool:
    return headers.get("content-length", "0") != "0" or "transfer-encoding" in headers


def _weight(size: Lengths) -> int:
    """What a large request takes from the shared budget: its body, and its JSON again
    ``JSON_WEIGHT`` times (parsing it may take that)."""
    json_part = size.body if size.header is None else size.header
    return size.body + JSON_WEIGHT * json_part


def _error_json(exc: Exception) -> bytes:
    return json.dumps({"error": str(exc)}).encode()
