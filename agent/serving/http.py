"""A local HTTP server speaking KServe v2 / Open Inference Protocol for an :class:`Agent`.

Standard library only (a device needs nothing more): HTTP/1.1 keep-alive,
one thread per connection, Nagle off, one write per response.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from socketserver import StreamRequestHandler
from typing import Any

from agent import __version__
from agent.core import Agent, NotReadyError
from agent.loader import LoadedModel
from agent.runtime.errors import InferenceError
from agent.serving.kserve import RequestError, decode_infer, encode_infer, model_metadata

__all__ = ["InferenceServer"]

log = logging.getLogger(__name__)
_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?$")
_SERVER_META = {"name": "edgefleet", "version": __version__,
                "extensions": ["binary_tensor_data"]}
_HEADER_LENGTH = "Inference-Header-Content-Length"
_SERVER = f"edgefleet/{__version__}"
_MAX_LINE = 65536
_MAX_HEADERS = 100


class InferenceServer:
    """Serve ``agent`` on ``host:port`` (port 0 picks a free one) from a background thread."""

    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = 0) -> None:
        handler = type("BoundHandler", (_Handler,), {"agent": agent, "meta_cache": {}})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        name="edgefleet-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"{self._httpd.server_address[0]!s}:{self.port}"

    def start(self) -> InferenceServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(StreamRequestHandler):
    """A lean HTTP/1.1 keep-alive loop: request line, headers, Content-Length body."""

    disable_nagle_algorithm = True
    agent: Agent
    meta_cache: dict[int, dict[str, Any]]

    def handle(self) -> None:
        while self._one_request():
            pass

    def _one_request(self) -> bool:
        line = self.rfile.readline(_MAX_LINE)
        if not line.strip():
            return False
        try:
            method, target, version = line.decode("latin-1").split()
            self.headers = _read_headers(self.rfile)
        except ValueError:
            self._json(400, {"error": "malformed HTTP request"}, close=True)
            return False
        self.path = target
        keep_alive = version == "HTTP/1.1" and self.headers.get("connection") != "close"
        if "content-length" not in self.headers and method == "POST":
            self._json(411, {"error": "Content-Length is required"}, close=True)
            return False
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self._dispatch(method, body)
        return keep_alive

    def _dispatch(self, method: str, body: bytes) -> None:
        try:
            if method == "GET":
                self._get()
            elif method == "POST":
                self._post(body)
            else:
                raise RequestError(405, f"method {method} is not supported")
        except RequestError as exc:
            self._json(exc.status, {"error": str(exc)})
        except (InferenceError, ValueError) as exc:
            self._json(400, {"error": str(exc)})
        except NotReadyError as exc:
            self._json(503, {"error": str(exc)})
        except Exception as exc:
            log.exception("request %s %s failed", method, self.path)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _get(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v2/health/live":
            self._json(200, {"live": True})
        elif path == "/v2/health/ready":
            ready = self.agent.ready
            self._json(200 if ready else 503, {"ready": ready})
        elif path == "/v2":
            self._json(200, _SERVER_META)
        else:
            model, suffix = self._route(path)
            if suffix == "/ready":
                self._json(200, {"name": model.name, "ready": True})
            elif suffix is None:
                self._json(200, self._metadata(model))
            else:
                raise RequestError(405, f"{path} takes POST")

    def _post(self, body: bytes) -> None:
        model, suffix = self._route(self.path.split("?", 1)[0].rstrip("/"))
        if suffix != "/infer":
            raise RequestError(404, f"no POST endpoint at {self.path}")
        header = self.headers.get(_HEADER_LENGTH.lower())
        request = decode_infer(body, int(header) if header else None, model.runtime.inputs)
        results = self.agent.predict(request.inputs)
        payload, header_length = encode_infer(model.name, model.version, request, results)
        extra = {_HEADER_LENGTH: str(header_length)} if header_length is not None else {}
        content_type = "application/octet-stream" if extra else "application/json"
        self._send(200, payload, content_type, extra)

    def _route(self, path: str) -> tuple[LoadedModel, str | None]:
        match = _MODEL_PATH.match(path)
        if match is None:
            raise RequestError(404, f"no endpoint at {path}")
        name, version, suffix = match.groups()
        model = self.agent.model
        if model is None:
            raise RequestError(503, "no model is loaded yet", hint="retry when /v2/health/ready")
        if name != model.name or (version is not None and version != model.version):
            served = f"{model.name} version {model.version}"
            raise RequestError(404, f"unknown model {name!r}" +
                               (f" version {version!r}" if version else "") +
                               f"; this device serves {served}")
        return model, suffix

    def _metadata(self, model: LoadedModel) -> dict[str, Any]:
        key = id(model)
        meta = self.meta_cache.get(key)
        if meta is None:
            meta = model_metadata(model.name, model.version,
                                  f"{model.bundle.manifest.format}_{model.runtime.name}",
                                  model.runtime.inputs, model.runtime.outputs)
            self.meta_cache.clear()
            self.meta_cache[key] = meta
        return meta

    def _json(self, status: int, doc: Any, close: bool = False) -> None:
        extra = {"Connection": "close"} if close else {}
        self._send(status, json.dumps(doc).encode(), "application/json", extra)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Server: {_SERVER}",
                 f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
                 *(f"{k}: {v}" for k, v in extra.items())]
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def _read_headers(rfile: Any) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = rfile.readline(_MAX_LINE)
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many headers")
