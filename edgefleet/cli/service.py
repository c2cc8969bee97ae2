"""``edgefleet agent service install`` (and the fleet's twin): write a hardened systemd unit.

Options after ``--`` are the service command's own (``agent run`` or ``fleet serve``); they
are parsed by that command here, so a typo fails now instead of at the service's start.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer

from edgefleet.agent.errors import ServiceInstallError
from edgefleet.agent.systemd import Unit, render, user_exists, write_unit
from edgefleet.cli.output import emit, fail, table

__all__ = ["Parser", "ServiceSpec", "service_app", "subcommand"]


class Parser(Protocol):
    """What a typer command offers to parse a command line without running it."""

    def make_context(self, info_name: str, args: list[str]) -> Any: ...


@dataclass(frozen=True)
class ServiceSpec:
    """What one part's unit runs: ``edgefleet <words> --data-dir DIR <defaults> <args>``."""

    unit: Unit
    words: tuple[str, ...]  # e.g. ("agent", "run")
    command: Callable[[], Parser]  # the command that parses the options, loaded late
    user: str
    data_dir: Path
    defaults: Callable[[Sequence[str]], list[str]] = lambda args: []
    # options whose value is a secret: a unit file is readable by every local user
    secrets: tuple[tuple[str, str], ...] = ()


def subcommand(app: typer.Typer, name: str) -> Parser:
    """The command ``name`` of ``app`` (what parses its options)."""
    commands: dict[str, Parser] = getattr(typer.main.get_command(app), "commands", {})
    if name not in commands:
        raise ServiceInstallError(f"no command {name!r} to run as a service")
    return commands[name]


def _executable() -> list[str]:
    beside = Path(sys.executable).with_name("edgefleet")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("edgefleet")
    return [found] if found else [sys.executable, "-m", "edgefleet"]


def _checked(spec: ServiceSpec, args: list[str]) -> None:
    name = " ".join(("edgefleet", *spec.words))
    if "--data-dir" in args[2:] or any(a.startswith("--data-dir=") for a in args):
        raise ServiceInstallError("--data-dir after -- would differ from the folder the unit "
                                  "lets the service write", hint="give --data-dir before --")
    for option, instead in spec.secrets:
        if any(a == option or a.startswith(option + "=") for a in args):
            raise ServiceInstallError(
                f"{option} would put a secret in the unit file, which every local user can "
                "read", hint=instead)
    try:
        spec.command().make_context(name, list(args))
    except typer.TyperException as exc:  # typer's usage errors: the options do not parse
        why = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise ServiceInstallError(
            f"the options after -- are not ones '{name}' takes: {why}",
            hint=f"see 'edgefleet {' '.join(spec.words)} --help'") from exc


def _command_line(spec: ServiceSpec, data_dir: Path, extra: Sequence[str]) -> list[str]:
    args = ["--data-dir", str(data_dir), *spec.defaults(extra), *extra]
    return [*_executable(), *spec.words, *args]


def _write(text: str, name: str, root: Path) -> Path:
    try:
        return write_unit(text, name, root)
    except OSError as exc:
        raise ServiceInstallError(
            f"cannot write the unit under {root}: {exc.strerror or exc}",
            hint="run it as root (sudo), or give --root DIR to write it elsewhere") from exc


def _report(spec: ServiceSpec, path: Path, argv: list[str], user: str) -> dict[str, Any]:
    name = spec.unit.name
    steps = [] if user_exists(user) else [
        f"useradd --system --home {spec.data_dir} --shell /usr/sbin/nologin {user}"]
    steps += ["systemctl daemon-reload", f"systemctl enable --now {name}",
              f"systemd-analyze security {name}"]
    return {"unit": name, "written": str(path), "exec_start": argv, "user": user,
            "user_exists": user_exists(user), "next": steps}


def service_app(spec: ServiceSpec) -> typer.Typer:
    """A ``service`` sub-app whose ``install`` writes ``spec``'s unit."""
    app = typer.Typer(help=f"Run it under systemd ({spec.unit.name}, hardened).",
                      no_args_is_help=True)
    context = {"allow_extra_args": True, "ignore_unknown_options": True}

    @app.command("install", context_settings=context)
    def install(
        ctx: typer.Context,
        user: Annotated[str, typer.Option(help="System user the service runs as")] = spec.user,
        data_dir: Annotated[Path, typer.Option(help="The service's data folder")] =
            spec.data_dir,
        root: Annotated[Path, typer.Option(help="Write under this root (default /)")] =
            Path("/"),
        print_only: Annotated[bool, typer.Option(
            "--print", help="Print the unit instead of writing it")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
    ) -> None:
        """Write the unit; options after -- go to the service's command line."""
        try:
            _checked(spec, ["--data-dir", str(data_dir), *spec.defaults(ctx.args), *ctx.args])
            argv = _command_line(spec, data_dir, ctx.args)
            text = render(spec.unit.template(), user=user, data_dir=data_dir, argv=argv)
            if print_only:
                sys.stdout.write(text)
                return
            report = _report(spec, _write(text, spec.unit.name, root), argv, user)
        except ServiceInstallError as exc:
            fail(exc, as_json)
        rows = [{"what": key, "value": " ".join(v) if isinstance(v, list) else v}
                for key, v in report.items() if key != "next"]
        rows += [{"what": "then run", "value": step} for step in report["next"]]
        emit(report, as_json, table(f"{spec.unit.name} written", rows, ["what", "value"]))

    return app
