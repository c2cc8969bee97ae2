"""A local HTTP server speaking KServe v2 / Open Inference Protocol for an :class:`Agent`.

Standard library only (a device needs nothing more): ``ThreadingHTTPServer``
with one daemon thread per connection, HTTP/1.1 keep-alive, Nagle off, one
write per response, nothing logged per request. Endpoints::

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    200, or 503 until a model is loaded
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Errors are JSON ``{"error": "..."}``: 400 for a request the model cannot take
(naming what it expects), 404 for an unknown model, 503 before a model is loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import socket
import socketserver
import sys
import threading
import weakref
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from agent import __version__
from agent.core import Agent, NotReadyError
from agent.loader import LoadedModel
from agent.ports import bind_error
from agent.runtime.errors import InferenceError, ModelClosedError
from agent.serving.kserve import ModelView, RequestError, decode_infer, encode_infer

__all__ = ["InferenceServer"]

log = logging.getLogger(__name__)

_MODEL_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?")
_SERVER_META = json.dumps({"name": "edgefleet", "version": __version__,
                           "extensions": ["binary_tensor_data"]}).encode()
_HEADER_LENGTH = "inference-header-content-length"
_SERVER = f"edgefleet/{__version__}"
_MAX_LINE = 65536
_MAX_HEADERS = 100
_MAX_BODY = 256 * 1024 * 1024
_JSON = "application/json"
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\nServer: {_SERVER}\r\n"
                 for s in HTTPStatus}
_ROUTES_KEPT = 64


class InferenceServer:
    """Serve ``agent`` on ``host:port`` (port 0 picks a free one).

    ``start()`` serves from a background thread; ``serve_forever()`` serves in the
    calling thread (a CLI) until ``stop()`` is called from another thread or Ctrl-C.
    """

    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = 0) -> None:
        self._httpd = _Server((host, port), agent)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """``host:port``, as ``tritonclient`` takes it (no scheme)."""
        return f"{self._httpd.server_address[0]!s}:{self.port}"

    def start(self) -> InferenceServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name=f"edgefleet-http-{self.port}", daemon=True)
        self._httpd.started = True
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until ``stop()`` (from another thread) or Ctrl-C."""
        self._httpd.started = True
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
    """Owns the agent, the per-model protocol view and the open connections."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], agent: Agent) -> None:
        super().__init__(address, _Handler)
        self.agent, self.started = agent, False
        self._view: tuple[weakref.ref[LoadedModel], ModelView] | None = None
        self._routes: dict[str, tuple[weakref.ref[LoadedModel], ModelView, str | None]] = {}
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

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
        cached = self._view
        if cached is not None and cached[0]() is model:
            return cached[1]
        platform = f"{model.bundle.manifest.format}_{model.runtime.name}"
        view = ModelView(model.name, model.version, platform, model.runtime.inputs,
                         model.runtime.outputs)
        self._view = (weakref.ref(model), view)
        return view

    def routed(self, path: str, model: LoadedModel) -> tuple[ModelView, str | None] | None:
        """The view and suffix ``path`` was routed to, while ``model`` still serves."""
        hit = self._routes.get(path)
        return (hit[1], hit[2]) if hit is not None and hit[0]() is model else None

    def remember_route(self, path: str, model: LoadedModel, view: ModelView,
                       suffix: str | None) -> None:
        if len(self._routes) >= _ROUTES_KEPT:
            self._routes.clear()
        self._routes[path] = (weakref.ref(model), view, suffix)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._connections.discard(request)
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
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """A lean HTTP/1.1 keep-alive loop: request line, headers, a Content-Length body.

    ``BaseHTTPRequestHandler`` gives the socket setup; the request parsing is
    replaced by a smaller one (``email.parser`` costs tens of µs a request).
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def handle(self) -> None:
        try:
            while self._one_request():
                pass
        except OSError as exc:  # the peer went away, or stop() closed the connection
            log.debug("connection %s ended: %s", self.client_address, exc)

    def _one_request(self) -> bool:
        line = self.rfile.readline(_MAX_LINE)
        if not line.strip():
            return False
        try:
            method, self.path, version = _request_line(line)
            headers = _read_headers(self.rfile)
            length = _content_length(headers, method)
        except RequestError as exc:
            self._send(exc.status, _error_json(exc), _JSON, close=True)
            return False
        if headers.get("expect", "").lower() == "100-continue":
            self.request.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            return False  # the client went away mid-body
        self._dispatch(method, headers, body)
        return version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"

    def _dispatch(self, method: str, headers: dict[str, str], body: bytes) -> None:
        try:
            if method == "POST":
                self._post(headers, body)
            elif method == "GET":
                self._get()
            else:
                raise RequestError(f"method {method} is not supported", status=405)
        except RequestError as exc:
            self._send(exc.status, _error_json(exc), _JSON)
        except (NotReadyError, ModelClosedError) as exc:  # the next model answers: retry
            self._send(503, _error_json(exc), _JSON)
        except InferenceError as exc:
            self._send(400, _error_json(exc), _JSON)
        except OSError:
            raise  # the connection failed: nothing to answer, handle() ends it quietly
        except Exception as exc:
            log.exception("%s %s failed", method, self.path)
            self._send(500, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode(),
                       _JSON)

    def _post(self, headers: dict[str, str], body: bytes) -> None:
        view, suffix = self._route()
        if suffix != "/infer":
            raise RequestError(f"no POST endpoint at {self.path}", status=405)
        header_length = _header_length(headers)
        request = decode_infer(body, header_length, view)
        results = self.server.agent.predict(request.inputs)
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
            ready = self.server.agent.ready
            self._send(200 if ready else 503, b'{"ready":%s}' % (b"true" if ready else b"false"),
                       _JSON)
        elif path == "/v2":
            self._send(200, _SERVER_META, _JSON)
        else:
            view, suffix = self._route()
            if suffix == "/infer":
                raise RequestError(f"{path} takes POST", status=405)
            self._send(200, view.ready_json if suffix == "/ready" else view.metadata_json, _JSON)

    def _route(self) -> tuple[ModelView, str | None]:
        model = self.server.agent.model
        hit = self.server.routed(self.path, model) if model is not None else None
        if hit is not None:
            return hit
        path = self.path.partition("?")[0].rstrip("/")
        match = _MODEL_PATH.fullmatch(unquote(path) if "%" in path else path)
        if match is None:
            raise RequestError(f"no endpoint at {path or '/'}", status=404)
        name, version, suffix = match.groups()
        if model is None:
            raise RequestError("no model is loaded yet", hint="retry when /v2/health/ready is 200",
                               status=503)
        if name != model.name or (version is not None and version != model.version):
            asked = f"{name!r}" + (f" version {version!r}" if version else "")
            raise RequestError(f"unknown model {asked}; this device serves {model.name} "
                               f"version {model.version}", status=404)
        view = self.server.view(model)
        self.server.remember_route(self.path, model, view, suffix)
        return view, suffix

    def _send(self, status: int, body: bytes, content_type: str, extra: str = "",
              close: bool = False) -> None:
        if close:
            extra += "Connection: close\r\n"
        head = (f"{_STATUS_LINES[status]}Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n")
        self.request.sendall(head.encode("latin-1") + body)


def _request_line(line: bytes) -> tuple[str, str, str]:
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise RequestError(f"malformed request line {line[:60]!r}")
    return parts[0], parts[1], parts[2]


def _read_headers(rfile: io.BufferedIOBase) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = rfile.readline(_MAX_LINE)
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise RequestError(f"malformed header line {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    raise RequestError(f"more than {_MAX_HEADERS} headers", status=431)


def _content_length(headers: dict[str, str], method: str) -> int:
    if "transfer-encoding" in headers:
        raise RequestError("chunked request bodies are not supported", status=411,
                           hint="send Content-Length")
    if headers.get("content-encoding", "identity").lower() != "identity":
        raise RequestError(f"Content-Encoding {headers['content-encoding']} is not supported",
                           status=415, hint="send the request uncompressed")
    raw = headers.get("content-length")
    if raw is None:
        if method == "POST":
            raise RequestError("Content-Length is required", status=411)
        return 0
    if not raw.isdigit():
        raise RequestError(f"Content-Length {raw!r} is not a number")
    if int(raw) > _MAX_BODY:
        raise RequestError(f"body of {raw} bytes is over the {_MAX_BODY} byte limit", status=413)
    return int(raw)


def _header_length(headers: dict[str, str]) -> int | None:
    raw = headers.get(_HEADER_LENGTH)
    if raw is None:
        return None
    if not raw.isdigit():
        raise RequestError(f"Inference-Header-Content-Length {raw!r} is not a number")
    return int(raw)


def _error_json(exc: Exception) -> bytes:
    return json.dumps({"error": str(exc)}).encode()
