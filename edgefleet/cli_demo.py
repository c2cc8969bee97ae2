"""``edgefleet demo``: see :mod:`edgefleet.demo`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn

from agent.cli.output import emit, table


def demo(
    devices: Annotated[int, typer.Option(min=1, max=50, help="Simulated devices")] = 3,
    requests: Annotated[int, typer.Option(min=1, help="Inference requests to send")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Run the whole product on this machine on the embedded digits model."""
    from edgefleet.demo import run_demo

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True,
                  disable=as_json) as progress:
        progress.add_task("bundles, broker, devices, requests, telemetry", total=None)
        result = run_demo(devices=devices, requests=requests)
    rows = result.devices
    columns = list(rows[0]) if rows else []
    render = table(f"fleet 'demo' on {result.broker}: accuracy {result.accuracy:.3f} over "
                   f"{requests} HTTP requests", rows, columns)
    emit(result.as_dict(), as_json, render)
