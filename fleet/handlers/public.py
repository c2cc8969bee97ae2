"""What needs no token: liveness, the contract, Prometheus metrics and the web page (whose
data needs one)."""

from __future__ import annotations

from http import HTTPStatus
from urllib.parse import urlsplit

from edgefleet.fleet import contract, dashboard
from edgefleet.fleet.errors import NotFoundError
from edgefleet.fleet.handlers._exchange import Call, Exchange

__all__ = ["healthz", "metrics", "no_page", "openapi", "page"]


def healthz(ex: Exchange, call: Call) -> None:
    ex.send_json({"ok": True, **ex.controller.overview(quality=False)})


def openapi(ex: Exchange, call: Call) -> None:
    ex.send_raw("application/json", contract.document_bytes())


def metrics(ex: Exchange, call: Call) -> None:
    ex.send_raw(*ex.server.metrics.render())


def page(ex: Exchange, call: Call) -> None:
    """The page's files; ``/`` and ``/dashboard`` redirect to ``/dashboard/``."""
    path = urlsplit(ex.path).path
    if path in ("/", "/dashboard"):
        ex.send_response(HTTPStatus.FOUND)
        ex.send_header("Location", "/dashboard/")
        ex.send_header("Content-Length", "0")
        ex.end_headers()
        return
    found = dashboard.static_file(path.removeprefix("/dashboard"))
    if found is None:
        raise no_page(path)
    ex.send_raw(*found, headers=dashboard.PAGE_HEADERS)


def no_page(path: str) -> NotFoundError:
    return NotFoundError(f"no such page: {path[:200]}", hint="open /dashboard/")
