"""A whole fleet on one machine: a broker, a controller with its API, and real agents.

Used by ``edgefleet demo`` and by the tests. Agents are the real
:class:`edgefleet.agent.service.AgentService` (real runtimes, real update flow, real telemetry);
each gets a traffic thread that keeps it serving sample inputs, so latency, error rate
and the probation agreement the controller gates on are measured, not made up.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import local
from edgefleet.fleet.access import Token, TokenRole
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.mosquitto import free_port
from edgefleet.fleet.store import Store, open_store

__all__ = ["LocalFleet", "wait_until"]


@dataclass
class LocalFleet:
    """A controller (``start_controller``) and agents (``add_agent``) on one broker."""

    name: str
    broker_url: str
    root: Path
    trusted: TrustedKeys
    inputs: np.ndarray[Any, Any]  # what the traffic threads send, one row a request
    token: str = "local-fleet-token"
    token_name: str = "operator"  # the actor the history names
    more_tokens: dict[str, Token] = field(default_factory=dict)  # {secret: token}, besides
    store_url: str = ""
    http_host: str = "127.0.0.1"  # where the API and the bundles are served
    telemetry_interval_s: float = 0.3
    controller: FleetController | None = None
    api: ApiServer | None = None
    store: Store | None = None
    agents: dict[str, AgentService] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _traffic: list[threading.Thread] = field(default_factory=list)

    def start_controller(self, tick_s: float = 0.2) -> FleetClient:
        self.store = open_store(self.store_url or f"sqlite:///{self.root / 'fleet.db'}")
        port = free_port(self.http_host)
        config = ControllerConfig(fleet=self.name, broker_url=self.broker_url,
                                  data_dir=self.root / "controller",
                                  public_url=f"http://{self.http_host}:{port}",
                                  trusted=self.trusted, tick_s=tick_s, quality_window_ms=60_000)
        self.controller = FleetController(config, self.store)
        tokens = {self.token: Token(self.token_name, TokenRole.ADMIN), **self.more_tokens}
        self.api = ApiServer(self.controller, tokens, host=self.http_host, port=port)
        self.controller.start()
        self.api.start()
        return self.client()

    def stop_controller(self) -> None:
        if self.api is not None:
            self.api.stop()
        if self.controller is not None:
            self.controller.stop()
        if self.store is not None:
            self.store.close()
        self.api = self.controller = self.store = None

    def client(self, token: str | None = None) -> FleetClient:
        assert self.api is not None, "start_controller() first"
        return FleetClient(self.api.url, token or self.token)

    def add_agent(self, device: str, bundle: Path, profile: str = "generic-x86_64",
                  traffic: bool = True) -> AgentService:
        """Flash ``bundle`` on a new device (the install flow), then run its agent."""
        agent = Agent(self.trusted)
        data = self.root / "devices" / device
        local.install(agent, data, bundle)
        config = ServiceConfig(fleet=self.name, device_id=device, data_dir=data,
                               broker_url=self.broker_url,
                               telemetry_interval_s=self.telemetry_interval_s,
                               profile=profile, probation_s=600)
        service = AgentService(config, agent)
        service.start()
        if service.mqtt is not None:
            service.mqtt.wait_subscribed(10)
        self.agents[device] = service
        if traffic:
            thread = threading.Thread(target=self._serve, args=(agent,), daemon=True,
                                      name=f"traffic-{device}")
            thread.start()
            self._traffic.append(thread)
        return service

    def _serve(self, agent: Agent) -> None:
        i = 0
        while not self._stop.wait(0.004):
            # a request during a swap may fail: the error-rate gate counts it
            with contextlib.suppress(Exception):
                agent.predict(self.inputs[i % len(self.inputs)][None])
            i += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._traffic:
            thread.join(timeout=5)
        for service in self.agents.values():
            service.stop()
            service.models.close()  # the agents are this fleet's: end their threads
        self.stop_controller()


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.1,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy (return it) or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")
