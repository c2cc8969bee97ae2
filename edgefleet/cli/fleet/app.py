"""``edgefleet fleet``: run the controller, and operate it (push, rollouts, rollback, history).

Every operating command talks to the controller's REST API (``--controller`` or
``EDGEFLEET_CONTROLLER``, token from ``--token`` or ``EDGEFLEET_TOKEN``) and prints a
table, or JSON with ``--json``. Errors say what went wrong and what to do; exit code 2.

This module only joins the commands; each lives in the module of its area (``serve``,
``acl``, ``models``, ``groups``, ``audit``, ``rollouts``, ``devices``, ``drift``,
``keyring``, ``simulate``, ``top``). Commands are listed in the order they are added here.
"""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.agent.systemd import Unit
from edgefleet.cli.fleet.acl import acl
from edgefleet.cli.fleet.audit import history, whoami
from edgefleet.cli.fleet.devices import devices_app
from edgefleet.cli.fleet.drift import alerts, drift_app
from edgefleet.cli.fleet.groups import group, groups_app, tag
from edgefleet.cli.fleet.keyring import keyring_app
from edgefleet.cli.fleet.models import models_app, push
from edgefleet.cli.fleet.rollouts import _rollout_view as _rollout_view
from edgefleet.cli.fleet.rollouts import rollback, rollout_app
from edgefleet.cli.fleet.serve import serve
from edgefleet.cli.fleet.simulate import simulate
from edgefleet.cli.fleet.top import top
from edgefleet.cli.service import ServiceSpec, service_app, subcommand

__all__ = ["app"]

app = typer.Typer(help="The fleet: controller, models, rollouts, rollback, history.",
                  no_args_is_help=True)

for _command in (serve, acl, push, group, tag, history, whoami, rollback):
    app.command()(_command)
app.command("simulate")(simulate)
app.command("top")(top)
app.command("alerts")(alerts)

app.add_typer(rollout_app, name="rollout")
app.add_typer(models_app, name="models")
app.add_typer(devices_app, name="devices")
app.add_typer(groups_app, name="groups")
app.add_typer(drift_app, name="drift")
app.add_typer(keyring_app, name="keyring")
app.add_typer(service_app(ServiceSpec(
    Unit("edgefleet.fleet", "edgefleet-controller.service"), ("fleet", "serve"),
    lambda: subcommand(app, "serve"),
    user="edgefleet-controller", data_dir=Path("/var/lib/edgefleet-controller"),
    secrets=(("--token", "put EDGEFLEET_TOKEN=NAME=SECRET in /etc/edgefleet/controller.env "
                         "(mode 0600): the unit reads it"),))),
    name="service")
