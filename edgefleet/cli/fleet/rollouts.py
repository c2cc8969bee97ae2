"""``edgefleet fleet rollout``: staged rollouts (create, list, status with ``--watch``,
pause, resume, abort), and ``fleet rollback``: a rollout's or a group's devices back to
their previous bundle."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, cast

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.fleet.common import DEFAULT_URL, ControllerOpt, JsonOpt, TokenOpt
from edgefleet.cli.fleet.common import client as _client
from edgefleet.cli.fleet.common import run as _run
from edgefleet.cli.output import console, emit, fail, literal, styled, table
from edgefleet.fleet.api_types import GateOptions, RolloutOptions
from edgefleet.fleet.rollout.state import FINISHED, DeviceState, RolloutState

__all__ = ["rollback", "rollout_app"]

_UNDECIDED = frozenset(state.value for state in (  # devices whose wave has not settled yet
    DeviceState.PENDING, DeviceState.TARGETED, DeviceState.UPDATING, DeviceState.PROBATION,
    DeviceState.COMMITTING))

rollout_app = typer.Typer(help="Staged rollouts: create, watch, pause, resume, abort.",
                          no_args_is_help=True)


def rollback(rollout: Annotated[str | None, typer.Option("--rollout", help="Rollout id")] = None,
             group: Annotated[str | None, typer.Option("--group", help="Device group")] = None,
             controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
             as_json: JsonOpt = False) -> None:
    """Return every touched device to its previous committed bundle."""
    if (rollout is None) == (group is None):
        fail(EdgefleetError("say what to roll back", hint="pass --rollout ID or --group NAME"),
             as_json)
    client = _client(controller, token)
    if rollout is not None:
        data: Any = _run(as_json, lambda: client.rollback_rollout(rollout))
        summaries = [data]
    elif group is not None:
        data = _run(as_json, lambda: client.rollback_group(group))
        summaries = data
    rows = [_rollout_row(s) for s in summaries]
    emit(data, as_json, table("rolled back", rows, _columns(rows)))


@rollout_app.command("create")
def rollout_create(
    model: Annotated[str, typer.Option("--model", help="NAME:VERSION of a pushed bundle")],
    to: Annotated[list[str], typer.Option("--to", help="A selector (repeatable: any of them): "
                                                       "group:G, tag:T, device:ID, "
                                                       "label:K=V, profile=P, "
                                                       "'runtime.litert>=1.2', ... "
                                                       "(docs/fleet.md)")],
    waves: Annotated[str | None, typer.Option(help="Cumulative waves: 1%,10%,50%,100% or "
                                                   "counts")] = None,
    canary: Annotated[int | None, typer.Option(help="N devices first, then everyone")] = None,
    rate: Annotated[float | None, typer.Option(help="Devices started per minute")] = None,
    exponential: Annotated[float, typer.Option(help="Rate multiplier per wave")] = 1.0,
    device_timeout: Annotated[str, typer.Option(help="A device that has not answered "
                                                     "by then times out")] = "10m",
    max_failures: Annotated[float | None, typer.Option(help="Abort above this % of failed "
                                                            "devices [default: 0]")] = None,
    min_success: Annotated[float | None, typer.Option(
        help="A wave advances with at least this % succeeded [default: 100 - "
             "--max-failures]")] = None,
    max_p95_ratio: Annotated[float | None, typer.Option(help="Abort when the new p95 latency "
                                                             "is above R x the baseline")
                             ] = None,
    max_error_rate: Annotated[float | None, typer.Option(help="Abort above this error %")
                              ] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Abort below this top-1 "
                                                             "agreement %")] = None,
    min_samples: Annotated[int, typer.Option(help="Inferences before quality gates may "
                                                  "fire")] = 20,
    soak: Annotated[str, typer.Option(help="Time in probation before a device commits")
                    ] = "0s",
    start_at: Annotated[str | None, typer.Option(
        "--start-at", help="Send no bundle before this ISO 8601 time with its zone "
                           "(2026-12-08T22:00:00+01:00)")] = None,
    window: Annotated[list[str] | None, typer.Option(
        "--window", help="Send bundles only inside it (repeatable): 'Mon-Fri 22:00-04:00 "
                         "Europe/Berlin'")] = None,
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout of a pushed model version to a set of devices.

    Every option is checked here first (and again by the controller): a bad one is one
    error naming it, exit 2, and nothing is sent."""
    from edgefleet.fleet.rollout.spec import parse_duration
    from edgefleet.fleet.rollout.validate import check_options

    if waves is not None and canary is not None:
        fail(EdgefleetError("--waves and --canary exclude each other",
                            hint="--canary N is --waves N,100%"), as_json)
    wave_text = f"{canary},100%" if canary is not None else (waves or "100%")
    gates = {"max_failures_pct": max_failures, "min_success_pct": min_success,
             "max_p95_ratio": max_p95_ratio, "max_error_rate_pct": max_error_rate,
             "min_agreement_pct": min_agreement, "min_samples": min_samples}
    options = _run(as_json, lambda: _with_schedule(RolloutOptions(
        selectors=to, waves=wave_text.split(","), rate_per_min=rate, exponential=exponential,
        device_timeout_s=parse_duration(device_timeout), soak_s=parse_duration(soak),
        gates=cast(GateOptions, {k: v for k, v in gates.items() if v is not None})),
        start_at, window))
    _run(as_json, lambda: check_options(options))
    data = _run(as_json, lambda: _client(controller, token).create_rollout(model, options))
    emit(data, as_json, _rollout_view(data))


@rollout_app.command("list")
def rollout_list(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Every rollout, newest first."""
    data = _run(as_json, lambda: _client(controller, token).rollouts())
    rows = [_rollout_row(r) for r in data]
    emit(data, as_json, table("rollouts", rows, _columns(rows)))


@rollout_app.command("status")
def rollout_status(rollout: Annotated[str, typer.Argument(help="Rollout id")],
                   watch: Annotated[bool, typer.Option("--watch", help="Follow it live until "
                                                                      "it ends")] = False,
                   interval: Annotated[float, typer.Option(help="Seconds between refreshes")
                                       ] = 1.0,
                   controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                   as_json: JsonOpt = False) -> None:
    """One rollout: waves with progress, gates, every device's state and reason."""
    client = _client(controller, token)
    data = _run(as_json, lambda: client.rollout(rollout))
    if not watch or as_json:
        emit(data, as_json, _rollout_view(data))
        return
    with Live(_rollout_view(data), console=console, refresh_per_second=4) as live:
        while data["state"] not in FINISHED:
            time.sleep(interval)
            data = _run(as_json, lambda: client.rollout(rollout))
            live.update(_rollout_view(data))


def _operate(verb: str) -> Callable[..., None]:
    def command(rollout: Annotated[str, typer.Argument(help="Rollout id")],
                controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                as_json: JsonOpt = False) -> None:
        client = _client(controller, token)
        operate = {"pause": client.pause_rollout, "resume": client.resume_rollout,
                   "abort": client.abort_rollout}[verb]
        data = _run(as_json, lambda: operate(rollout))
        emit(data, as_json, _rollout_view(data))

    command.__doc__ = {"pause": "Stop sending the bundle to more devices (and committing).",
                       "resume": "Carry on a paused rollout.",
                       "abort": "End it: roll back devices that have not committed."}[verb]
    return command


for _verb in ("pause", "resume", "abort"):
    rollout_app.command(_verb)(_operate(_verb))


def _rollout_row(r: Mapping[str, Any]) -> dict[str, Any]:
    model = r["spec"]["model"]
    counts = r.get("counts", {})
    return {"rollout": r["id"], "model": f"{model['name']}:{model['version']}",
            "to": " ".join(r["spec"]["selectors"]), "state": r["state"],
            "wave": f"{min(r['wave'] + 1, r['waves'])}/{r['waves']}",
            "succeeded": f"{counts.get('SUCCEEDED', 0)}/{r['total']}",
            "failed": counts.get(DeviceState.FAILED, 0), "reason": r["reason"],
            **({"next window": _next_window(r)} if _next_window(r) else {})}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows, in order ("next window" only when a rollout waits)."""
    return list(dict.fromkeys(k for row in rows for k in row)) or ["rollout"]


def _with_schedule(options: RolloutOptions, start_at: str | None,
                   windows: list[str] | None) -> RolloutOptions:
    """``options`` with the schedule's options given (a rollout without them runs at once)."""
    if start_at is not None:
        options["start_at"] = start_at
    if windows:
        options["windows"] = windows
    return options


def _next_window(r: Mapping[str, Any]) -> str:
    """When a WAITING rollout's schedule opens next, in its first window's zone."""
    if r["state"] != RolloutState.WAITING or not r.get("waiting_until_ms"):
        return ""
    from edgefleet.fleet.rollout.schedule import format_ms, parse_window

    windows = r["spec"].get("windows") or []
    zone = parse_window(windows[0]).zone if windows else "UTC"
    return format_ms(int(r["waiting_until_ms"]), zone)


def _rollout_view(r: Mapping[str, Any]) -> Group:
    """Header, one progress bar per wave, gates, and the devices that are not done."""
    spec, devices = r["spec"], r.get("devices", [])
    waves = Table(title=styled("rollout {}: {}:{} -> {}  [bold]{}[/]  {}", r["id"],
                               spec["model"]["name"], spec["model"]["version"],
                               " ".join(spec["selectors"]), r["state"], r["reason"]),
                  expand=False)
    for column in ("wave", "up to", "devices", "progress", "succeeded", "failed", "waiting"):
        waves.add_column(column)
    for index, bound in enumerate(spec["waves"]):
        members = [d for d in devices if d["wave"] == index]
        done = sum(1 for d in members if d["state"] not in _UNDECIDED)
        ok = sum(1 for d in members if d["state"] == DeviceState.SUCCEEDED)
        bad = sum(1 for d in members if d["state"] in (DeviceState.FAILED, DeviceState.TIMED_OUT))
        marker = "▶ " if index == r["wave"] and r["state"] == RolloutState.RUNNING else ""
        waves.add_row(f"{marker}{index + 1}", literal(bound), str(len(members)),
                      ProgressBar(total=max(len(members), 1), completed=done, width=24),
                      str(ok), str(bad), str(len(members) - done))
    gates = spec["gates"]
    gate_text = ", ".join(f"{k}={v}" for k, v in gates.items() if v is not None)
    notable = [d for d in devices
               if d["state"] not in (DeviceState.SUCCEEDED, DeviceState.PENDING)][:30]
    rows = [{"device": d["device"], "wave": d["wave"] + 1, "state": d["state"],
             "reason": d["reason"]} for d in notable]
    parts: list[Any] = [waves, literal(f"gates: {gate_text}; soak {spec['soak_s']:g}s, "
                                       f"timeout {spec['device_timeout_s']:g}s")]
    if spec.get("windows") or spec.get("start_at_ms"):
        parts.append(literal(_schedule_text(r)))
    if rows:
        parts.append(table("devices not done or not succeeded", rows, list(rows[0])))
    return Group(*parts)


def _schedule_text(r: Mapping[str, Any]) -> str:
    from edgefleet.fleet.rollout.schedule import format_ms

    spec = r["spec"]
    parts = [f"windows: {'; '.join(spec.get('windows') or []) or 'any time'}"]
    if spec.get("start_at_ms"):
        parts.append(f"start at {format_ms(int(spec['start_at_ms']))}")
    if _next_window(r):
        parts.append(f"WAITING: next window opens {_next_window(r)}")
    return ", ".join(parts)
