"""``edgefleet example-data``: see :mod:`edgefleet.example_data`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.output import emit, fail, table


def example_data(
    out: Annotated[Path, typer.Argument(help="Folder to write into (created when missing)")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Write the demo's digits model (digits.keras), calibration.npy and eval.npz, to
    try 'edgefleet convert' on."""
    from edgefleet.example_data import ExampleDataExistsError, write_example_data

    try:
        written = write_example_data(out)
    except ExampleDataExistsError as exc:
        fail(exc, as_json)
    except OSError as exc:  # a folder that cannot be made or written (/proc/x, read-only)
        fail(EdgefleetError(f"cannot write the example data into {out}: {exc.strerror or exc}",
                            hint="pass a folder you can write to"), as_json)
    rows = [{"file": str(path), "bytes": path.stat().st_size} for path in written]
    emit({"written": rows}, as_json, table("example data", rows, ["file", "bytes"]))
