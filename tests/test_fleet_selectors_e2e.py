"""Selectors and windows end to end: a real Mosquitto, a real controller whose clock the
test holds, and simulated devices that report their labels and download over HTTP.

The devices of plant A report ``site=plant-a``; an operator labels one device of plant B
into plant A and saves ``label:site=plant-a & arch=...`` as the dynamic group
``plant-a``. A rollout to ``group:plant-a`` with a night window, created at Monday noon
by the test's clock, waits (no device is sent anything however often the controller
ticks); at 22:00 by that clock it runs, and exactly the four selected devices move to
v2 while the fifth stays on v1.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from edgefleet.fleet.store import open_store
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, wait_until
from tests.models import TrainedModels

FAST: dict[str, Any] = dict(telemetry_interval_s=0.3, request_rate=20.0, connect_rate=200.0)
MONDAY_NOON = int(datetime(2026, 12, 7, 12, tzinfo=timezone.utc).timestamp() * 1000)
MONDAY_22 = int(datetime(2026, 12, 7, 22, tzinfo=timezone.utc).timestamp() * 1000)


class Clock:
    """The controller's clock: it moves only when the test says."""

    def __init__(self, now_ms: int) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


class Site:
    """A controller (its clock held by the test), its API, and the CLI pointed at it."""

    def __init__(self, broker: MosquittoBroker, fleet: str, keys: Keys, root: Path) -> None:
        self.clock = Clock(MONDAY_NOON)
        self.store = open_store(f"sqlite:///{root / 'fleet.db'}")
        port = free_port()
        self.controller = FleetController(ControllerConfig(
            fleet=fleet, broker_url=broker.url, data_dir=root / "controller",
            public_url=f"http://127.0.0.1:{port}", trusted=keys.trusted, tick_s=0.1),
            self.store, clock=self.clock)
        self.api = ApiServer(self.controller, {TOKEN: "alice"}, port=port)
        self.client = FleetClient(self.api.url, TOKEN)

    def cli(self, *args: str) -> Any:
        result = CliRunner().invoke(app, ["fleet", *args, "--controller", self.api.url,
                                          "--token", TOKEN, "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    def table(self, *args: str) -> str:
        result = CliRunner().invoke(app, ["fleet", *args, "--controller", self.api.url,
                                          "--token", TOKEN], env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        return result.output


@pytest.fixture
def site(mosquitto: MosquittoBroker, fleet_name: str, signing_keys: Keys,
         tmp_path: Path) -> Iterator[Site]:
    running = Site(mosquitto, fleet_name, signing_keys, tmp_path)
    running.controller.start()
    running.api.start()
    yield running
    running.api.stop()
    running.controller.stop()
    running.store.close()


def _versions(site: Site) -> dict[str, str]:
    return {d["id"]: d["active"]["version"] for d in site.client.get("/api/v1/devices")
            if d["active"] and d["update_state"] in ("COMMITTED", "IDLE")}


def test_a_dynamic_group_by_labels_waits_for_its_window_then_updates_only_its_devices(
        site: Site, mosquitto: MosquittoBroker, fleet_name: str, signing_keys: Keys,
        digits_models: TrainedModels, digits_bundles: dict[str, Path], tmp_path: Path) -> None:
    v1 = digits_bundles["tflite"]
    v2 = make_bundle(digits_models.tflite, tmp_path / "v2.efb", signing_keys, "2.0.0", rows=32)
    plant_a = SimulatedFleet(mosquitto.url, fleet_name, 3, signing_keys.trusted, SimOptions(
        device_prefix="a-", labels={"site": "plant-a"}, **FAST), v1)
    plant_b = SimulatedFleet(mosquitto.url, fleet_name, 2, signing_keys.trusted, SimOptions(
        device_prefix="b-", labels={"site": "plant-b"}, seed=1, **FAST), v1)
    with plant_a, plant_b:
        wait_until(lambda: len(_versions(site)) == 5, 30, what="five devices on v1")
        b1, b2 = sorted(d for d in _versions(site) if d.startswith("b-"))
        relabelled = site.cli("devices", "label", b1, "site=plant-a")
        assert relabelled["labels"] == {"site": "plant-a"}
        assert relabelled["reported_labels"] == {"site": "plant-b"}
        group = site.cli("groups", "create", "plant-a", "--where",
                         f"label:site=plant-a & arch={platform.machine()}")
        assert group["devices"] == 4 and b1 in group["members"] and b2 not in group["members"]

        site.client.upload("/api/v1/models", v2.read_bytes())
        rollout = site.cli("rollout", "create", "--model", "digits:2.0.0",
                           "--to", "group:plant-a", "--window", "Mon-Fri 22:00-04:00 UTC",
                           "--device-timeout", "10m")
        assert rollout["state"] == "WAITING" and rollout["total"] == 4
        assert rollout["waiting_until_ms"] == MONDAY_22
        assert rollout["spec"]["selectors"] == [
            f"label:site=plant-a & arch={platform.machine()}"]  # taken when it was created
        for _ in range(5):  # however often it ticks, the clock says noon: nothing is sent
            site.controller.step()
        waiting = site.client.get(f"/api/v1/rollouts/{rollout['id']}")
        assert waiting["state"] == "WAITING" and waiting["counts"] == {"PENDING": 4}
        listed = site.table("rollout", "list")
        assert "WAITING" in listed and "2026-12-07T22:00+00:00" in listed
        site.cli("groups", "delete", "plant-a")  # the rollout keeps what the group meant

        site.clock.now_ms = MONDAY_22
        done = wait_until(lambda: (r := site.client.get(f"/api/v1/rollouts/{rollout['id']}"))
                          ["state"] in ("SUCCEEDED", "ABORTED") and r, 90,
                          what="the rollout to end once its window opened")
        assert done["state"] == "SUCCEEDED", done["reason"]
        wait_until(lambda: sum(v == "2.0.0" for v in _versions(site).values()) == 4, 30,
                   what="the four selected devices committed on v2")
        assert _versions(site)[b2] == "1.0.0"
        assert {d["device"] for d in done["devices"]} == {*plant_a.devices, b1}
