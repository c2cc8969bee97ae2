"""The fleet as a whole, for viewers: the overview, the audit history and the live event
stream the web page follows."""

from __future__ import annotations

from http import HTTPStatus

from edgefleet.fleet import dashboard
from edgefleet.fleet.handlers import _checks as check
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["history", "overview", "stream"]


def overview(ex: Exchange, call: Call) -> None:
    ex.send_json(ex.controller.overview())


def history(ex: Exchange, call: Call) -> None:
    limit = check.limit(call.query.get("limit", ["100"])[0])
    target = call.query.get("target", [None])[0] or None
    action = call.query.get("action", [None])[0] or None
    ex.send_json([e.as_dict() for e in ex.controller.history(limit, target, action)])


def stream(ex: Exchange, call: Call) -> None:
    """Server-sent events until the client goes away or the server stops."""
    ex.send_response(HTTPStatus.OK)
    ex.send_header("Content-Type", "text/event-stream")
    ex.send_header("Cache-Control", "no-store")
    ex.end_headers()
    ex.close_connection = True

    def write(chunk: bytes) -> None:
        ex.wfile.write(chunk)
        ex.wfile.flush()

    dashboard.stream(ex.controller, write, ex.server.stopping)
