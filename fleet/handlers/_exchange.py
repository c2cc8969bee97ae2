"""One request's plumbing, shared by every handler: the body read within a limit (from
``Content-Length`` alone, before a byte of it), a refused body read away so the connection
stays usable, and answers written as JSON or raw bytes.

:class:`Exchange` is the request (a ``BaseHTTPRequestHandler``); the server's dispatching
subclass lives in :mod:`edgefleet.fleet.api`. :class:`Call` is what the route matched.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from edgefleet.agent.protocol.errors import RequestError
from edgefleet.fleet import dashboard
from edgefleet.fleet.access import Token
from edgefleet.fleet.controller import FleetController
from edgefleet.fleet.errors import InvalidRolloutError
from edgefleet.fleet.handlers import _checks as check
from edgefleet.fleet.metrics import FleetMetrics

__all__ = ["CHUNK", "RETRY_AFTER_S", "ApiHttpServer", "Call", "Exchange", "Handle"]

CHUNK = 256 * 1024
RETRY_AFTER_S = 5  # a 503's Retry-After
_MAX_JSON = 1024 * 1024
_DRAIN = 8 * 1024 * 1024  # an oversized body up to this is read away, so the client sees the 413


class ApiHttpServer(ThreadingHTTPServer):
    """What every request to one API server shares (set by :mod:`edgefleet.fleet.api`)."""

    controller: FleetController
    tokens: dict[str, Token]
    metrics: FleetMetrics
    stopping: threading.Event  # set: open event streams end
    pushes: threading.BoundedSemaphore  # bundle uploads streaming at once


class Exchange(BaseHTTPRequestHandler):
    """A request and its answer, as the handlers see them."""

    server: ApiHttpServer
    protocol_version = "HTTP/1.1"
    _consumed = True  # whether this request's body was read (or needs no reading)
    _allow = ""  # the methods a 405 names

    @property
    def controller(self) -> FleetController:
        """The controller this server answers for."""
        return self.server.controller

    def read_body(self, limit: int) -> bytes:
        """The request body, refused from its ``Content-Length`` alone when above ``limit``."""
        length = self.read_length(limit)
        return self.rfile.read(length) if length else b""

    def read_length(self, limit: int) -> int:
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

    def read_json(self) -> dict[str, Any]:
        """The body as a JSON object (none: ``{}``), at most 1 MiB."""
        raw = self.read_body(_MAX_JSON)
        try:
            data = json.loads(raw, parse_int=check.json_int) if raw else {}
        except (ValueError, RecursionError) as exc:
            raise InvalidRolloutError(f"request body is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidRolloutError("request body must be a JSON object")
        return data

    def drop_unread_body(self) -> None:
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
            chunk = self.rfile.read(min(CHUNK, length))
            if not chunk:
                break
            length -= len(chunk)

    def send_json(self, data: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = dashboard.json_text(data).encode()  # strict JSON: never NaN
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # fleet data: not kept on disk
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", self._allow)
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_raw(self, content_type: str, body: bytes,
                 headers: dict[str, str] | None = None) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@dataclass(frozen=True)
class Call:
    """What a handler is called with: the route's path parameters (percent-encoded), the
    query, and the token's name (empty on a public route)."""

    params: dict[str, str]
    query: dict[str, list[str]]
    actor: str

    def rollout_id(self) -> str:
        return check.rollout_id(unquote(self.params["rollout_id"]))


Handle = Callable[[Exchange, Call], None]
