"""``edgefleet fleet groups``: dynamic groups (selectors saved under a name), and
``fleet group`` and ``fleet tag``: a device's own group and tags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import typer

from edgefleet.cli.fleet.common import DEFAULT_URL, ControllerOpt, JsonOpt, TokenOpt
from edgefleet.cli.fleet.common import client as _client
from edgefleet.cli.fleet.common import run as _run
from edgefleet.cli.output import emit, literal, table

__all__ = ["group", "groups_app", "tag"]

groups_app = typer.Typer(help="Dynamic groups: selectors saved under a name (group:NAME).")


@groups_app.callback(invoke_without_command=True)
def groups(ctx: typer.Context, controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Every dynamic group: its selector and how many devices it matches now."""
    if ctx.invoked_subcommand is not None:
        return
    data = _run(as_json, lambda: _client(controller, token).groups())
    emit(data, as_json, _groups_table("dynamic groups", data))


def _groups_table(title: str, data: Sequence[Mapping[str, Any]]) -> Any:
    rows = [{"group": g["name"], "where": g["where"], "devices": g["devices"],
             "by": g["created_by"]} for g in data]
    return table(title, rows, ["group", "where", "devices", "by"])


@groups_app.command("create")
def groups_create(
    name: Annotated[str, typer.Argument(help="Group name: rollouts use it as group:NAME")],
    where: Annotated[str, typer.Option("--where", help="The selector, e.g. "
                                                       "'profile=raspberry-pi-4 & "
                                                       "label:site=plant-a'")],
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Save a selector as a dynamic group; a rollout to group:NAME takes the selector when
    it is created (docs/fleet.md, "Selectors")."""
    from edgefleet.fleet.rollout.selector import parse_selector

    _run(as_json, lambda: parse_selector(where))  # refused here, before anything is sent
    data = _run(as_json, lambda: _client(controller, token).create_group(name, where))
    emit(data, as_json, _groups_table("group saved", [data]))


@groups_app.command("delete")
def groups_delete(name: Annotated[str, typer.Argument(help="Group name")],
                  controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Delete a dynamic group (rollouts created with it keep what it meant)."""
    data = _run(as_json, lambda: _client(controller, token).delete_group(name))
    emit(data, as_json, literal(f"group {name} deleted"))


def group(name: Annotated[str, typer.Argument(help="Group name ('-' removes the group)")],
          device: Annotated[list[str], typer.Argument(help="Device ids")],
          controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
          as_json: JsonOpt = False) -> None:
    """Put devices in a group (one group per device)."""
    group_name = None if name == "-" else name
    data = _run(as_json, lambda: _client(controller, token).set_group(device, group_name))
    rows = [{"device": d["id"], "group": d["group"]} for d in data]
    emit(data, as_json, table("groups", rows, ["device", "group"]))


def tag(device: Annotated[str, typer.Argument(help="Device id")],
        add: Annotated[list[str] | None, typer.Option("--add", help="Tag to add")] = None,
        remove: Annotated[list[str] | None, typer.Option("--remove", help="Tag to remove")
                          ] = None,
        controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
        as_json: JsonOpt = False) -> None:
    """Add or remove tags of a device."""
    data = _run(as_json, lambda: _client(controller, token).tag(device, add, remove))
    emit(data, as_json, table("tags", [{"device": data["id"], "tags": ",".join(data["tags"])}],
                              ["device", "tags"]))
