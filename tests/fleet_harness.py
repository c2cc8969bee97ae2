"""A fleet on one machine for the tests: a controller with its API, and real agents.

Agents are the real ``AgentService`` (real runtimes, real update flow) on a private
Mosquitto; a traffic thread keeps each of them serving digits so telemetry and the
probation agreement are measured, not made up.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core import Agent
from agent.service import AgentService, ServiceConfig
from agent.update import local
from fleet.api import ApiServer
from fleet.client import FleetClient
from fleet.controller import ControllerConfig, FleetController
from fleet.mosquitto import free_port
from fleet.store import Store, open_store
from tests.conftest import Keys
from tests.models import load_digits

TOKEN = "ops-secret-token"


@dataclass
class Fleet:
    name: str
    broker_url: str
    root: Path
    keys: Keys
    store_url: str = ""
    controller: FleetController | None = None
    api: ApiServer | None = None
    store: Store | None = None
    agents: dict[str, AgentService] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _traffic: list[threading.Thread] = field(default_factory=list)

    def start_controller(self, tick_s: float = 0.2) -> FleetClient:
        self.store = open_store(self.store_url or f"sqlite:///{self.root / 'fleet.db'}")
        port = free_port()
        config = ControllerConfig(fleet=self.name, broker_url=self.broker_url,
                                  data_dir=self.root / "controller",
                                  public_url=f"http://127.0.0.1:{port}",
                                  trusted=self.keys.trusted, tick_s=tick_s,
                                  quality_window_ms=60_000)
        self.controller = FleetController(config, self.store)
        self.api = ApiServer(self.controller, {TOKEN: "alice"}, port=port)
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

    def client(self, token: str = TOKEN) -> FleetClient:
        assert self.api is not None
        return FleetClient(self.api.url, token)

    def add_agent(self, device: str, bundle: Path, profile: str = "generic-x86_64",
                  traffic: bool = True) -> AgentService:
        agent = Agent(self.keys.trusted)
        data = self.root / "devices" / device
        local.install(agent, data, bundle)
        config = ServiceConfig(fleet=self.name, device_id=device, data_dir=data,
                               broker_url=self.broker_url, telemetry_interval_s=0.3,
                               profile=profile, probation_s=600)
        service = AgentService(config, agent)
        service.start()
        assert service.mqtt is not None and service.mqtt.wait_subscribed(10)
        self.agents[device] = service
        if traffic:
            thread = threading.Thread(target=self._serve, args=(agent,), daemon=True)
            thread.start()
            self._traffic.append(thread)
        return service

    def _serve(self, agent: Agent) -> None:
        x = load_digits().x_test
        i = 0
        while not self._stop.wait(0.004):
            # a request during a swap may fail; the error-rate gate counts it
            with contextlib.suppress(Exception):
                agent.predict(x[i % len(x)][None])
            i += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._traffic:
            thread.join(timeout=5)
        for service in self.agents.values():
            service.stop()
        self.stop_controller()


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.1,
               what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
