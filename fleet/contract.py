"""The REST API's contract: the OpenAPI 3.1 document ``openapi.json`` next to this module,
shipped in the package and served at ``GET /openapi.json``.

It describes every operation of :data:`edgefleet.fleet.api.ROUTES` (request and response
schemas, the bearer token, the error body); ``tests/test_api_contract.py`` checks that the
two list the same operations and fuzzes each one against a live controller.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["document", "document_bytes", "operations"]


@cache
def document_bytes() -> bytes:
    """The document as stored (read once)."""
    return resources.files(__package__).joinpath("openapi.json").read_bytes()


def document() -> dict[str, Any]:
    """The document, parsed (a fresh copy each call)."""
    parsed: dict[str, Any] = json.loads(document_bytes())
    return parsed


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """``(METHOD, path template)`` -> that operation's object."""
    return {(method.upper(), path): operation
            for path, item in document()["paths"].items()
            for method, operation in item.items() if method in _METHODS}


_METHODS = frozenset({"get", "put", "post", "delete", "patch", "head", "options", "trace"})
