"""What every operating ``edgefleet fleet`` command shares: its options and its client."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import typer

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.output import fail
from edgefleet.fleet.client import FleetClient

__all__ = ["DEFAULT_URL", "ControllerOpt", "JsonOpt", "TokenOpt", "client", "models_of",
           "run", "updates_of"]

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines")]
ControllerOpt = Annotated[str, typer.Option("--controller", envvar="EDGEFLEET_CONTROLLER",
                                            help="The controller's URL")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="EDGEFLEET_TOKEN",
                                              help="API token (or EDGEFLEET_TOKEN)")]
DEFAULT_URL = "http://127.0.0.1:8600"


def client(url: str, token: str | None) -> FleetClient:
    return FleetClient(url, token)


def run(as_json: bool, call: Callable[[], T]) -> T:
    """``call()``, or the error printed (a table, or JSON) and exit code 2."""
    try:
        return call()
    except EdgefleetError as exc:
        fail(exc, as_json)


def models_of(device: Mapping[str, Any]) -> str:
    """``name:version`` of every model a device (as the API shows it) serves, by name."""
    models = device.get("models")
    if models is None:
        active = device.get("active")
        return f"{active['name']}:{active['version']}" if active else ""
    return ", ".join(f"{name}:{state['active']['version']}"
                     for name, state in sorted(models.items()) if state.get("active"))


def updates_of(device: Mapping[str, Any]) -> str:
    """The update state of a device of one model; ``name:STATE`` of each of several."""
    models = device.get("models")
    if models is None or len(models) == 1:
        return str(device.get("update_state") if models is None
                   else next(iter(models.values()))["update_state"])
    return ", ".join(f"{name}:{state['update_state']}" for name, state in sorted(models.items()))
