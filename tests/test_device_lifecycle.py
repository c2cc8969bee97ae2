"""A device's end in the fleet, on a real Mosquitto: decommissioning (``fleet devices
remove``) takes it out of the registry, every group and the store and clears its retained
topics on the broker; a device that comes back registers as new; stale devices are listed
(``fleet devices --stale 7d``) and removed in bulk after a confirmation.

What the broker still holds for a device is read by a fresh subscriber: retained
messages reach it before a probe it publishes after its subscription, so when the probe
arrives, every retained message has."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefleet.agent.errors import BrokerError
from edgefleet.agent.mqtt import MqttClient, MqttSecurity
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.cli import app
from edgefleet.fleet.access import Actor, Token, TokenRole
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.control.lifecycle import revoke_command
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.domain import Device
from edgefleet.fleet.errors import (
    ConflictError,
    ForbiddenError,
    InvalidRolloutError,
    NotFoundError,
)
from edgefleet.fleet.mosquitto import MosquittoBroker
from edgefleet.fleet.registry import SEEN_WRITE_MS
from edgefleet.fleet.store import Store, open_store
from tests.conftest import Keys
from tests.fleet_harness import Fleet, wait_until
from tests.test_fleet_store import _rollout

DAY_MS = 86_400_000
ADMIN, VIEWER = "admin-secret-00001", "viewer-secret-0001"
ADA = Actor("ada", TokenRole.ADMIN)


def retained(url: str, fleet: str, device: str) -> dict[str, bytes]:
    """What the broker keeps on ``device``'s topics, by leaf."""
    probe, got, seen = f"probe/{uuid.uuid4().hex}", {}, threading.Event()

    def take(topic: str, payload: bytes) -> None:
        if topic == probe:
            seen.set()
        else:
            got[topic.split(f"/{device}/", 1)[1]] = payload

    client = MqttClient.from_url(f"reader-{uuid.uuid4().hex[:8]}", url)
    client.subscribe(f"edgefleet/v1/{fleet}/{device}/#", take)
    client.subscribe(probe, take)
    client.start()
    try:
        assert client.wait_connected(10) and client.wait_subscribed(10)
        client.publish_wait(probe, b"probe", qos=1)
        assert seen.wait(10), "the probe never came back"
        return got
    finally:
        client.stop()


def _history(client: FleetClient, action: str) -> list[dict[str, Any]]:
    return [e for e in client.get("/api/v1/history?limit=1000") if e["action"] == action]


# --- with real agents -------------------------------------------------------------------

def test_a_removed_device_leaves_registry_groups_store_and_broker_and_comes_back_as_new(
        fleet: Fleet, mosquitto: MosquittoBroker, digits_bundles: dict[str, Path]) -> None:
    client = fleet.start_controller()
    bundle = digits_bundles["tflite"]
    for device in ("cam-0", "cam-1"):
        fleet.add_agent(device, bundle, traffic=False)
    wait_until(lambda: {d["id"] for d in client.get("/api/v1/devices")
                        if d["online"] and d["active"]} == {"cam-0", "cam-1"}, 30,
               what="both devices registered")
    client.post("/api/v1/devices/group", {"devices": ["cam-0", "cam-1"], "group": "north"})
    client.post("/api/v1/devices/cam-0/tags", {"add": ["lobby"]})
    assert {"status", "state/reported"} <= set(retained(mosquitto.url, fleet.name, "cam-0"))
    gone = fleet.agents.pop("cam-0")
    gone.stop()
    gone.agent.close()

    result = client.delete("/api/v1/devices/cam-0")
    assert result == {"removed": ["cam-0"], "skipped": {}, "revoke": None}
    assert [(d["id"], d["group"]) for d in client.get("/api/v1/devices")] == [("cam-1", "north")]
    assert fleet.store is not None and fleet.store.device("cam-0") is None
    assert retained(mosquitto.url, fleet.name, "cam-0") == {}
    assert {"status", "state/reported"} <= set(retained(mosquitto.url, fleet.name, "cam-1"))
    [entry] = _history(client, "device.remove")
    assert (entry["actor"], entry["target"], entry["detail"]["role"]) == ("alice", "cam-0",
                                                                          "admin")

    fleet.add_agent("cam-0", bundle, traffic=False)  # the same device, back on the broker
    back = wait_until(lambda: [d for d in client.get("/api/v1/devices")
                               if d["id"] == "cam-0" and d["online"] and d["active"]], 30,
                      what="cam-0 registered again")
    assert back[0]["group"] is None and back[0]["tags"] == []  # a new device


# --- stale devices, with the controller's clock in the test's hand --------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000_000

    def __call__(self) -> int:
        return self.now


@dataclass
class Desk:
    """A controller on a real broker with a clock the test moves, its API, and a client
    that publishes the devices' statuses (as their agents and last wills would)."""

    clock: Clock
    controller: FleetController
    store: Store
    api: ApiServer
    devices: MqttClient
    broker: MosquittoBroker
    fleet: str

    def status(self, device: str, status: str) -> None:
        self.devices.publish_wait(device_topic(self.fleet, device, Leaf.STATUS),
                                  status.encode(), qos=1, retain=True)
        wait_until(lambda: (d := self.controller.registry.get(device)) is not None
                   and d.online == (status == "online"), 10, what=f"{device} {status}")

    def cli(self, *args: str, token: str = ADMIN, input: str | None = None) -> Any:
        return CliRunner().invoke(app, ["fleet", "devices", *args, "--controller",
                                        self.api.url, "--token", token], input=input)

    def client(self, token: str = ADMIN) -> FleetClient:
        return FleetClient(self.api.url, token)


@pytest.fixture()
def desk(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
         signing_keys: Keys) -> Iterator[Desk]:
    clock, store = Clock(), open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    config = ControllerConfig(fleet=fleet_name, broker_url=mosquitto.url,
                              data_dir=tmp_path / "controller", public_url="http://127.0.0.1:9",
                              trusted=signing_keys.trusted, tick_s=0.2)
    controller = FleetController(config, store, clock=clock).start()
    api = ApiServer(controller, {ADMIN: Token("ada", TokenRole.ADMIN),
                                 VIEWER: Token("vic", TokenRole.VIEWER)}).start()
    devices = MqttClient.from_url("the-devices", mosquitto.url)
    devices.start()
    assert devices.wait_connected(10)
    yield Desk(clock, controller, store, api, devices, mosquitto, fleet_name)
    devices.stop()
    api.stop()
    controller.stop()
    store.close()


def _kick(url: str, client_id: str) -> None:
    """Connect once with ``client_id``: the broker drops the session of that id, whose
    client then reconnects (and the broker replays the retained messages it matches)."""
    from paho.mqtt import client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.agent.mqtt import parse_broker_url

    host, port = parse_broker_url(url)
    kicker = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=paho.MQTTv311)
    kicker.connect(host, port, keepalive=10)
    kicker.loop(timeout=1.0)
    kicker.disconnect()


def test_a_retained_status_replayed_on_a_reconnection_is_no_word_from_the_device(
        desk: Desk) -> None:
    """The broker replays a device's retained ``offline`` each time the controller
    (re)subscribes: it must not count as hearing from the device, or --stale never grows."""
    desk.status("gone-1", "offline")  # its last word, as it went away
    gone = desk.controller.registry.get("gone-1")
    assert gone is not None
    desk.clock.now += 8 * DAY_MS
    connects = threading.Semaphore(0)
    assert desk.controller.mqtt is not None
    desk.controller.mqtt.on_connect(connects.release)
    _kick(desk.broker.url, desk.controller.role.client_id(desk.fleet))
    assert connects.acquire(timeout=15), "the controller reconnected"
    assert desk.controller.mqtt.wait_subscribed(10)
    desk.status("probe-1", "online")  # taken in after the replay of gone-1's retained word
    again = desk.controller.registry.get("gone-1")
    assert again is not None and again.last_seen_ms == gone.last_seen_ms
    assert [d.id for d in desk.controller.registry.stale(7 * DAY_MS, desk.clock.now)] == [
        "gone-1"]


def test_an_empty_age_or_device_list_is_refused_and_a_viewer_is_refused_before_the_list(
        desk: Desk) -> None:
    desk.status("old-1", "offline")
    desk.clock.now += 8 * DAY_MS
    conn = HTTPConnection("127.0.0.1", desk.api.port, timeout=10)
    conn.request("GET", "/api/v1/devices?stale_s=", headers={"Authorization": f"Bearer {VIEWER}"})
    response = conn.getresponse()
    assert response.status == 400 and b"stale_s" in response.read()
    conn.close()
    with pytest.raises(InvalidRolloutError, match="at least one device"):
        desk.client().post("/api/v1/devices/remove", {"devices": []})
    asked = desk.cli("remove", "--stale", "7d", token=VIEWER, input="y\n")
    assert asked.exit_code == 2 and "needs the admin role" in asked.output
    assert "old-1" not in asked.output and "Remove these" not in asked.output  # no list
    assert desk.controller.registry.get("old-1") is not None


def test_stale_devices_are_listed_and_removed_in_bulk_after_a_confirmation(desk: Desk) -> None:
    for device, status in (("old-1", "offline"), ("old-2", "offline"), ("live-1", "online")):
        desk.status(device, status)
    desk.clock.now += 8 * DAY_MS
    desk.status("recent-1", "offline")  # went away just now

    listed = desk.cli("--stale", "7d", "--json", token=VIEWER)
    assert listed.exit_code == 0, listed.output
    assert [d["id"] for d in json.loads(listed.stdout)] == ["old-1", "old-2"]
    shown = desk.cli("--stale", "7d")
    assert "2 devices offline and not heard from for 7d" in shown.stdout
    assert desk.cli("--stale", "7x").exit_code == 2

    declined = desk.cli("remove", "--stale", "7d", input="n\n")
    assert declined.exit_code == 1 and "nothing removed" in declined.stdout
    machine = desk.cli("remove", "--stale", "7d", "--json")
    assert machine.exit_code == 2 and "--yes" in json.loads(machine.stdout)["hint"]
    who = CliRunner().invoke(app, ["fleet", "whoami", "--controller", desk.api.url,
                                   "--token", VIEWER, "--json"])
    assert json.loads(who.stdout) == {"name": "vic", "role": "viewer"}
    viewer = desk.cli("remove", "old-1", token=VIEWER)
    assert viewer.exit_code == 2 and "needs the admin role" in viewer.output
    assert desk.controller.registry.get("old-1") is not None, "a refusal removed something"
    kept = desk.client().post("/api/v1/devices/remove", {"devices": ["recent-1"],
                                                         "stale_s": 7 * 86_400})
    assert kept["removed"] == [] and "not stale" in kept["skipped"]["recent-1"]

    confirmed = desk.cli("remove", "--stale", "7d", input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert "2 devices removed" in confirmed.stdout
    assert [d.id for d in desk.controller.devices()] == ["live-1", "recent-1"]
    assert [d.id for d in desk.store.devices()] == ["live-1", "recent-1"]
    assert retained(desk.broker.url, desk.fleet, "old-1") == {}
    assert set(retained(desk.broker.url, desk.fleet, "live-1")) == {"status"}
    again = desk.cli("remove", "--stale", "7d", "--yes", "--json")
    assert json.loads(again.stdout)["removed"] == []
    removals = _history(desk.client(), "device.remove")
    assert sorted((e["target"], e["actor"], e["detail"]["role"]) for e in removals) == [
        ("old-1", "ada", "admin"), ("old-2", "ada", "admin")]
    history = CliRunner().invoke(app, ["fleet", "history", "--controller", desk.api.url,
                                       "--token", ADMIN])
    assert "ada (admin)" in history.stdout


def test_removing_names_unknown_ids_and_refuses_a_device_a_running_rollout_holds(
        desk: Desk) -> None:
    desk.status("cam-0", "offline")
    client = desk.client()
    with pytest.raises(NotFoundError, match="no device 'ghost'"):
        client.post("/api/v1/devices/remove", {"devices": ["cam-0", "ghost"]})
    desk.store.save_rollout(_rollout("r7", devices=1))  # RUNNING, holding cam-0
    with pytest.raises(ConflictError, match=r"rollout r7 \(RUNNING\) holds 'cam-0'") as caught:
        client.delete("/api/v1/devices/cam-0")
    assert "rollout abort r7" in caught.value.hint
    with pytest.raises(ForbiddenError) as refused:
        desk.client(VIEWER).delete("/api/v1/devices/cam-0")
    assert refused.value.role == "admin"
    assert desk.controller.registry.get("cam-0") is not None
    assert set(retained(desk.broker.url, desk.fleet, "cam-0")) == {"status"}


def test_a_cleared_status_seen_from_another_controller_forgets_the_device(desk: Desk) -> None:
    desk.status("cam-3", "online")
    desk.devices.publish_wait(device_topic(desk.fleet, "cam-3", Leaf.STATUS), b"", qos=1,
                              retain=True)
    wait_until(lambda: desk.controller.registry.get("cam-3") is None, 10, what="forgotten")
    desk.controller.step()  # the leader's flush deletes the row
    assert desk.store.device("cam-3") is None
    assert desk.controller.rejected == 0  # an empty status is a clearance, not an error


# --- without a broker ---------------------------------------------------------------------

def test_a_controller_away_from_its_broker_removes_nothing(tmp_path: Path,
                                                            signing_keys: Keys) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    store.upsert_devices([Device("cam-0", "f")])
    config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:9",
                              data_dir=tmp_path / "controller", public_url="http://x",
                              trusted=signing_keys.trusted)
    controller = FleetController(config, store)  # never started: no broker connection
    with pytest.raises(BrokerError, match="0 of 1 devices were removed before") as caught:
        controller.remove_devices(["cam-0"], ADA)
    assert caught.value.transient
    assert store.device("cam-0") is not None and controller.registry.get("cam-0") is not None
    store.close()


def test_secure_mode_answers_the_command_that_revokes_the_certificates() -> None:
    security = MqttSecurity(ca_file=Path("/etc/edgefleet/certs/ca.crt"),
                            cert_file=Path("c.crt"), key_file=Path("c.key"))
    revoke = revoke_command(["cam-1", "cam 2"], security)
    assert revoke is not None
    assert revoke["command"] == ("edgefleet certs revoke --dir /etc/edgefleet/certs "
                                 "/etc/edgefleet/certs/devices/cam-1.crt "
                                 "'/etc/edgefleet/certs/devices/cam 2.crt'")
    assert "systemctl reload mosquitto" in revoke["then"]
    assert revoke_command(["cam-1"], None) is None
    assert revoke_command(["cam-1"], MqttSecurity(username="u", password="p")) is None
    assert revoke_command([], security) is None


def test_the_registry_calls_stale_only_offline_devices_silent_for_the_whole_age() -> None:
    from edgefleet.fleet.registry import DeviceRegistry

    registry = DeviceRegistry("f")
    registry.status("gone", "offline", 1_000)
    registry.status("up", "online", 1_000)
    registry.status("chatty", "offline", 1_000)
    registry.seen("chatty", 5_000)  # its telemetry came later
    assert [d.id for d in registry.stale(4_000, 5_000)] == ["gone"]
    assert [d.id for d in registry.stale(4_001, 5_000)] == []


def test_the_time_telemetry_was_last_seen_reaches_the_store(tmp_path: Path,
                                                            signing_keys: Keys) -> None:
    """A device that drops while no controller runs: its stored time last seen is its
    telemetry's, not its connection's (the retained ``offline`` keeps the stored time),
    so an upgrade of the controller does not make healthy devices look stale."""
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:9",
                              data_dir=tmp_path / "controller", public_url="http://x",
                              trusted=signing_keys.trusted)
    controller = FleetController(config, store)  # never started: fed by hand
    registry = controller.registry
    registry.status("cam-0", "online", 1_000)
    controller.device_book.flush()
    registry.seen("cam-0", 2_000)  # telemetry: kept aside, no write each time
    assert registry.take_dirty() == []
    registry.seen("cam-0", 1_000 + SEEN_WRITE_MS)  # the stored time is that old: written
    controller.device_book.flush()
    stored = store.device("cam-0")
    assert stored is not None and stored.last_seen_ms == 1_000 + SEEN_WRITE_MS
    registry.seen("cam-0", 5_000 + SEEN_WRITE_MS)
    controller.stop()  # folds the times kept aside into the rows
    stored = store.device("cam-0")
    assert stored is not None and stored.last_seen_ms == 5_000 + SEEN_WRITE_MS
    store.close()
