"""Output helpers shared by every command: tables for people, JSON for machines."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from agent.protocol.errors import EdgefleetError

__all__ = ["console", "emit", "fail", "table"]

console = Console()
err_console = Console(stderr=True)


def emit(data: Any, as_json: bool, render: Any = None) -> None:
    """Print ``data`` as JSON when asked, else ``render`` (a rich renderable) or ``data``."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    else:
        console.print(render if render is not None else data)


def table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Table:
    out = Table(title=title)
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    return out


def fail(exc: EdgefleetError, as_json: bool = False, code: int = 2) -> NoReturn:
    """Report a project error (problem and fix) and exit non-zero."""
    if as_json:
        payload = {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}
        sys.stdout.write(json.dumps(payload) + "\n")
    else:
        err_console.print(f"[bold red]error:[/] {exc.message}")
        if exc.hint:
            err_console.print(f"[yellow]fix:[/] {exc.hint}")
    raise typer.Exit(code)
