"""The live fleet page served by the controller: static files and a server-sent event stream.

``GET /dashboard/?token=...`` loads a page (plain HTML, CSS and JavaScript in
``static/``, no build step, nothing fetched from elsewhere) that reads the REST API with
the token and follows ``GET /api/v1/stream`` (:func:`stream`) to stay live: fleet
overview, rollouts with their waves and gates, per-version latency, error rate and
agreement charts, and a page per device with its recent events.

Device events are not stored by the controller; :func:`attach` registers a journal that
keeps the latest ones per device. The stream attaches on first use; a server that wants
the events from before the first page was opened calls :func:`attach` at start.
"""

from __future__ import annotations

import re
from importlib import resources

from edgefleet.fleet.dashboard._journal import EventJournal, attach
from edgefleet.fleet.dashboard._stream import json_text, stream

__all__ = ["EventJournal", "attach", "json_text", "static_file", "stream"]

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
