"""Commands that need an optional extra say which one, in one line, before they start.

``pip install 'edgefleet[agent]'`` is the device install: the fleet controller, the
converter, the embedded broker and the demo need more. A command declares the extras
it needs (``@needs("fleet")``); when a package of one is missing it stops with exit
code 2 and one line naming the ``pip install`` to run. ``extra_of`` names the extra of
a module that a command found missing only later (the console script's last resort).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

import typer
from rich.markup import escape

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.output import err_console

__all__ = ["ExtraMissingError", "extra_of", "missing_extras", "needs", "report_missing",
           "require"]

P = ParamSpec("P")
R = TypeVar("R")

# The import names whose absence shows an extra is not installed (cheap to look up:
# find_spec reads no module), then the other modules that only an extra brings.
_PROBES = {"agent": ("ai_edge_litert", "onnxruntime", "paho", "psutil"),
           "fleet": ("prometheus_client",),
           "converter": ("tensorflow", "keras", "onnx", "tf2onnx"),
           "broker": ("amqtt",)}
_ALSO = {"psycopg": "fleet", "ai_edge_quantizer": "converter", "flatbuffers": "converter",
         "tflite_runtime": "agent"}
_EXTRA_OF = {**{m: extra for extra, mods in _PROBES.items() for m in mods}, **_ALSO}


class ExtraMissingError(EdgefleetError):
    """A command needs an extra that is not installed; the message names the install."""

    def __init__(self, command: str | None, missing: dict[str, str]) -> None:
        extras, modules = list(missing), list(missing.values())
        which = " and ".join(f"[{e}]" for e in extras) + (" extra" if len(extras) == 1
                                                           else " extras")
        gone = ", ".join(modules) + (" is" if len(modules) == 1 else " are")
        who = f"'edgefleet {command}'" if command else "this command"
        super().__init__(f"{who} needs the {which} ({gone} not installed): "
                         f"pip install 'edgefleet[{','.join(extras)}]'")
        self.extras = tuple(extras)


def missing_extras(extras: Iterable[str]) -> dict[str, str]:
    """{extra: first missing module} for each of ``extras`` that is not installed."""
    found = {}
    for extra in extras:
        absent = next((m for m in _PROBES[extra] if importlib.util.find_spec(m) is None), None)
        if absent is not None:
            found[extra] = absent
    return found


def require(command: str, *extras: str) -> None:
    """Raise ``ExtraMissingError`` unless every one of ``extras`` is installed."""
    missing = missing_extras(extras)
    if missing:
        raise ExtraMissingError(command, missing)


def report_missing(exc: ExtraMissingError) -> None:
    """The one line (never wrapped), on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)


def needs(command: str, *extras: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a typer command: check ``extras`` first, exit 2 with one line if absent."""
    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(func)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                require(command, *extras)
            except ExtraMissingError as exc:
                report_missing(exc)
                raise typer.Exit(2) from exc
            return func(*args, **kwargs)
        return checked
    return decorate


def extra_of(module: str | None) -> str | None:
    """The extra that brings ``module`` (a dotted name is looked up by its top level)."""
    return _EXTRA_OF.get((module or "").partition(".")[0])
