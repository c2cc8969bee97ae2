"""``edgefleet demo``: see :mod:`edgefleet.demo`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Group
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgefleet.cli.extras import ExtraMissingError, report_missing, require
from edgefleet.cli.output import emit, table


def demo(
    devices: Annotated[int, typer.Option(min=2, max=50, help="Devices in the fleet")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Convert a model, run a broker, a controller and devices; roll out, stop a bad
    version, roll back, and show the fleet."""
    _require_extras()
    from edgefleet.demo import run_demo

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  disable=as_json) as progress:
        task = progress.add_task("starting", total=6)

        def step(text: str) -> None:
            progress.update(task, description=text, advance=1)

        result = run_demo(devices=devices, step=step)
        progress.update(task, description="done", completed=6)
    render = Group(
        table("model versions", result.models, ["model", "quantization", "size", "accuracy"]),
        table("rollouts", result.rollouts, ["rollout", "model", "state", "devices", "reason"]),
        table(f"fleet 'demo': broker {result.broker}",
              result.devices, list(result.devices[0]) if result.devices else ["device"]),
        table("history", result.history, ["by", "action", "outcome", "what"]))
    emit(result.as_dict(), as_json, render)


def _require_extras() -> None:
    """The converter and the controller; the embedded broker only without Mosquitto."""
    from edgefleet.fleet.mosquitto import MosquittoMissingError, find_mosquitto

    try:
        find_mosquitto()
        broker: tuple[str, ...] = ()
    except MosquittoMissingError:
        broker = ("broker",)
    try:
        require("demo", "converter", "fleet", *broker)
    except ExtraMissingError as exc:
        report_missing(exc)
        raise typer.Exit(2) from exc
