"""An embedded MQTT 3.1.1 broker (amqtt) for one-machine use: demos, laptops, tests.

Mosquitto is the broker for real fleets; this one needs no system package.
It keeps retained messages and sends last wills, but holds sessions in memory
only: a restart forgets persistent sessions and retained messages.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from edgefleet.agent.errors import BrokerError
from edgefleet.agent.ports import BindError, check_free, free_port

try:
    from amqtt.broker import Broker
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the embedded broker needs amqtt ({exc}); run: pip install 'edgefleet[broker]'",
        name=exc.name,
    ) from exc

__all__ = ["EmbeddedBroker", "run_embedded_broker"]

log = logging.getLogger(__name__)
_NOISY_LOGGERS = ("amqtt", "transitions")


def _config(host: str, port: int) -> dict[str, Any]:
    """One TCP listener, anonymous clients, no $SYS topics, no packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


async def _serve(host: str, port: int, stop: asyncio.Event, on_ready: Callable[[], None]) -> None:
    """Listen on host:port, call ``on_ready``, serve until ``stop`` is set."""
    check_free(host, port, "--port PORT")  # amqtt would log a traceback, then fail
    broker = Broker(_config(host, port))
    try:
        await broker.start()
    except Exception as exc:
        raise BrokerError(
            f"the embedded broker cannot listen on {host}:{port}: {exc}",
            hint="is the port in use? pick another one with --port",
            transient=False,
        ) from exc
    on_ready()
    try:
        await stop.wait()
    finally:
        await broker.shutdown()


def _quiet() -> None:
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def run_embedded_broker(host: str = "127.0.0.1", port: int = 1883,
                        announce: Callable[[str], None] = lambda line: print(line, flush=True)
                        ) -> None:
    """Serve in the foreground until SIGINT or SIGTERM; ``announce`` the address once
    listening (port 0: a free port, the one announced)."""
    _quiet()
    port = port or free_port(host, "--port PORT")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await _serve(host, port, stop, lambda: announce(
            f"edgefleet broker (amqtt, MQTT 3.1.1) listening on {host}:{port}"))

    asyncio.run(main())


class EmbeddedBroker:
    """The embedded broker on its own thread and event loop, as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host, self.port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start listening (port 0: on a free port, then in ``port``); return once the port
        accepts connections."""
        _quiet()
        self.port = self.port or free_port(self.host, "port")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="edgefleet-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            if isinstance(self._error, (BrokerError, BindError)):
                raise self._error
            raise BrokerError(
                f"the embedded broker did not start on {self.host}:{self.port}",
                hint="is the port in use? pick another one",
                transient=False,
            )
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._thread, self._loop, self._stop = None, None, None

    def _run(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await _serve(self.host, self.port, self._stop, self._ready.set)

        try:
            asyncio.run(main())
        except Exception as exc:  # reported by start(); the thread ends here
            self._error = exc
            self._ready.set()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
