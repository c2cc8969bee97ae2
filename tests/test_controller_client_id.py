"""Two controllers of one fleet started alone (no ``--lease-s``) on one real Mosquitto each
keep their connection: the MQTT client id of a controller alone is unique per controller
(its id, the host name by default, then its process and a random part), so the broker
never disconnects one for the other (it drops the older of two equal ids)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.mosquitto import MosquittoBroker
from edgefleet.fleet.store import open_store
from edgefleet.local_fleet import wait_until
from tests.brokers import Subscriber
from tests.conftest import Keys


def _controller(tmp_path: Path, name: str, broker: MosquittoBroker, fleet: str, keys: Keys,
                controller_id: str = "") -> FleetController:
    config = ControllerConfig(fleet=fleet, broker_url=broker.url,
                              data_dir=tmp_path / name, public_url="http://127.0.0.1:1",
                              trusted=keys.trusted, tick_s=0.2, controller_id=controller_id)
    return FleetController(config, open_store(f"sqlite:///{tmp_path / name}.db"))


@pytest.fixture
def two(tmp_path: Path, mosquitto: MosquittoBroker, fleet_name: str,
        signing_keys: Keys) -> Iterator[list[FleetController]]:
    # the id 'fleet serve' gives each by default: the host's name, the same for both
    controllers = [_controller(tmp_path, name, mosquitto, fleet_name, signing_keys,
                               socket.gethostname()) for name in ("a", "b")]
    yield controllers
    for controller in controllers:
        controller.stop()
        controller.store.close()


def _connections(controller: FleetController) -> list[float]:
    """A list that grows by one at each (re)connection of the controller from now on."""
    assert controller.mqtt is not None
    seen: list[float] = []
    controller.mqtt.on_connect(lambda: seen.append(time.monotonic()))
    return seen


def test_two_controllers_alone_on_one_broker_keep_their_connections(
        two: list[FleetController], mosquitto: MosquittoBroker, fleet_name: str) -> None:
    a, b = two
    assert a.role.client_id(fleet_name) != b.role.client_id(fleet_name)
    assert a.role.client_id(fleet_name) == a.role.client_id(fleet_name), "stable"
    for controller in two:
        controller.start()
    wait_until(lambda: all(c.mqtt is not None and c.mqtt.connected for c in two), 15,
               what="both controllers connected")
    reconnections = [_connections(controller) for controller in two]
    dropped = []
    deadline = time.monotonic() + 4  # the client retries after 0.2 s: a loop shows at once
    while time.monotonic() < deadline:
        dropped += [c.role.client_id(fleet_name) for c in two
                    if c.mqtt is None or not c.mqtt.connected]
        time.sleep(0.02)
    assert reconnections == [[], []] and not dropped, dropped
    device = Subscriber(mosquitto.url, [])
    try:
        device.publish(f"edgefleet/v1/{fleet_name}/cam-0/status", b"online")
    finally:
        device.close()
    wait_until(lambda: all(c.registry.get("cam-0") is not None for c in two), 10,
               what="both controllers heard the device")


def test_the_client_id_names_the_controller_and_its_process(
        tmp_path: Path, mosquitto: MosquittoBroker, fleet_name: str, signing_keys: Keys) -> None:
    named = _controller(tmp_path, "n", mosquitto, fleet_name, signing_keys, "north 1")
    try:
        client_id = named.role.client_id(fleet_name)
    finally:
        named.store.close()
    assert re.fullmatch(rf"edgefleet-controller-{fleet_name}-north-1-\d+-[0-9a-f]{{6}}",
                        client_id), client_id
