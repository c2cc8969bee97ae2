"""The ``edgefleet`` console script: one typer app made of each part's sub-apps.

This package is the command-line layer, the only one that imports typer and rich: the
library returns data and raises errors, the commands here print them.
"""

from __future__ import annotations

import sys

import typer

from edgefleet.cli import agent as agent_cli
from edgefleet.cli import broker as broker_cli
from edgefleet.cli import device as device_cli
from edgefleet.cli import keys as keys_cli
from edgefleet.cli.convert import convert
from edgefleet.cli.demo import demo
from edgefleet.cli.diff import diff
from edgefleet.cli.example_data import example_data
from edgefleet.cli.extras import ExtraMissingError, extra_of, needs, report_missing
from edgefleet.cli.fleet import app as fleet_cli
from edgefleet.cli.fleet import certs as certs_cli

app = typer.Typer(
    help="edgefleet: convert models, run them on devices, roll them out to fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(agent_cli.app, name="agent")
app.add_typer(keys_cli.app, name="keys")
app.add_typer(device_cli.app, name="device")
app.add_typer(fleet_cli.app, name="fleet")
app.add_typer(certs_cli.app, name="certs")
app.command("broker")(broker_cli.broker)  # checks its [broker] extra itself
app.command("demo")(demo)  # checks its extras itself
app.command("convert")(needs("convert", "converter")(convert))
app.command("diff")(diff)
app.command("example-data")(example_data)


def main() -> None:
    try:
        if "--json" in sys.argv[1:]:
            sys.exit(_json_main())
        app()
    except ModuleNotFoundError as exc:
        extra = extra_of(exc.name)
        if extra is None:
            raise
        # a command that needed an extra later than it said: still one line, exit 2
        report_missing(ExtraMissingError(None, {extra: str(exc.name)}))
        sys.exit(2)


def _json_main() -> int:
    """With ``--json`` on the command line, a usage error found before the command runs (an
    unknown or missing option, a value that does not parse) is one JSON object on stdout
    too, like every other error of a ``--json`` command; the exit code is click's (2)."""
    import json

    # typer 0.2x carries its own click (its BadParameter's bases); older ones use click itself
    click_exception: type[Exception] = next(c for c in typer.BadParameter.__mro__
                                            if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False, prog_name="edgefleet")
    except click_exception as exc:
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "edgefleet"
        message = getattr(exc, "format_message", exc.__str__)()
        sys.stdout.write(json.dumps({"error": "UsageError", "message": message,
                                     "hint": f"see {where} --help"}) + "\n")
        return int(getattr(exc, "exit_code", 2))
    except typer.Abort:
        return 1
    return code if isinstance(code, int) else 0
