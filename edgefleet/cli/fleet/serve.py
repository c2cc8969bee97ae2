"""``edgefleet fleet serve``: run the controller (registry, rollouts, REST API and bundle
downloads) until SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import signal
import socket
import ssl
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.agent.ports import check_free
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.cli.extras import needs
from edgefleet.cli.logs import LogFormat, LogFormatOpt, fail_in, setup_logging
from edgefleet.cli.mqtt_options import (
    CaOpt,
    CertOpt,
    KeyOpt,
    PasswordFileOpt,
    UsernameOpt,
    mqtt_security,
)
from edgefleet.cli.output import console, styled
from edgefleet.cli.params import api_address, fleet_option, host_port

__all__ = ["serve"]


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
