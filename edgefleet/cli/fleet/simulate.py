"""``edgefleet fleet simulate``: run many simulated devices against a broker (thin: see
:mod:`edgefleet.fleet.simulate`)."""

from __future__ import annotations

import json as jsonlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.cli.extras import needs
from edgefleet.cli.output import console, fail, table

if TYPE_CHECKING:
    from edgefleet.fleet.simulate import SimulatedFleet

__all__ = ["simulate"]


@needs("fleet simulate", "agent")
def simulate(
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    fleet: Annotated[str, typer.Option(help="Fleet name (MQTT topic level)")] = "default",
    devices: Annotated[int, typer.Option(min=1, help="How many devices")] = 100,
    bundle: Annotated[Path | None, typer.Option(
        help="Bundle every device starts with (committed, slot a); none = devices start empty")
    ] = None,
    trusted_key: Annotated[list[Path] | None, typer.Option(
        help=".pub file or folder of them, trusted by every device (repeatable)")] = None,
    fail_health: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of devices whose health check of a new bundle fails")
    ] = 0.0,
    slow: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of devices that are slow on new bundles")] = 0.0,
    slow_factor: Annotated[float, typer.Option(
        min=1.0, help="Latency multiplier of slow devices")] = 3.0,
    disagree: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of devices that answer wrongly on new bundles")] = 0.0,
    offline: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of devices that drop off (will) and come back")] = 0.0,
    offline_after: Annotated[float, typer.Option(min=0.0, help="Seconds before dropping")
                             ] = 30.0,
    offline_for: Annotated[float, typer.Option(min=0.0, help="Seconds spent offline")] = 30.0,
    drifting: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Share of devices whose inputs drift from the bundle's "
                               "reference statistics (drift alerts)")] = 0.0,
    telemetry_interval: Annotated[float, typer.Option(min=0.05, help="Seconds")] = 5.0,
    request_rate: Annotated[float, typer.Option(
        min=0.0, help="Synthetic requests per second per device")] = 5.0,
    connect_rate: Annotated[float, typer.Option(
        min=1.0, help="Connections per second, for the whole fleet")] = 500.0,
    seed: Annotated[int, typer.Option(help="Picks the faulty devices and device speeds")] = 0,
    prefix: Annotated[str, typer.Option(help="Device ids: PREFIX00001, ...")] = "sim-",
    label: Annotated[list[str] | None, typer.Option(
        "--label", help="KEY=VALUE every device reports (repeatable; selectors read it: "
                        "--to label:KEY=VALUE)")] = None,
    ca: Annotated[Path | None, typer.Option(
        help="Fleet CA certificate: TLS to the broker, and https bundle URLs checked with it"
    )] = None,
    certs: Annotated[Path | None, typer.Option(
        help="Folder of ID.crt and ID.key per simulated device ('edgefleet certs device "
             "ID... --out DIR'): each device connects with its own certificate")] = None,
    duration: Annotated[float | None, typer.Option(
        help="Seconds to run; default until Ctrl-C")] = None,
    every: Annotated[float, typer.Option(min=0.1, help="Seconds between status reports")
                     ] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of tables")
                       ] = False,
) -> None:
    """Simulate a fleet: devices that speak the real protocol and run the real update flow."""
    from edgefleet.fleet.simulate import SimOptions, SimulatedFleet

    try:
        options = SimOptions(device_prefix=prefix, seed=seed,
                             telemetry_interval_s=telemetry_interval, request_rate=request_rate,
                             connect_rate=connect_rate, fail_health=fail_health, slow=slow,
                             slow_factor=slow_factor, disagree=disagree, offline=offline,
                             offline_after_s=offline_after, offline_for_s=offline_for,
                             drifting=drifting, ca_file=ca, certs_dir=certs,
                             labels=dict(item.partition("=")[::2] for item in label or []))
        simulated = SimulatedFleet(broker, fleet, devices, _trusted(trusted_key or []), options,
                                   bundle)
    except EdgefleetError as exc:
        fail(exc, as_json)
    with simulated:
        _report_until(simulated, duration, every, as_json, f"fleet {fleet}")


def _trusted(paths: list[Path]) -> TrustedKeys:
    trusted = TrustedKeys.from_paths([p for p in paths if p.exists()])
    if not len(trusted):
        raise EdgefleetError("no trusted public key: simulated devices would refuse every bundle",
                             hint="pass --trusted-key KEY.pub (from 'edgefleet keys generate')")
    return trusted


def _report_until(simulated: SimulatedFleet, duration: float | None, every: float, as_json: bool,
                  title: str) -> None:
    from edgefleet.fleet.simulate import summarize

    started = time.monotonic()
    deadline = started + duration if duration is not None else None
    try:
        while deadline is None or time.monotonic() < deadline:
            left = every if deadline is None else min(every, deadline - time.monotonic())
            time.sleep(max(0.0, left))
            _emit(summarize(simulated.devices), time.monotonic() - started, as_json, title)
    except KeyboardInterrupt:
        pass


def _emit(summary: dict[str, Any], elapsed: float, as_json: bool, title: str) -> None:
    if as_json:
        sys.stdout.write(jsonlib.dumps({"elapsed_s": round(elapsed, 1), **summary}) + "\n")
        sys.stdout.flush()
        return
    console.print(table(f"{title}: {summary['online']}/{summary['devices']} online, "
                        f"{elapsed:.0f} s", summary["groups"],
                        ["state", "version", "devices"]))
