"""The live fleet page served by the controller: static files and a server-sent event stream.

``GET /dashboard/`` loads a page (plain HTML, CSS and JavaScript in
``static/``, no build step, nothing fetched from elsewhere) that reads the REST API with
the token entered in its form (never one in its address) and follows
``GET /api/v1/stream`` (:func:`stream`) to stay live: fleet overview, rollouts with
their waves and gates, per-version latency, error rate and
agreement charts, the history, and a page per device with its recent events.

An operator acts from it: pause, resume, abort and roll back a rollout, or create one
from a form. Every action is confirmed in a dialog that says what will happen, then
sent to the same ``POST /api/v1/...`` endpoint the CLI uses, with the token (kept in
``sessionStorage``) in an ``Authorization`` header; the controller checks and audits
it as it does the CLI's, and the page shows its error and hint when it refuses.

Device events are not stored by the controller; :func:`attach` registers a journal that
keeps the latest ones per device. The stream attaches on first use; a server that wants
the events from before the first page was opened calls :func:`attach` at start.
"""

from __future__ import annotations

import re
from importlib import resources

from edgefleet.fleet.dashboard._journal import EventJournal, attach
from edgefleet.fleet.dashboard._stream import json_text, stream

__all__ = ["PAGE_HEADERS", "EventJournal", "attach", "json_text", "static_file", "stream"]

#: Sent with every page file: scripts, styles and requests from this origin only (no
#: inline script or style attribute, nothing from elsewhere), never framed by another
#: page (a click on a framed confirm button is not the operator's), no referrer, and
#: never stored by the browser (``no-store``: nothing of the page kept on disk).
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_NAME = re.compile(r"[a-z0-9_-]+\.(html|js|css|svg)")
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}


def static_file(path: str) -> tuple[str, bytes] | None:
    """(content type, bytes) of a page file at ``path`` ("/" is the page), or None."""
    name = path.strip("/") or "index.html"
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    file = resources.files(__package__).joinpath("static").joinpath(name)
    if not file.is_file():
        return None
    return _TYPES[match.group(1)], file.read_bytes()
