"""``edgefleet agent``: run the agent on a device."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from agent.cli.output import fail
from agent.core import Agent
from agent.errors import NothingToServeError
from agent.protocol.errors import EdgefleetError
from agent.protocol.signing import TrustedKeys
from agent.service import AgentService, ServiceConfig

app = typer.Typer(help="Run models on this device.", no_args_is_help=True)

DEFAULT_DATA_DIR = Path(os.environ.get("EDGEFLEET_DATA_DIR", "~/.local/share/edgefleet"))


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:8080)")
    return host, int(port)


def _trusted(paths: list[Path], data_dir: Path) -> TrustedKeys:
    candidates = paths or [data_dir / "keys"]
    trusted = TrustedKeys.from_paths([p for p in candidates if p.exists()])
    if not len(trusted):
        raise NothingToServeError(
            f"no trusted public keys in {', '.join(map(str, candidates))}",
            hint="pass --trusted-key KEY.pub (from 'edgefleet keys generate')")
    return trusted


@app.command()
def run(
    bundle: Annotated[Path, typer.Option(help="Bundle (.efb) to serve")],
    fleet: Annotated[str, typer.Option(help="Fleet name (MQTT topic level)")] = "default",
    device_id: Annotated[str, typer.Option(help="This device's id")] = "device-1",
    broker: Annotated[str | None, typer.Option(help="mqtt://HOST:PORT; none = no MQTT")] = None,
    http: Annotated[str | None, typer.Option(help="HOST:PORT for the KServe v2 server")] = None,
    trusted_key: Annotated[list[Path] | None, typer.Option(
        help=".pub file or folder of them; default DATA_DIR/keys")] = None,
    data_dir: Annotated[Path, typer.Option(help="Spool, counters, slots")] = DEFAULT_DATA_DIR,
    threads: Annotated[int, typer.Option(min=1, help="Inference threads")] = 1,
    telemetry_interval: Annotated[float, typer.Option(min=0.05, help="Seconds")] = 10.0,
    spool_max_bytes: Annotated[int, typer.Option(min=4096, help="Disk bound while offline")] =
    8 * 1024 * 1024,
    profile: Annotated[str | None, typer.Option(help="Device profile name")] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Serve a bundle, report telemetry over MQTT, answer KServe v2 requests over HTTP."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    data = data_dir.expanduser()
    try:
        agent = Agent(_trusted(trusted_key or [], data), threads=threads)
        _load_or_refuse(agent, bundle)
    except EdgefleetError as exc:
        fail(exc)
    host, port = _host_port(http) if http else ("127.0.0.1", None)
    config = ServiceConfig(fleet=fleet, device_id=device_id, data_dir=data, broker_url=broker,
                           http_host=host, http_port=port,
                           telemetry_interval_s=telemetry_interval,
                           spool_max_bytes=spool_max_bytes, profile=profile)
    _serve_until_signalled(AgentService(config, agent))


def _load_or_refuse(agent: Agent, bundle: Path) -> None:
    try:
        agent.load(bundle)
    except EdgefleetError as exc:
        raise NothingToServeError(f"nothing to serve: {bundle}: {exc.message}",
                                  hint=exc.hint or "pass a bundle that verifies") from exc


def _serve_until_signalled(service: AgentService) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    model = service.agent.model
    where = f" on http://{service.http.url}" if service.http else ""
    logging.getLogger("edgefleet").info("serving %s %s%s", model.name if model else "-",
                                        model.version if model else "-", where)
    stop.wait()
    service.stop()
