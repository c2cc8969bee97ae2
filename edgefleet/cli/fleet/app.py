"""``edgefleet fleet``: run the controller, and operate it (push, rollouts, rollback, history).

Every operating command talks to the controller's REST API (``--controller`` or
``EDGEFLEET_CONTROLLER``, token from ``--token`` or ``EDGEFLEET_TOKEN``) and prints a
table, or JSON with ``--json``. Errors say what went wrong and what to do; exit code 2.
"""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from edgefleet.agent.ports import check_free
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.systemd import Unit
from edgefleet.cli.extras import needs
from edgefleet.cli.fleet.common import (
    DEFAULT_URL,
    ControllerOpt,
    JsonOpt,
    TokenOpt,
)
from edgefleet.cli.fleet.common import client as _client
from edgefleet.cli.fleet.common import run as _run
from edgefleet.cli.fleet.devices import devices_app
from edgefleet.cli.fleet.drift import alerts, drift_app
from edgefleet.cli.fleet.models import show_model
from edgefleet.cli.fleet.simulate import simulate
from edgefleet.cli.fleet.top import top
from edgefleet.cli.logs import LogFormat, LogFormatOpt, fail_in, setup_logging
from edgefleet.cli.mqtt_options import (
    CaOpt,
    CertOpt,
    KeyOpt,
    PasswordFileOpt,
    UsernameOpt,
    mqtt_security,
)
from edgefleet.cli.output import console, emit, fail, literal, styled, table
from edgefleet.cli.params import api_address, fleet_option, host_port
from edgefleet.cli.service import ServiceSpec, service_app, subcommand
from edgefleet.fleet.api_types import GateOptions, RolloutOptions
from edgefleet.fleet.rollout.state import FINISHED, DeviceState, RolloutState

_FINISHED = frozenset(state.value for state in FINISHED)
_UNDECIDED = frozenset(state.value for state in (  # devices whose wave has not settled yet
    DeviceState.PENDING, DeviceState.TARGETED, DeviceState.UPDATING, DeviceState.PROBATION,
    DeviceState.COMMITTING))

app = typer.Typer(help="The fleet: controller, models, rollouts, rollback, history.",
                  no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts: create, watch, pause, resume, abort.",
                          no_args_is_help=True)
app.add_typer(rollout_app, name="rollout")

# --- serve ------------------------------------------------------------------------------

@app.command()
@needs("fleet serve", "fleet")
def serve(
    fleet: Annotated[str, typer.Option(help="Fleet name (the MQTT topic level)",
                                       callback=fleet_option)],
    trusted_key: Annotated[list[Path], typer.Option("--trusted-key",
                                                    help="Public key(s) bundles must be "
                                                         "signed with")],
    broker: Annotated[str, typer.Option(help="mqtt://HOST:PORT or mqtts://HOST:8883")] = (
        "mqtt://127.0.0.1:1883"),
    ca: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    username: UsernameOpt = None,
    password_file: PasswordFileOpt = None,
    db: Annotated[str | None, typer.Option(help="sqlite:///PATH (default: in --data-dir) "
                                                "or postgresql://...")] = None,
    data_dir: Annotated[Path, typer.Option(help="Where bundles (and SQLite) live")] = Path(
        "fleet-data"),
    http: Annotated[str, typer.Option(help="HOST:PORT (IPv4 or a host name) of the API and "
                                           "bundle server", callback=api_address)] = (
        "127.0.0.1:8600"),
    public_url: Annotated[str | None, typer.Option(
        help="URL devices use to reach --http (default: http(s)://HTTP); without "
             "--allow-origin, the web page opened there may act too")] = None,
    allow_origin: Annotated[list[str] | None, typer.Option(
        "--allow-origin", help="An origin (https://host[:port], repeatable) whose web page "
                               "may act, besides the address the request was sent to; "
                               "default: --public-url's (docs/dashboards.md)")] = None,
    tls_cert: Annotated[Path | None, typer.Option(
        help="Serve HTTPS with this certificate ('edgefleet certs server'); with --tls-key",
        exists=True, dir_okay=False)] = None,
    tls_key: Annotated[Path | None, typer.Option(
        help="The HTTPS certificate's key", exists=True, dir_okay=False)] = None,
    token: Annotated[list[str] | None, typer.Option(
        "--token", envvar="EDGEFLEET_TOKEN",
        help="NAME:ROLE=SECRET (repeatable): ROLE is viewer, operator or admin (NAME=SECRET "
             "is admin); the name and role are written in the history")] = None,
    tick: Annotated[float, typer.Option(help="Seconds between rollout steps")] = 1.0,
    controller_id: Annotated[str | None, typer.Option(
        "--controller-id", envvar="EDGEFLEET_CONTROLLER_ID",
        help="This controller's name, unique among several (default: the host name)")] = None,
    lease_s: Annotated[float | None, typer.Option(
        "--lease-s", help="Scale-out: several controllers on one store and broker, one leads "
                          "at a time; a dead leader is replaced within this many seconds "
                          "(>= 3 x --tick; docs/scale-out.md)")] = None,
    shared_telemetry: Annotated[bool, typer.Option(
        "--shared-telemetry", help="With --lease-s: split telemetry between the controllers "
                                   "(MQTT shared subscription)")] = False,
    share_group: Annotated[str, typer.Option(
        help="The shared subscription group of --shared-telemetry")] = "edgefleet",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Run the controller: registry, rollouts, REST API and bundle downloads."""
    from edgefleet.fleet.api import ApiServer, parse_tokens
    from edgefleet.fleet.controller import ControllerConfig, FleetController
    from edgefleet.fleet.events_log import log_events
    from edgefleet.fleet.store import open_store

    json_logs = log_format is LogFormat.json  # machines filter by level themselves
    setup_logging(log_format, logging.INFO if verbose or json_logs else logging.WARNING,
                  "%(asctime)s %(levelname)s %(name)s: %(message)s", lambda: {"fleet": fleet})
    host, port = host_port(http, "--http")
    data_dir = data_dir.resolve()  # stored bundle paths must survive another working dir
    try:
        tokens = parse_tokens(token or [])
        check_free(host, port, "--http HOST:PORT")  # before any thread
        _make_dir(data_dir)  # a first run: SQLite needs the folder
        tls = _server_tls(tls_cert, tls_key)
        store = open_store(db or (data_dir / "fleet.db").resolve())
        config = ControllerConfig(fleet=fleet, broker_url=broker, data_dir=data_dir,
                                  public_url=public_url or f"{'https' if tls else 'http'}://"
                                                           f"{http}",
                                  allow_origins=_origins(allow_origin or []),
                                  trusted=TrustedKeys.from_paths(trusted_key), tick_s=tick,
                                  mqtt_security=mqtt_security(ca, cert, key, username,
                                                              password_file),
                                  **_scale_out(controller_id, lease_s, shared_telemetry,
                                               share_group))
        controller = FleetController(config, store).start()
        log_events(controller)
        api = ApiServer(controller, tokens, host, port, tls=tls).start()
    except EdgefleetError as exc:
        fail_in(log_format, exc)
    started = (f"API {api.url}, broker {broker}, {len(controller.registry)} devices known"
               + _role(controller.controller_status()))
    if json_logs:
        logging.getLogger("edgefleet.fleet").info("edgefleet controller: %s", started)
    else:
        console.print(styled("edgefleet controller for fleet [bold]{}[/]: {}", fleet, started))
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


@app.command()
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


def _server_tls(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise EdgefleetError("HTTPS needs both --tls-cert and --tls-key",
                             hint="make them with 'edgefleet certs server --host NAME'")
    from edgefleet.fleet.certs import server_context

    return server_context(cert, key)


def _origins(urls: list[str]) -> tuple[str, ...]:
    """--allow-origin's values, each an http(s) origin."""
    from edgefleet.fleet.same_origin import is_origin

    for url in urls:
        if not is_origin(url):
            raise EdgefleetError(f"--allow-origin {url!r} is not an http(s) origin",
                                 hint="give the address the page is opened at, e.g. "
                                      "--allow-origin https://fleet.example.com")
    return tuple(urls)


def _scale_out(controller_id: str | None, lease_s: float | None, shared: bool,
               group: str) -> dict[str, Any]:
    """ControllerConfig's scale-out fields (it checks them: lease vs tick, the group)."""
    return {"controller_id": controller_id or socket.gethostname(), "lease_s": lease_s,
            "shared_telemetry": group if shared else None}


def _role(status: dict[str, Any]) -> str:
    if status["role"] == "single":
        return ""
    return (f"; controller {status['id']} is the {status['role']}"
            + (f" (leader: {status['leader']})" if status["role"] == "follower" else ""))


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
    """Upload a bundle (streamed from disk); the controller verifies it before it stores it."""
    if not bundle.is_file():
        fail(EdgefleetError(f"cannot read {bundle}: not a file",
                            hint="pass the path of an .efb file"), as_json)
    result = _run(as_json, lambda: _client(controller, token).push(bundle))
    model = result["model"]
    row = {"model": f"{model['name']}:{model['version']}", "sha256": model["sha256"][:12],
           "size": model["size"], "stored": "new" if result["added"] else "already there"}
    emit(result, as_json, table("pushed", [row], list(row)))


models_app = typer.Typer(help="Pushed model versions: list them, or show one in full.")
app.add_typer(models_app, name="models")
models_app.command("show")(show_model)
app.add_typer(devices_app, name="devices")


@models_app.callback(invoke_without_command=True)
def models(ctx: typer.Context, controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Every pushed model version with its measured metrics ('models show NAME:VERSION': one
    in full, with its lineage)."""
    if ctx.invoked_subcommand is not None:
        return
    data = _run(as_json, lambda: _client(controller, token).models())
    rows = [_model_row(m) for m in data]
    emit(data, as_json, table("model versions", rows, list(rows[0]) if rows else ["model"]))


def _model_row(model: Mapping[str, Any]) -> dict[str, Any]:
    metrics = model["manifest"].get("metrics") or {}
    quant = (model["manifest"].get("optimization") or {}).get("quantization")
    return {"model": f"{model['name']}:{model['version']}", "sha256": model["sha256"][:12],
            "format": model["format"], "quantization": quant, "size": model["size"],
            "accuracy": metrics.get("accuracy"),
            "agreement": (metrics.get("agreement") or {}).get("top1"),
            "p50 ms": metrics.get("latency_p50_ms"), "pushed by": model["pushed_by"]}


groups_app = typer.Typer(help="Dynamic groups: selectors saved under a name (group:NAME).")
app.add_typer(groups_app, name="groups")


@groups_app.callback(invoke_without_command=True)
def groups(ctx: typer.Context, controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """Every dynamic group: its selector and how many devices it matches now."""
    if ctx.invoked_subcommand is not None:
        return
    data = _run(as_json, lambda: _client(controller, token).groups())
    emit(data, as_json, _groups_table("dynamic groups", data))


def _groups_table(title: str, data: Sequence[Mapping[str, Any]]) -> Any:
    rows = [{"group": g["name"], "where": g["where"], "devices": g["devices"],
             "by": g["created_by"]} for g in data]
    return table(title, rows, ["group", "where", "devices", "by"])


@groups_app.command("create")
def groups_create(
    name: Annotated[str, typer.Argument(help="Group name: rollouts use it as group:NAME")],
    where: Annotated[str, typer.Option("--where", help="The selector, e.g. "
                                                       "'profile=raspberry-pi-4 & "
                                                       "label:site=plant-a'")],
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Save a selector as a dynamic group; a rollout to group:NAME takes the selector when
    it is created (docs/fleet.md, "Selectors")."""
    from edgefleet.fleet.rollout.selector import parse_selector

    _run(as_json, lambda: parse_selector(where))  # refused here, before anything is sent
    data = _run(as_json, lambda: _client(controller, token).create_group(name, where))
    emit(data, as_json, _groups_table("group saved", [data]))


@groups_app.command("delete")
def groups_delete(name: Annotated[str, typer.Argument(help="Group name")],
                  controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Delete a dynamic group (rollouts created with it keep what it meant)."""
    data = _run(as_json, lambda: _client(controller, token).delete_group(name))
    emit(data, as_json, literal(f"group {name} deleted"))


@app.command()
def group(name: Annotated[str, typer.Argument(help="Group name ('-' removes the group)")],
          device: Annotated[list[str], typer.Argument(help="Device ids")],
          controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
          as_json: JsonOpt = False) -> None:
    """Put devices in a group (one group per device)."""
    group_name = None if name == "-" else name
    data = _run(as_json, lambda: _client(controller, token).set_group(device, group_name))
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
    data = _run(as_json, lambda: _client(controller, token).tag(device, add, remove))
    emit(data, as_json, table("tags", [{"device": data["id"], "tags": ",".join(data["tags"])}],
                              ["device", "tags"]))


@app.command()
def history(limit: Annotated[int, typer.Option(help="Newest N entries")] = 50,
            target: Annotated[str | None, typer.Option(help="Only this target")] = None,
            action: Annotated[str | None, typer.Option(
                help="Only this action, e.g. api.refused, rollout.create")] = None,
            controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """The audit history: what was done, when, by which token, and how it ended."""
    data = _run(as_json, lambda: _client(controller, token).history(limit, target, action))
    rows = [{"when": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["ts_ms"] / 1000)),
             "by": _by(e), "action": e["action"], "target": e["target"],
             "outcome": e["outcome"], "what": (e.get("detail") or {}).get("summary", "")}
            for e in data]
    emit(data, as_json, table("history", rows, ["when", "by", "action", "target", "outcome",
                                                "what"]))


@app.command()
def whoami(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
           as_json: JsonOpt = False) -> None:
    """The token's name and role on this controller (viewer, operator or admin)."""
    data = _run(as_json, lambda: _client(controller, token).get("/api/v1/whoami"))
    emit(data, as_json, table("token", [data], ["name", "role"]))


def _by(entry: Mapping[str, Any]) -> str:
    """The token's name, and its role when it had one (the controller's own: none)."""
    role = (entry.get("detail") or {}).get("role")
    return f"{entry['actor']} ({role})" if role else str(entry["actor"])


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
        data: Any = _run(as_json, lambda: client.rollback_rollout(rollout))
        summaries = [data]
    elif group is not None:
        data = _run(as_json, lambda: client.rollback_group(group))
        summaries = data
    rows = [_rollout_row(s) for s in summaries]
    emit(data, as_json, table("rolled back", rows, _columns(rows)))


# --- rollouts ---------------------------------------------------------------------------

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


app.command("simulate")(simulate)
app.command("top")(top)
app.command("alerts")(alerts)
app.add_typer(drift_app, name="drift")


# --- the fleet keyring (docs/keys.md) ---------------------------------------------------

keyring_app = typer.Typer(help="The fleet keyring: which signing keys devices trust.",
                          no_args_is_help=True)
app.add_typer(keyring_app, name="keyring")


@keyring_app.command("publish")
def keyring_publish(
    keyring: Annotated[Path, typer.Argument(help="keyring.json from 'edgefleet keys rotate' "
                                                 "or 'keys retire'")],
    force: Annotated[bool, typer.Option("--force", help="Publish even if devices run a "
                                                        "bundle signed by a dropped key")
                     ] = False,
    controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Send a keyring to every device (retained); the controller checks it first."""
    try:
        data = keyring.read_bytes()
    except OSError as exc:
        fail(EdgefleetError(f"cannot read {keyring}: {exc.strerror}",
                            hint="pass the keyring.json in your keys folder"), as_json)
    result = _run(as_json, lambda: _client(controller, token).publish_keyring(data, force))
    if not result["changed"]:
        what = "already held: sent again"
    else:
        what = "published" if result["published"] else "stored; goes out when the broker is back"
    emit(result, as_json, _keyring_view(result, what))


@keyring_app.command("show")
def keyring_show(controller: ControllerOpt = DEFAULT_URL, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    """The keyring the controller holds and publishes."""
    data = _run(as_json, lambda: _client(controller, token).keyring())
    emit(data, as_json, _keyring_view(data, f"issued {data['issued']}"))


def _keyring_view(data: Mapping[str, Any], what: str) -> Group:
    rows = [{"key_id": k["key_id"], "name": k["name"],
             "signed it": "yes" if k["key_id"] in data["signed_by"] else ""}
            for k in data["keys"]]
    parts: list[Any] = [table(f"keyring serial {data['serial']}: {what}", rows,
                              ["key_id", "name", "signed it"])]
    stranded = data.get("stranded") or []
    if stranded:
        parts.append(styled("[yellow]forced past {} devices whose bundle is signed by a "
                            "dropped key:[/] {}", len(stranded), ", ".join(stranded[:10])))
    return Group(*parts)


app.add_typer(service_app(ServiceSpec(
    Unit("edgefleet.fleet", "edgefleet-controller.service"), ("fleet", "serve"),
    lambda: subcommand(app, "serve"),
    user="edgefleet-controller", data_dir=Path("/var/lib/edgefleet-controller"),
    secrets=(("--token", "put EDGEFLEET_TOKEN=NAME=SECRET in /etc/edgefleet/controller.env "
                         "(mode 0600): the unit reads it"),))),
    name="service")
