"""A fleet on one machine for the tests: ``edgefleet.local_fleet`` with the test keys, the
held-out digits as traffic, and a token named "alice"."""

from __future__ import annotations

from pathlib import Path

from edgefleet.local_fleet import LocalFleet, wait_until
from fleet.api import ApiServer
from fleet.client import FleetClient
from fleet.controller import ControllerConfig, FleetController
from fleet.mosquitto import free_port
from fleet.store import open_store
from tests.conftest import Keys
from tests.models import load_digits

__all__ = ["TOKEN", "Fleet", "wait_until"]

TOKEN = "ops-secret-token"


class Fleet(LocalFleet):
    def __init__(self, name: str, broker_url: str, root: Path, keys: Keys,
                 http_host: str = "127.0.0.1") -> None:
        super().__init__(name, broker_url, root, keys.trusted, load_digits().x_test,
                         token=TOKEN, token_name="alice")
        self.keys = keys
        self.http_host = http_host  # where the API and the bundles are served

    def start_controller(self, tick_s: float = 0.2) -> FleetClient:
        """``LocalFleet``'s, with the HTTP server (API, bundles) on ``http_host``: the
        address devices behind a test network link reach (``tests/netfault.py``)."""
        if self.http_host == "127.0.0.1":
            return super().start_controller(tick_s)
        self.store = open_store(f"sqlite:///{self.root / 'fleet.db'}")
        port = free_port(self.http_host)
        config = ControllerConfig(fleet=self.name, broker_url=self.broker_url,
                                  data_dir=self.root / "controller",
                                  public_url=f"http://{self.http_host}:{port}",
                                  trusted=self.trusted, tick_s=tick_s, quality_window_ms=60_000)
        self.controller = FleetController(config, self.store)
        self.api = ApiServer(self.controller, {self.token: self.token_name},
                             host=self.http_host, port=port)
        self.controller.start()
        self.api.start()
        return self.client()

    def stop_traffic(self) -> None:
        """Stop every agent's sample traffic; the agents keep running and reporting (their
        telemetry windows then count no inference)."""
        self._stop.set()
        for thread in self._traffic:
            thread.join(timeout=5)
