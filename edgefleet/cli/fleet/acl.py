"""``edgefleet fleet acl``: write the broker's ACL (each device its own topics, the
controller writes desired state), and passwords for a password-mode broker."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.fleet.common import JsonOpt
from edgefleet.cli.output import emit, fail, table

__all__ = ["acl"]


def acl(
    fleet: Annotated[str, typer.Option(help="Fleet name (the MQTT topic level)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="ACL file to write (Mosquitto "
                                                          "acl_file)")] = Path("edgefleet.acl"),
    controller_user: Annotated[str, typer.Option(
        help="The controller's MQTT user name (CN of 'edgefleet certs controller')")] =
    "edgefleet-controller",
    device: Annotated[list[str] | None, typer.Option(
        "--device", help="Device id (repeatable): gets a password with --passwd-file, may "
                         "publish discovery with --ha-discovery")] = None,
    ha_discovery: Annotated[bool, typer.Option(
        "--ha-discovery", help="Let the --device ids publish Home Assistant discovery")] =
    False,
    ha_user: Annotated[str, typer.Option(
        help="With --ha-discovery: Home Assistant's user, which reads telemetry, status and "
             "discovery")] = "homeassistant",
    passwd_file: Annotated[Path | None, typer.Option(
        help="Mosquitto password_file: new random passwords for the --device ids "
             "(password mode; needs mosquitto_passwd)")] = None,
    controller_password: Annotated[bool, typer.Option(
        "--controller-password", help="With --passwd-file: a new password for the "
                                      "controller too")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write the broker's ACL: each device its own topics, the controller writes desired state."""
    from edgefleet.agent.protocol.files import atomic_write
    from edgefleet.fleet.acl import acl_rules, check_devices, render_acl
    from edgefleet.fleet.errors import FleetError
    from edgefleet.fleet.mosquitto import add_passwords

    devices = device or []
    try:
        try:
            check_devices(devices, controller_user, ha_user if ha_discovery else None)
            ha = (devices, ha_user) if ha_discovery else ((), None)
            rules = acl_rules(fleet, controller_user, *ha)
            text = render_acl(fleet, controller_user, *ha)
        except ValueError as exc:
            raise FleetError(str(exc), hint="ids are 1-64 letters, digits, '.', '_' or '-'; "
                                            "no device may be named like the controller"
                             ) from exc
        if ha_discovery and not devices:
            raise FleetError("--ha-discovery names no device",
                             hint="pass --device ID for each device that publishes discovery")
        users = [*devices, *([controller_user] if controller_password else [])]
        if passwd_file is not None and not users:
            raise FleetError("--passwd-file without a user to add",
                             hint="pass --device ID (repeatable) or --controller-password")
        atomic_write(out, text.encode(), mode=0o644)
        passwords = add_passwords(passwd_file, users) if passwd_file is not None else {}
    except (EdgefleetError, OSError) as exc:
        fail(exc if isinstance(exc, EdgefleetError) else EdgefleetError(
            f"cannot write {out}: {exc}", hint="pass an --out path this user may write"),
             as_json)
    _show_acl(out, rules, passwd_file, passwords, as_json)


def _show_acl(out: Path, rules: list[Any], passwd_file: Path | None,
              passwords: dict[str, str], as_json: bool) -> None:
    data = {"acl_file": str(out), "rules": [vars(r) for r in rules],
            "passwd_file": str(passwd_file) if passwd_file else None, "passwords": passwords}
    rows = [{"who": "each device (%u)" if r.who == "*" else r.who, "may": r.access,
             "topic": r.topic} for r in rules]
    views: list[Any] = [table(f"ACL written to {out}", rows, ["who", "may", "topic"])]
    if passwords:
        views.append(table(f"new passwords in {passwd_file}: shown once, hand each to its "
                           "device now", [{"user": u, "password": p}
                                          for u, p in passwords.items()], ["user", "password"]))
    emit(data, as_json, Group(*views))
