"""``edgefleet fleet history``: what was done, when and by which token; ``fleet whoami``:
the token's name and role."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any

import typer

from edgefleet.cli.fleet.common import DEFAULT_URL, ControllerOpt, JsonOpt, TokenOpt
from edgefleet.cli.fleet.common import client as _client
from edgefleet.cli.fleet.common import run as _run
from edgefleet.cli.output import emit, table

__all__ = ["history", "whoami"]


def history(limit: Annotated[int, typer.Option(help="Newest N entries")] = 50,
            target: Annotated[str | None, typer.Option(help="Only this target")] = None,
            action: Annotated[str | None, typer.Option(
                help="Only this action, e.g. api.refused, rollout.create")] = None,
            controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """The audit history: what was done, when, by which token, and how it ended."""
    data = _run(as_json, lambda: _client(controller, token).history(limit, target, action))
    rows = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts_ms"] / 1000)),
             "by": _by(e), "action": e["action"], "target": e["target"],
             "outcome": e["outcome"], "what": (e.get("detail") or {}).get("summary", "")}
            for e in data]
    emit(data, as_json, table("history", rows, ["when", "by", "action", "target", "outcome",
                                                "what"]))


def whoami(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """The token's name and role on this controller (viewer, operator or admin)."""
    data = _run(as_json, lambda: _client(controller, token).get("/api/v1/whoami"))
    emit(data, as_json, table("token", [data], ["name", "role"]))


def _by(entry: Mapping[str, Any]) -> str:
    """The token's name, and its role when it had one (the controller's own: none)."""
    role = (entry.get("detail") or {}).get("role")
    return f"{entry['actor']} ({role})" if role else str(entry["actor"])
