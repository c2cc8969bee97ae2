"""``edgefleet fleet keyring``: the fleet keyring (docs/keys.md), which signing keys
devices trust: publish one, or show the one the controller holds."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.fleet.common import DEFAULT_URL, ControllerOpt, JsonOpt, TokenOpt
from edgefleet.cli.fleet.common import client as _client
from edgefleet.cli.fleet.common import run as _run
from edgefleet.cli.output import emit, fail, styled, table

__all__ = ["keyring_app"]

keyring_app = typer.Typer(help="The fleet keyring: which signing keys devices trust.",
                          no_args_is_help=True)


@keyring_app.command("publish")
def keyring_publish(
    keyring: Annotated[Path, typer.Argument(help="keyring.json from 'edgefleet keys rotate' "
                                                 "or 'keys retire'")],
    force: Annotated[bool, typer.Option("--force", help="Publish even if devices run a "
                                                        "bundle signed by a dropped key")
                     ] = False,
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Send a keyring to every device (retained); the controller checks it first."""
    try:
        data = keyring.read_bytes()
    except OSError as exc:
        fail(EdgefleetError(f"cannot read {keyring}: {exc.strerror}",
                            hint="pass the keyring.json in your keys folder"), as_json)
    result = _run(as_json, lambda: _client(controller, token).publish_keyring(data, force))
    if not result["changed"]:
        what = "already held: sent again"
    else:
        what = "published" if result["published"] else "stored; goes out when the broker is back"
    emit(result, as_json, _keyring_view(result, what))


@keyring_app.command("show")
def keyring_show(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    """The keyring the controller holds and publishes."""
    data = _run(as_json, lambda: _client(controller, token).keyring())
    emit(data, as_json, _keyring_view(data, f"issued {data['issued']}"))


def _keyring_view(data: Mapping[str, Any], what: str) -> Group:
    rows = [{"key_id": k["key_id"], "name": k["name"],
             "signed it": "yes" if k["key_id"] in data["signed_by"] else ""}
            for k in data["keys"]]
    parts: list[Any] = [table(f"keyring serial {data['serial']}: {what}", rows,
                              ["key_id", "name", "signed it"])]
    stranded = data.get("stranded") or []
    if stranded:
        parts.append(styled("[yellow]forced past {} devices whose bundle is signed by a "
                            "dropped key:[/] {}", len(stranded), ", ".join(stranded[:10])))
    return Group(*parts)
