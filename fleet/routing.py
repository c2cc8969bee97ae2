"""The API's route table: each operation a method, a path template and its handler.

Templates are written as the OpenAPI document writes them (``/api/v1/rollouts/{rollout_id}``):
a ``{name}`` stands for one path segment, or part of one (``/bundles/{sha256}.efb``). The
table is the one place the server dispatches from, and ``tests/test_api_contract.py``
checks that it and ``fleet/openapi.json`` list the same operations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from edgefleet.fleet.access import TokenRole

__all__ = ["Match", "Route", "allowed", "find", "methods"]

H = TypeVar("H")
_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@dataclass(frozen=True)
class Route(Generic[H]):
    """``method path`` answered by ``handler``, with the least token role it needs (None:
    public, no token)."""

    method: str
    path: str
    handler: H
    role: TokenRole | None
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _compile(self.path))

    @property
    def public(self) -> bool:
        return self.role is None

    @property
    def params(self) -> list[str]:
        """The path's parameter names, in order."""
        return _PARAM.findall(self.path)


@dataclass(frozen=True)
class Match(Generic[H]):
    route: Route[H]
    params: dict[str, str]


def _compile(template: str) -> re.Pattern[str]:
    parts, last = [], 0
    for found in _PARAM.finditer(template):
        parts += [re.escape(template[last:found.start()]), f"(?P<{found.group(1)}>[^/]+)"]
        last = found.end()
    return re.compile("".join([*parts, re.escape(template[last:])]) + r"\Z")


def find(routes: Iterable[Route[H]], method: str, path: str) -> Match[H] | None:
    """The route answering ``method path`` (HEAD is answered as GET), with its parameters
    (still percent-encoded: the handler decodes and checks them). Of the templates of that
    method matching ``path``, the most specific answers (literal segments win); templates
    of other methods never shadow it: ``POST /api/v1/devices/group`` groups devices, and
    ``DELETE /api/v1/devices/group`` removes the device whose id is ``group``."""
    wanted = "GET" if method == "HEAD" else method
    for route in _specific((r for r in routes if r.method == wanted), path):
        if found := route.pattern.match(path):
            return Match(route, found.groupdict())
    return None


def allowed(routes: Iterable[Route[H]], path: str) -> str:
    """The methods the routes take on ``path`` (an ``Allow`` header; empty: no route)."""
    return ", ".join(methods(r for r in routes if r.pattern.match(path)))


def _specific(routes: Iterable[Route[H]], path: str) -> list[Route[H]]:
    """The routes matching ``path`` with the fewest parameters (literal segments win)."""
    matching = [r for r in routes if r.pattern.match(path)]
    fewest = min((len(r.params) for r in matching), default=0)
    return [r for r in matching if len(r.params) == fewest]


def methods(routes: Iterable[Route[H]]) -> list[str]:
    """Every method the table answers, HEAD with GET, sorted (an ``Allow`` header)."""
    taken = {r.method for r in routes}
    return sorted(taken | ({"HEAD"} if "GET" in taken else set()))

