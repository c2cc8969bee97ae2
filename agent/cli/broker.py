"""``edgefleet broker``: an embedded MQTT 3.1.1 broker for one-machine use."""

from __future__ import annotations

from typing import Annotated

import typer


def broker(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 1883,
) -> None:
    """Run an embedded broker (amqtt) until Ctrl-C; use Mosquitto for real fleets."""
    try:
        from agent.broker import run_embedded_broker
    except ImportError as exc:
        typer.echo(f"error: the embedded broker is not installed ({exc.name})", err=True)
        typer.echo("fix: pip install 'edgefleet[broker]'", err=True)
        raise typer.Exit(2) from exc
    run_embedded_broker(host, port)
