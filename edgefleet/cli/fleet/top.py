"""``edgefleet fleet top``: the fleet at a glance, refreshed live in the terminal.

Each frame is read from the controller's REST API: ``/api/v1/overview`` (devices online,
model versions, update states), ``/api/v1/devices`` (the devices that need a look: offline,
or in the middle of an update), ``/api/v1/rollouts`` and ``/api/v1/rollouts/{id}`` for each
rollout still going (progress per wave). Per-version latency, error rate and agreement come
from the overview's ``quality`` map (``"name:version"`` -> ``p50_ms``, ``p95_ms``,
``error_rate``, ``agreement``, ``inferences``) when the controller reports one; without it
those columns stay empty. The overview's ``controller`` says which controller answered and
who leads when several share the fleet (docs/scale-out.md).

``--once`` prints one frame and exits; ``--json`` prints each frame's data as one line of
JSON. A live view keeps going through transient API errors (shown under the frame).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.cli.fleet.common import models_of, updates_of
from edgefleet.cli.output import console, fail, literal, styled
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.rollout.state import DONE, FINISHED, DeviceState, RolloutState

__all__ = ["collect", "render", "top"]

_DONE = frozenset(s.value for s in DONE)
_FINISHED = frozenset(s.value for s in FINISHED)
_SETTLED = frozenset(state.value for state in (  # update states needing no look
    UpdateState.IDLE, UpdateState.COMMITTED, UpdateState.ROLLED_BACK))
_ATTENTION_ROWS = 20


def collect(client: FleetClient) -> dict[str, Any]:
    """One frame's data, from four kinds of API calls."""
    overview = client.overview()
    devices = client.devices()
    going = [r["id"] for r in client.rollouts() if r["state"] not in _FINISHED]
    quality = overview.get("quality") or {}
    attention = [_device_row(d) for d in devices
                 if not d["online"] or not _settled(d)]
    return {"ts_ms": int(time.time() * 1000), "fleet": overview["fleet"],
            "controller": overview.get("controller") or {},
            "devices": {"total": overview["devices"], "online": overview["online"],
                        "offline": overview["devices"] - overview["online"]},
            "versions": [{"version": name, "devices": count, **_quality(quality.get(name))}
                         for name, count in sorted(overview["versions"].items())],
            "update_states": overview["update_states"],
            "rollouts": [_rollout(client.rollout(rid)) for rid in going],
            "attention": attention[:_ATTENTION_ROWS], "attention_total": len(attention)}


def _quality(q: Mapping[str, Any] | None) -> dict[str, Any]:
    q = q or {}
    return {key: q.get(key) for key in ("inferences", "p50_ms", "p95_ms", "error_rate",
                                        "agreement")}


def _settled(d: Mapping[str, Any]) -> bool:
    """Whether every model of the device (a device of one model: the device) is settled."""
    models = d.get("models")
    states = [m["update_state"] for m in models.values()] if models else [d["update_state"]]
    return all(state in _SETTLED for state in states)


def _device_row(d: Mapping[str, Any]) -> dict[str, Any]:
    return {"device": d["id"], "online": d["online"], "group": d["group"],
            "model": models_of(d) or None, "update": updates_of(d),
            "detail": d["update_detail"]}


def _rollout(r: Mapping[str, Any]) -> dict[str, Any]:
    spec = r["spec"]
    return {"id": r["id"], "model": f"{spec['model']['name']}:{spec['model']['version']}",
            "to": spec["selectors"], "state": r["state"], "reason": r["reason"],
            "wave": r["wave"] + 1, "waves": [_wave(r, i, bound)
                                             for i, bound in enumerate(spec["waves"])]}


def _wave(r: Mapping[str, Any], index: int, bound: str) -> dict[str, Any]:
    states = [d["state"] for d in r["devices"] if d["wave"] == index]
    done = sum(s in _DONE for s in states)
    return {"wave": index + 1, "up_to": bound, "devices": len(states), "done": done,
            "succeeded": states.count(DeviceState.SUCCEEDED),
            "failed": states.count(DeviceState.FAILED) + states.count(DeviceState.TIMED_OUT),
            "waiting": len(states) - done}


# --- rendering ----------------------------------------------------------------------------

def render(frame: dict[str, Any], problem: str = "") -> Group:
    """The frame for people: header, versions, update states, rollouts, devices to look at."""
    devices = frame["devices"]
    when = time.strftime("%H:%M:%S", time.localtime(frame["ts_ms"] / 1000))
    states = "  ".join(f"{s} {n}" for s, n in sorted(frame["update_states"].items()))
    parts: list[Any] = [
        styled("[bold]fleet {}[/]  {} devices: [green]{} online[/], [red]{} offline[/]  {}{}",
               frame["fleet"], devices["total"], devices["online"], devices["offline"], when,
               _leader(frame.get("controller") or {})),
        _versions_table(frame["versions"]), literal(f"update states: {states or '-'}")]
    parts += [_rollout_table(r) for r in frame["rollouts"]] or ["no rollout running"]
    if frame["attention"]:
        parts.append(_attention_table(frame))
    if problem:
        parts.append(styled("[yellow]{}[/]", problem))
    return Group(*parts)


def _leader(controller: dict[str, Any]) -> str:
    """``  controller b (follower, leader a)`` when several controllers share the fleet."""
    role = controller.get("role")
    if role not in ("leader", "follower"):
        return ""
    leads = f", leader {controller.get('leader') or 'none right now'}" if role == "follower" else ""
    return f"  controller {controller.get('id')} ({role}{leads})"


def _versions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="model versions", title_justify="left")
    for column in ("version", "devices", "inferences", "p50 ms", "p95 ms", "error rate",
                   "agreement"):
        table.add_column(column, justify="left" if column == "version" else "right")
    for row in rows:
        table.add_row(literal(row["version"]), str(row["devices"]),
                      literal(_text(row["inferences"])),
                      _ms(row["p50_ms"]), _ms(row["p95_ms"]), _pct(row["error_rate"]),
                      _pct(row["agreement"]))
    return table


def _rollout_table(r: dict[str, Any]) -> Table:
    table = Table(title=styled("rollout {}: {} -> {}  [bold]{}[/]  {}", r["id"], r["model"],
                               " ".join(r["to"]), r["state"], r["reason"]),
                  title_justify="left")
    for column in ("wave", "up to", "devices", "progress", "succeeded", "failed", "waiting"):
        table.add_column(column)
    for w in r["waves"]:
        marker = "▶ " if w["wave"] == r["wave"] and r["state"] == RolloutState.RUNNING else ""
        table.add_row(f"{marker}{w['wave']}", literal(w["up_to"]), str(w["devices"]),
                      ProgressBar(total=max(w["devices"], 1), completed=w["done"], width=20),
                      str(w["succeeded"]), str(w["failed"]), str(w["waiting"]))
    return table


def _attention_table(frame: dict[str, Any]) -> Table:
    shown, total = len(frame["attention"]), frame["attention_total"]
    more = f" (first {shown} of {total})" if total > shown else ""
    table = Table(title=f"devices offline or updating{more}", title_justify="left")
    for column in ("device", "online", "group", "model", "update", "detail"):
        table.add_column(column)
    for d in frame["attention"]:
        table.add_row(literal(d["device"]), "yes" if d["online"] else "[red]no[/]",
                      *(literal(d[k] or "") for k in ("group", "model", "update", "detail")))
    return table


def _text(value: Any) -> str:
    return "-" if value is None else str(value)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


# --- the command --------------------------------------------------------------------------

def top(
    controller: Annotated[str, typer.Option("--controller", envvar="EDGEFLEET_CONTROLLER",
                                            help="The controller's URL")
                          ] = "http://127.0.0.1:8600",
    token: Annotated[str | None, typer.Option("--token", envvar="EDGEFLEET_TOKEN",
                                              help="API token (or EDGEFLEET_TOKEN)")] = None,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between frames")] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Each frame as one line of JSON")
                       ] = False,
) -> None:
    """The fleet live: devices online, versions with their latency and agreement, rollouts."""
    client = FleetClient(controller, token, timeout_s=max(interval * 5, 10.0))
    try:
        frame = collect(client)
    except EdgefleetError as exc:
        fail(exc, as_json)
    try:
        if as_json:
            _json_lines(client, frame, interval, once)
        elif once:
            console.print(render(frame))
        else:
            _live(client, frame, interval)
    except KeyboardInterrupt:
        pass


def _json_lines(client: FleetClient, frame: dict[str, Any], interval: float,
                once: bool) -> None:
    """JSON Lines on stdout; a transient error goes to stderr and the line is skipped."""
    _write_line(frame)
    while not once:
        time.sleep(interval)
        frame, problem = _next(client, frame, as_json=True)
        if problem:
            sys.stderr.write(problem + "\n")
        else:
            _write_line(frame)


def _write_line(frame: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(frame, sort_keys=True) + "\n")
    sys.stdout.flush()


def _live(client: FleetClient, frame: dict[str, Any], interval: float) -> None:
    with Live(render(frame), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            frame, problem = _next(client, frame, as_json=False)
            live.update(render(frame, problem))


def _next(client: FleetClient, last: dict[str, Any], as_json: bool) -> tuple[dict[str, Any], str]:
    """A new frame; on a transient error the last one and what went wrong."""
    try:
        return collect(client), ""
    except EdgefleetError as exc:
        if not exc.transient:
            fail(exc, as_json)
        return last, f"{time.strftime('%H:%M:%S')} {exc} - retrying"
