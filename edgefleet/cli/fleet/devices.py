"""``edgefleet fleet devices``: list the fleet's devices (stale ones with ``--stale``), and
``devices remove``: decommission some by id, or every stale one after a confirmation."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.console import Group

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.fleet.common import (
    DEFAULT_URL,
    ControllerOpt,
    JsonOpt,
    TokenOpt,
    models_of,
    updates_of,
)
from edgefleet.cli.fleet.common import client as _client
from edgefleet.cli.fleet.common import run as _run
from edgefleet.cli.output import console, emit, fail, literal, table
from edgefleet.fleet.durations import format_age, parse_age

__all__ = ["devices_app"]

devices_app = typer.Typer(help="The fleet's devices: list them, label them, find stale ones, "
                               "remove (decommission) them.")
StaleOpt = Annotated[str | None, typer.Option(
    "--stale", help="Only offline devices not heard from for this long: 7d, 12h, 1d12h")]
_COLUMNS = ["device", "online", "group", "tags", "labels", "models", "update", "profile"]


@devices_app.callback(invoke_without_command=True)
def devices(ctx: typer.Context, stale: StaleOpt = None, controller: ControllerOpt = DEFAULT_URL,
            token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Every device: online, group, tags, what it runs, its update state ('--stale 7d': only
    the offline ones not heard from for 7 days, with when they were last)."""
    if ctx.invoked_subcommand is not None:
        return
    seconds = _age(stale, as_json)
    client = _client(controller, token)
    data = _run(as_json, lambda: client.devices() if seconds is None
                else client.stale_devices(seconds))
    emit(data, as_json, _devices_table(data, stale))


@devices_app.command("remove")
def remove(device: Annotated[list[str] | None, typer.Argument(help="Device ids")] = None,
           stale: StaleOpt = None,
           yes: Annotated[bool, typer.Option(
               "--yes", "-y", help="With --stale: remove without asking")] = False,
           controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Decommission devices: out of the registry and every group, their retained topics
    cleared on the broker (secure mode: prints the command that revokes their
    certificates). A removed device that comes back registers as a new one."""
    if bool(device) == (stale is not None):
        fail(EdgefleetError("say which devices to remove",
                            hint="pass device ids, or --stale AGE (e.g. --stale 7d), not "
                                 "both"), as_json)
    client = _client(controller, token)
    if device:
        result = _run(as_json, lambda: _remove_ids(client, device))
    else:
        result = _remove_stale(client, str(stale), yes, as_json)
    emit(result, as_json, _removal_view(result))


@devices_app.command("label")
def devices_label(
    device: Annotated[str, typer.Argument(help="Device id")],
    labels: Annotated[list[str] | None, typer.Argument(help="KEY=VALUE to set")] = None,
    remove: Annotated[list[str] | None, typer.Option("--remove", help="KEY to remove "
                                                                      "(repeatable)")] = None,
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Set or remove labels of a device (selectors read them: --to label:KEY=VALUE); they
    win over the labels the device reports itself."""
    pairs = [item.partition("=") for item in labels or []]
    bad = next((k for k, eq, v in pairs if not (k and eq and v)), None)
    if bad is not None or not (pairs or remove):
        fail(EdgefleetError(f"labels {' '.join(labels or [])[:80]!r} are not KEY=VALUE",
                            hint="e.g. fleet devices label cam-1 site=plant-a, or "
                                 "--remove site"), as_json)
    data = _run(as_json, lambda: _client(controller, token).label_device(
        device, {k: v for k, _, v in pairs}, remove or []))
    emit(data, as_json, table("labels", [{"device": data["id"], "labels": _labels_text(data)}],
                              ["device", "labels"]))


def _remove_ids(client: Any, device: list[str]) -> Any:
    if len(device) == 1:
        return client.remove_device(device[0])
    return client.remove_devices(device)


def _remove_stale(client: Any, stale: str, yes: bool, as_json: bool) -> Any:
    """List the stale devices, ask (unless ``--yes``), remove those still stale; a token
    that may not remove devices is refused first (not after the list and the question)."""
    seconds = _age(stale, as_json)
    _run(as_json, lambda: _may_remove(client))
    listed = _run(as_json, lambda: client.stale_devices(int(seconds or 0)))
    if not listed:
        return {"removed": [], "skipped": {}, "revoke": None}
    if not yes:
        if as_json:
            fail(EdgefleetError(f"{len(listed)} stale devices found; nothing removed",
                                hint="a removal in bulk asks first: pass --yes to remove "
                                     "them without asking"), as_json)
        console.print(_devices_table(listed, stale))
        if not typer.confirm(f"Remove these {len(listed)} devices?", default=False):
            console.print(literal("nothing removed"))
            raise typer.Exit(1)
    ids = [d["id"] for d in listed]
    return _run(as_json, lambda: client.remove_devices(ids, seconds))


def _may_remove(client: Any) -> None:
    """ForbiddenError, as the controller answers it, unless the token is an admin's."""
    from edgefleet.fleet.access import Actor, TokenRole, check

    who = client.whoami()
    check(Actor(str(who["name"]), TokenRole(who["role"])), TokenRole.ADMIN,
          "POST /api/v1/devices/remove")


def _age(text: str | None, as_json: bool) -> int | None:
    if text is None:
        return None
    try:
        return parse_age(text)
    except ValueError as exc:
        fail(EdgefleetError(f"--stale {exc}", hint="e.g. --stale 7d"), as_json)


def _devices_table(data: Sequence[Mapping[str, Any]], stale: str | None) -> Any:
    now_ms = time.time() * 1000
    rows = [{"device": d["id"], "online": "yes" if d["online"] else "no",
             "group": d["group"], "tags": ",".join(d["tags"]), "labels": _labels_text(d),
             "models": models_of(d), "update": updates_of(d), "profile": d["profile"],
             "last seen": _ago(now_ms, d.get("last_seen_ms") or 0)} for d in data]
    if stale is None:
        return table(f"{len(rows)} devices", rows, _COLUMNS)
    return table(f"{len(rows)} devices offline and not heard from for {stale}", rows,
                 ["device", "last seen", "group", "tags", "models", "profile"])


def _labels_text(device: Mapping[str, Any]) -> str:
    labels = {**(device.get("reported_labels") or {}), **(device.get("labels") or {})}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _ago(now_ms: float, then_ms: int) -> str:
    if not then_ms:
        return "never"
    return f"{format_age(max(int((now_ms - then_ms) / 1000), 0))} ago"


def _removal_view(result: dict[str, Any]) -> Any:
    removed, skipped = result["removed"], result.get("skipped") or {}
    parts: list[Any] = [table(f"{len(removed)} devices removed",
                              [{"device": d} for d in removed], ["device"])]
    if skipped:
        parts.append(table("kept", [{"device": d, "why": why} for d, why in skipped.items()],
                           ["device", "why"]))
    revoke = result.get("revoke")
    if revoke:
        parts += [literal("secure mode: revoke their certificates so they cannot come back:"),
                  literal(f"  {revoke['command']}"), literal(f"  then {revoke['then']}")]
    return Group(*parts)
