"""``edgefleet broker``: an embedded MQTT 3.1.1 broker for one-machine use."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.cli.extras import needs
from edgefleet.cli.logs import LogFormat, LogFormatOpt, fail_in, setup_logging

log = logging.getLogger("edgefleet.agent.broker")


@needs("broker", "broker")
def broker(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 1883,
    log_format: LogFormatOpt = LogFormat.text,
) -> None:
    """Run an embedded broker (amqtt) until Ctrl-C; use Mosquitto for real fleets."""
    from edgefleet.agent.broker import run_embedded_broker

    setup_logging(log_format, logging.INFO, "%(asctime)s %(levelname)s %(name)s: %(message)s")
    announce = log.info if log_format is LogFormat.json else _print
    try:
        run_embedded_broker(host, port, announce)
    except EdgefleetError as exc:
        fail_in(log_format, exc)


def _print(line: str) -> None:
    print(line, flush=True)
