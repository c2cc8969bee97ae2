"""Writes come from the controller's own page or from outside a browser, never from a page
of another origin.

A browser says where a request comes from: ``Origin`` on every POST (and every
cross-origin request), ``Sec-Fetch-Site`` on requests to HTTPS and to localhost. A write
(any method but GET and HEAD) that carries either and does not come from this
controller's own origin is refused with 403 before its token is looked at. A request
with neither header (the CLI, ``curl``, ``fleet.client``) is not a browser's and passes
to the token check.

The controller's own origin is the ``Host`` the request was sent to (the address the
page was loaded from, over the scheme the request came in) and the origins of
``--allow-origin`` (repeatable; when none is given, the origin of ``--public-url``).
Behind a reverse proxy that rewrites ``Host``, or one that terminates TLS and keeps it
(the page is ``https://host``, the request reaches the controller over ``http``), pass
``--allow-origin`` with the address people open the page at (docs/dashboards.md).

This is the second lock: writes need ``Authorization: Bearer``, which a browser never
adds by itself (the API sets no cookie and takes ``?token=`` only on GET), and the API
allows no cross-origin request (no CORS header, a preflight is refused here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from http import HTTPStatus
from urllib.parse import urlsplit

from edgefleet.agent.protocol.errors import RequestError

__all__ = ["SAFE_METHODS", "check_same_origin", "is_origin"]

SAFE_METHODS = frozenset({"GET", "HEAD"})
_SAME = frozenset({"same-origin", "none"})  # "none": the user opened it (typed, bookmark)
_DEFAULT_PORT = {"http": 80, "https": 443}


def is_origin(url: str) -> bool:
    """True when ``url`` names an http(s) origin a page can be opened at."""
    return _authority_of(url) is not None


def check_same_origin(method: str, header: Callable[[str], str | None], scheme: str,
                      allowed: str | Sequence[str]) -> None:
    """Refuse (403) a write ``header`` shows a browser sent for a page of another origin.

    ``header(name)`` reads one request header; ``scheme`` is how this request came in
    (``http`` or ``https``); ``allowed`` the other origins (or URLs) whose pages may act."""
    if method in SAFE_METHODS:
        return
    problem = _cross_site(header, scheme, [allowed] if isinstance(allowed, str) else allowed)
    if problem:
        raise RequestError(f"cross-site request refused: {problem}", HTTPStatus.FORBIDDEN,
                           hint="act on the fleet from the controller's own page "
                                "(/dashboard/) or with edgefleet fleet; behind a proxy, "
                                "pass fleet serve --allow-origin with the address the page "
                                "is opened at")


def _cross_site(header: Callable[[str], str | None], scheme: str,
                allowed: Sequence[str]) -> str:
    """Why the request is not from this controller's origin ("" when nothing says so)."""
    fetch_site = (header("Sec-Fetch-Site") or "").strip().lower()
    if fetch_site and fetch_site not in _SAME:
        return f"the browser sent it from a {fetch_site} page (Sec-Fetch-Site)"
    origin = (header("Origin") or "").strip()
    if not origin:
        return ""
    own = {_authority(scheme, header("Host") or ""), *map(_authority_of, allowed)}
    theirs = _authority_of(origin)
    if theirs is None or theirs not in own:
        return f"it comes from a page of {origin[:100]!r}, not of this controller"
    return ""


def _authority_of(url: str) -> tuple[str, int] | None:
    """(host, port) of an origin or URL; None for "null" or anything not http(s)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "http://[": no origin at all
        return None
    if parts.scheme not in _DEFAULT_PORT or not parts.netloc:
        return None
    return _authority(parts.scheme, parts.netloc)


def _authority(scheme: str, netloc: str) -> tuple[str, int] | None:
    """(lowercase host, port) of ``host[:port]``, the port defaulted by ``scheme``."""
    try:
        parts = urlsplit(f"//{netloc.strip()}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    return parts.hostname.lower(), port or _DEFAULT_PORT.get(scheme, 0)
