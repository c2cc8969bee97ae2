"""``edgefleet fleet``: run the controller, and operate it (push, rollouts, rollback, history).

Every operating command talks to the controller's REST API (``--controller`` or
``EDGEFLEET_CONTROLLER``, token from ``--token`` or ``EDGEFLEET_TOKEN``) and prints a
table, or JSON with ``--json``. Errors say what went wrong and what to do; exit code 2.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from agent.cli.output import console, emit, fail, table
from agent.protocol.errors import EdgefleetError
from agent.protocol.signing import TrustedKeys
from fleet.cli_simulate import simulate
from fleet.cli_top import top
from fleet.client import FleetClient

app = typer.Typer(help="The fleet: controller, models, rollouts, rollback, history.",
                  no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts: create, watch, pause, resume, abort.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines")]
ControllerOpt = Annotated[str, typer.Option("--controller", envvar="EDGEFLEET_CONTROLLER",
                                            help="The controller's URL")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="EDGEFLEET_TOKEN",
                                              help="API token (or EDGEFLEET_TOKEN)")]
DEFAULT_URL = "http://127.0.0.1:8600"


def _client(url: str, token: str | None) -> FleetClient:
    return FleetClient(url, token)


def _run(as_json: bool, call: Callable[[], T]) -> T:
    try:
        return call()
    except EdgefleetError as exc:
        fail(exc, as_json)


# --- serve ------------------------------------------------------------------------------

@app.command()
def serve(
    fleet: Annotated[str, typer.Option(help="Fleet name (the MQTT topic level)")],
    trusted_key: Annotated[list[Path], typer.Option("--trusted-key",
                                                    help="Public key(s) bundles must be "
                                                         "signed with")],
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT")] = "mqtt://127.0.0.1:1883",
    db: Annotated[str | None, typer.Option(help="sqlite:///PATH (default: in --data-dir) "
                                                "or postgresql://...")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where bundles (and SQLite) live")] = Path(
        "fleet-data"),
    http: Annotated[str, typer.Option(help="HOST:PORT of the API and bundle server")] = (
        "127.0.0.1:8600"),
    public_url: Annotated[str | None, typer.Option(help="URL devices use to reach --http "
                                                        "(default: http://HTTP)")] = None,
    token: Annotated[list[str] | None, typer.Option(
        "--token", envvar="EDGEFLEET_TOKEN",
        help="NAME=SECRET (repeatable); the name is written in the history")] = None,
    tick: Annotated[float, typer.Option(help="Seconds between rollout steps")] = 1.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the controller: registry, rollouts, REST API and bundle downloads."""
    from fleet.api import ApiServer, parse_tokens
    from fleet.controller import ControllerConfig, FleetController
    from fleet.store import open_store

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = http.rpartition(":")
    data_dir = data_dir.resolve()  # stored bundle paths must survive another working dir
    try:
        tokens = parse_tokens(token or [])
        _make_dir(data_dir)  # a first run: SQLite needs the folder
        store = open_store(db or (data_dir / "fleet.db").resolve())
        config = ControllerConfig(fleet=fleet, broker_url=broker, data_dir=data_dir,
                                  public_url=public_url or f"http://{http}",
                                  trusted=TrustedKeys.from_paths(trusted_key), tick_s=tick)
        controller = FleetController(config, store).start()
        api = ApiServer(controller, tokens, host or "127.0.0.1", int(port)).start()
    except EdgefleetError as exc:
        fail(exc)
    console.print(f"edgefleet controller for fleet [bold]{fleet}[/]: API {api.url}, "
                  f"broker {broker}, {len(controller.registry)} devices known")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
        controller.stop()
        store.close()


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgefleetError(f"cannot create --data-dir {path}: {exc.strerror}",
                             hint="pass a folder this user may write to") from exc


# --- models and devices -----------------------------------------------------------------

@app.command()
def push(bundle: Annotated[Path, typer.Argument(help="A signed .efb bundle")],
         controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
         as_json: JsonOpt = False) -> None:
    """Upload a bundle; the controller verifies it before it stores it."""
    try:
        data = bundle.read_bytes()
    except OSError as exc:
        fail(EdgefleetError(f"cannot read {bundle}: {exc.strerror}",
                            hint="pass the path of an .efb file"), as_json)
    result = _run(as_json, lambda: _client(controller, token).upload("/api/v1/models", data))
    model = result["model"]
    row = {"model": f"{model['name']}:{model['version']}", "sha256": model["sha256"][:12],
           "size": model["size"], "stored": "new" if result["added"] else "already there"}
    emit(result, as_json, table("pushed", [row], list(row)))


@app.command()
def models(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Every pushed model version with its measured metrics."""
    data = _run(as_json, lambda: _client(controller, token).get("/api/v1/models"))
    rows = [_model_row(m) for m in data]
    emit(data, as_json, table("model versions", rows, list(rows[0]) if rows else ["model"]))


def _model_row(model: dict[str, Any]) -> dict[str, Any]:
    metrics = model["manifest"].get("metrics") or {}
    quant = (model["manifest"].get("optimization") or {}).get("quantization")
    return {"model": f"{model['name']}:{model['version']}", "sha256": model["sha256"][:12],
            "format": model["format"], "quantization": quant, "size": model["size"],
            "accuracy": metrics.get("accuracy"),
            "agreement": (metrics.get("agreement") or {}).get("top1"),
            "p50 ms": metrics.get("latency_p50_ms"), "pushed by": model["pushed_by"]}


@app.command()
def devices(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """Every device: online, group, tags, what it runs, its update state."""
    data = _run(as_json, lambda: _client(controller, token).get("/api/v1/devices"))
    rows = [{"device": d["id"], "online": "yes" if d["online"] else "no",
             "group": d["group"], "tags": ",".join(d["tags"]),
             "model": f"{d['active']['name']}:{d['active']['version']}" if d["active"] else "",
             "update": d["update_state"], "profile": d["profile"]} for d in data]
    emit(data, as_json, table(f"{len(rows)} devices", rows,
                              ["device", "online", "group", "tags", "model", "update",
                               "profile"]))


@app.command()
def group(name: Annotated[str, typer.Argument(help="Group name ('-' removes the group)")],
          device: Annotated[list[str], typer.Argument(help="Device ids")],
          controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
          as_json: JsonOpt = False) -> None:
    """Put devices in a group (one group per device)."""
    body = {"devices": device, "group": None if name == "-" else name}
    data = _run(as_json, lambda: _client(controller, token).post("/api/v1/devices/group", body))
    rows = [{"device": d["id"], "group": d["group"]} for d in data]
    emit(data, as_json, table("groups", rows, ["device", "group"]))


@app.command()
def tag(device: Annotated[str, typer.Argument(help="Device id")],
        add: Annotated[list[str] | None, typer.Option("--add", help="Tag to add")] = None,
        remove: Annotated[list[str] | None, typer.Option("--remove", help="Tag to remove")
                          ] = None,
        controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
        as_json: JsonOpt = False) -> None:
    """Add or remove tags of a device."""
    body = {"add": add or [], "remove": remove or []}
    data = _run(as_json, lambda: _client(controller, token).post(
        f"/api/v1/devices/{device}/tags", body))
    emit(data, as_json, table("tags", [{"device": data["id"], "tags": ",".join(data["tags"])}],
                              ["device", "tags"]))


@app.command()
def history(limit: Annotated[int, typer.Option(help="Newest N entries")] = 50,
            target: Annotated[str | None, typer.Option(help="Only this target")] = None,
            controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """The audit history: what was done, when, by which token, and how it ended."""
    query = urlencode({"limit": limit, **({"target": target} if target else {})})
    data = _run(as_json, lambda: _client(controller, token).get(f"/api/v1/history?{query}"))
    rows = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts_ms"] / 1000)),
             "by": e["actor"], "action": e["action"], "target": e["target"],
             "outcome": e["outcome"], "what": (e.get("detail") or {}).get("summary", "")}
            for e in data]
    emit(data, as_json, table("history", rows, ["when", "by", "action", "target", "outcome",
                                                "what"]))


@app.command()
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
        data: Any = _run(as_json, lambda: client.post(f"/api/v1/rollouts/{rollout}/rollback"))
        summaries = [data]
    else:
        data = _run(as_json, lambda: client.post("/api/v1/rollback", {"group": group}))
        summaries = data
    rows = [_rollout_row(s) for s in summaries]
    emit(data, as_json, table("rolled back", rows, list(rows[0]) if rows else ["rollout"]))


# --- rollouts ---------------------------------------------------------------------------

@rollout_app.command("create")
def rollout_create(
    model: Annotated[str, typer.Option("--model", help="NAME:VERSION of a pushed bundle")],
    to: Annotated[list[str], typer.Option("--to", help="group:G, tag:T or device:ID "
                                                       "(repeatable)")],
    waves: Annotated[str | None, typer.Option(help="Cumulative waves: 1%,10%,50%,100% or "
                                                   "counts")] = None,
    canary: Annotated[int | None, typer.Option(help="N devices first, then everyone")] = None,
    rate: Annotated[float | None, typer.Option(help="Devices started per minute")] = None,
    exponential: Annotated[float, typer.Option(help="Rate multiplier per wave")] = 1.0,
    device_timeout: Annotated[str, typer.Option(help="A device that has not answered "
                                                     "by then times out")] = "10m",
    max_failures: Annotated[float, typer.Option(help="Abort above this % of failed "
                                                     "devices")] = 0.0,
    min_success: Annotated[float, typer.Option(help="A wave advances with at least this % "
                                                    "succeeded")] = 100.0,
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
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Start a staged rollout of a pushed model version to a set of devices."""
    from fleet.rollout.spec import parse_duration

    if waves is not None and canary is not None:
        fail(EdgefleetError("--waves and --canary exclude each other",
                            hint="--canary N is --waves N,100%"), as_json)
    wave_text = f"{canary},100%" if canary is not None else (waves or "100%")
    body = _run(as_json, lambda: {
        "model": model, "selectors": to, "waves": wave_text.split(","),
        "rate_per_min": rate, "exponential": exponential,
        "device_timeout_s": parse_duration(device_timeout), "soak_s": parse_duration(soak),
        "gates": {"max_failures_pct": max_failures, "min_success_pct": min_success,
                  "max_p95_ratio": max_p95_ratio, "max_error_rate_pct": max_error_rate,
                  "min_agreement_pct": min_agreement, "min_samples": min_samples}})
    data = _run(as_json, lambda: _client(controller, token).post("/api/v1/rollouts", body))
    emit(data, as_json, _rollout_view(data))


@rollout_app.command("list")
def rollout_list(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Every rollout, newest first."""
    data = _run(as_json, lambda: _client(controller, token).get("/api/v1/rollouts"))
    rows = [_rollout_row(r) for r in data]
    emit(data, as_json, table("rollouts", rows, list(rows[0]) if rows else ["rollout"]))


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
    data = _run(as_json, lambda: client.get(f"/api/v1/rollouts/{rollout}"))
    if not watch or as_json:
        emit(data, as_json, _rollout_view(data))
        return
    with Live(_rollout_view(data), console=console, refresh_per_second=4) as live:
        while data["state"] in ("PENDING", "RUNNING", "PAUSED"):
            time.sleep(interval)
            data = _run(as_json, lambda: client.get(f"/api/v1/rollouts/{rollout}"))
            live.update(_rollout_view(data))


def _operate(verb: str) -> Callable[..., None]:
    def command(rollout: Annotated[str, typer.Argument(help="Rollout id")],
                controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                as_json: JsonOpt = False) -> None:
        data = _run(as_json, lambda: _client(controller, token).post(
            f"/api/v1/rollouts/{rollout}/{verb}"))
        emit(data, as_json, _rollout_view(data))

    command.__doc__ = {"pause": "Stop sending the bundle to more devices (and committing).",
                       "resume": "Carry on a paused rollout.",
                       "abort": "End it: roll back devices that have not committed."}[verb]
    return command


for _verb in ("pause", "resume", "abort"):
    rollout_app.command(_verb)(_operate(_verb))


def _rollout_row(r: dict[str, Any]) -> dict[str, Any]:
    model = r["spec"]["model"]
    counts = r.get("counts", {})
    return {"rollout": r["id"], "model": f"{model['name']}:{model['version']}",
            "to": " ".join(r["spec"]["selectors"]), "state": r["state"],
            "wave": f"{min(r['wave'] + 1, r['waves'])}/{r['waves']}",
            "succeeded": f"{counts.get('SUCCEEDED', 0)}/{r['total']}",
            "failed": counts.get("FAILED", 0), "reason": r["reason"]}


def _rollout_view(r: dict[str, Any]) -> Group:
    """Header, one progress bar per wave, gates, and the devices that are not done."""
    spec, devices = r["spec"], r.get("devices", [])
    waves = Table(title=f"rollout {r['id']}: {spec['model']['name']}:"
                        f"{spec['model']['version']} -> {' '.join(spec['selectors'])}  "
                        f"[bold]{r['state']}[/]  {r['reason']}", expand=False)
    for column in ("wave", "up to", "devices", "progress", "succeeded", "failed", "waiting"):
        waves.add_column(column)
    for index, bound in enumerate(spec["waves"]):
        members = [d for d in devices if d["wave"] == index]
        done = sum(1 for d in members if d["state"] not in ("PENDING", "TARGETED", "UPDATING",
                                                            "PROBATION", "COMMITTING"))
        ok = sum(1 for d in members if d["state"] == "SUCCEEDED")
        bad = sum(1 for d in members if d["state"] in ("FAILED", "TIMED_OUT"))
        marker = "▶ " if index == r["wave"] and r["state"] == "RUNNING" else ""
        waves.add_row(f"{marker}{index + 1}", bound, str(len(members)),
                      ProgressBar(total=max(len(members), 1), completed=done, width=24),
                      str(ok), str(bad), str(len(members) - done))
    gates = spec["gates"]
    gate_text = ", ".join(f"{k}={v}" for k, v in gates.items() if v is not None)
    notable = [d for d in devices if d["state"] not in ("SUCCEEDED", "PENDING")][:30]
    rows = [{"device": d["device"], "wave": d["wave"] + 1, "state": d["state"],
             "reason": d["reason"]} for d in notable]
    parts: list[Any] = [waves, f"gates: {gate_text}; soak {spec['soak_s']:g}s, timeout "
                               f"{spec['device_timeout_s']:g}s"]
    if rows:
        parts.append(table("devices not done or not succeeded", rows, list(rows[0])))
    return Group(*parts)


app.command("simulate")(simulate)
app.command("top")(top)
