"""The broker crashes (SIGKILL) and comes back: a rollout still ends well, and telemetry
loses nothing but what the spool's bound says it may.

Everything is real: a private Mosquitto with persistence (killed by its PID and started
again on the same port and folder), the controller, and agents serving the digits
models. What arrived is read by a persistent QoS 1 subscriber, so points published
while it was away are queued for it by the broker.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.topics import Leaf, fleet_filter, parse_topic
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import local
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.models import TrainedModels, load_digits

pytestmark = pytest.mark.faults

DEVICES = [f"cam-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broker-fault-bundles")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0")}


def _crash(broker: MosquittoBroker) -> None:
    """SIGKILL by PID: no clean shutdown, only what persistence saved survives."""
    broker.stop(signal.SIGKILL)


def _on_v1(fleet: Fleet, client: FleetClient, bundle: Path) -> None:
    for device in DEVICES:
        fleet.add_agent(device, bundle, traffic=False)

    def registered() -> bool:
        known = {d["id"]: d for d in client.get("/api/v1/devices")}
        return all(known.get(i, {}).get("active") and known[i]["active"]["version"] == "1.0.0"
                   for i in DEVICES)

    wait_until(registered, 30, what="devices registered on 1.0.0")
    client.post("/api/v1/devices/group", {"devices": DEVICES, "group": "cams"})


def test_a_broker_killed_mid_rollout_comes_back_and_the_rollout_succeeds(
        fleet: Fleet, mosquitto: MosquittoBroker, versions: dict[str, Path]) -> None:
    client = fleet.start_controller()
    _on_v1(fleet, client, versions["v1"])
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    rollout = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["1", "100%"],
        "soak_s": 1, "device_timeout_s": 60})
    path = f"/api/v1/rollouts/{rollout['id']}"

    # the canary committed and the second wave was sent its bundle: kill the broker now
    wait_until(lambda: sum(d["state"] != "PENDING" for d in client.get(path)["devices"]) > 1,
               30, every=0.05, what="the second wave to start")
    _crash(mosquitto)
    assert client.get(path)["state"] == "RUNNING"
    time.sleep(2)  # the outage: devices keep updating (HTTP), nothing reaches the broker
    mosquitto.start()

    done = wait_until(lambda: (r := client.get(path))["state"] != "RUNNING" and r, 60,
                      what="the rollout to end after the broker came back")
    assert done["state"] == "SUCCEEDED", done["reason"]
    assert {d["device"]: d["state"] for d in done["devices"]} == dict.fromkeys(DEVICES,
                                                                               "SUCCEEDED")
    journals = {d: fleet.agents[d].updates.journal for d in DEVICES}  # type: ignore[union-attr]
    assert {d: (j.state.value, j.target.version) for d, j in journals.items()} == dict.fromkeys(
        DEVICES, ("COMMITTED", "2.0.0"))
    assert {d: fleet.agents[d].agent.model.version for d in DEVICES  # type: ignore[union-attr]
            } == dict.fromkeys(DEVICES, "2.0.0")
    registry = wait_until(lambda: (r := {d["id"]: d for d in client.get("/api/v1/devices")})
                          and all(r[i]["online"] and r[i]["update_state"] == "COMMITTED"
                                  for i in DEVICES) and r, 30,
                          what="the registry to show every device committed and online")
    assert {i: registry[i]["active"]["version"] for i in DEVICES} == dict.fromkeys(DEVICES,
                                                                                   "2.0.0")


# --- telemetry across a broker crash ----------------------------------------------------

@dataclass
class Producer:
    """A real agent serving the digits with telemetry every 0.2 s and a given spool bound."""

    service: AgentService
    stop: threading.Event = field(default_factory=threading.Event)

    @property
    def produced(self) -> int:
        assert self.service.reporter is not None
        return self.service.reporter.seq

    @property
    def spooled(self) -> int:
        assert self.service.reporter is not None
        return len(self.service.reporter.spool)


def _producer(root: Path, fleet: str, device: str, broker: MosquittoBroker, keys: Keys,
              bundle: Path, spool_max_bytes: int) -> Producer:
    agent = Agent(keys.trusted)
    data = root / device
    local.install(agent, data, bundle)
    config = ServiceConfig(fleet=fleet, device_id=device, data_dir=data,
                           broker_url=broker.url, telemetry_interval_s=0.2,
                           spool_max_bytes=spool_max_bytes)
    producer = Producer(AgentService(config, agent))
    inputs = load_digits().x_test

    def serve() -> None:
        i = 0
        while not producer.stop.wait(0.005):
            agent.predict(inputs[i % len(inputs)][None])
            i += 1

    producer.service.start()
    threading.Thread(target=serve, daemon=True, name=f"traffic-{device}").start()
    return producer


def _points(subscriber: Subscriber) -> dict[str, dict[int, dict[str, Any]]]:
    """Every telemetry point that arrived, per device and ``seq`` (a redelivery counted
    once), with how it came: alone, or replayed from the spool in a batch."""
    points: dict[str, dict[int, dict[str, Any]]] = {}
    for message in subscriber.on(Leaf.TELEMETRY.value):
        device = parse_topic(message.topic).device
        data = json.loads(message.payload)
        batch = isinstance(data, list)
        for point in data if batch else [data]:
            values = dict(point["values"], replayed=batch)
            points.setdefault(device, {}).setdefault(int(values["seq"]), values)
    return points


@pytest.mark.parametrize("spool_max_bytes", [8 * 1024 * 1024, 4096],
                         ids=["within-the-spool", "spool-overflows"])
def test_telemetry_across_a_broker_crash_loses_only_what_the_spool_bound_drops(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path, signing_keys: Keys,
        versions: dict[str, Path], spool_max_bytes: int,
        record_property: Any) -> None:
    devices = ["cam-0", "cam-1"]
    subscriber_id = f"{fleet_name}-telemetry"
    subscriber = Subscriber(mosquitto.url, [fleet_filter(fleet_name, Leaf.TELEMETRY)],
                            client_id=subscriber_id, persistent=True)
    producers = {d: _producer(tmp_path, fleet_name, d, mosquitto, signing_keys,
                              versions["v1"], spool_max_bytes) for d in devices}
    try:
        wait_until(lambda: all(len(_points(subscriber).get(d, {})) >= 3 for d in devices),
                   30, what="telemetry flowing")
        # its session must survive the crash, or the broker has nowhere to queue the replay
        store = mosquitto.workdir / "mosquitto.db"  # type: ignore[operator]
        wait_until(lambda: store.exists() and subscriber_id.encode() in store.read_bytes(),
                   10, what="the broker to persist the subscriber's session")
        _crash(mosquitto)
        at_crash = {d: p.produced for d, p in producers.items()}
        # the outage: 3 s, about 15 points a device, built while the agents keep serving
        wait_until(lambda: all(p.produced >= at_crash[d] + 15 for d, p in producers.items()),
                   30, what="points built during the outage")
        mosquitto.start()

        def caught_up() -> bool:
            points = _points(subscriber)
            return all(p.spooled == 0 and max(points.get(d, {0: {}})) > at_crash[d] + 15
                       and points[d][max(points[d])]["spool_pending"] == 0
                       for d, p in producers.items())

        wait_until(caught_up, 60, what="the spool replayed and live points flowing again")
        points = _points(subscriber)
    finally:
        for producer in producers.values():
            producer.stop.set()
            producer.service.stop()
        subscriber.close()

    for device in devices:
        received = points[device]
        last = max(received)  # points 1..last were built (seq starts at 1 on a new device)
        missing = sorted(set(range(1, last + 1)) - set(received))
        dropped = received[last]["spool_dropped"]  # what the agent says its spool lost
        replayed = sum(1 for p in received.values() if p["replayed"])
        measured = {"produced": last, "arrived": last - len(missing), "lost": len(missing),
                    "replayed_from_spool": replayed, "reported_dropped": dropped}
        record_property(device, measured)
        print(f"{device}, {spool_max_bytes} byte spool: {measured}")
        assert len(missing) == dropped, measured  # every loss is reported, none hidden
        if spool_max_bytes > 1024 * 1024:
            assert missing == [], measured
            assert replayed >= 15, measured  # the whole outage went through the spool
            continue
        assert dropped > 0, measured
        # the oldest points of the outage were dropped, the newest ones kept and replayed
        assert missing == list(range(missing[0], missing[0] + len(missing))), measured
        assert missing[0] - 1 in received, measured
        assert all(seq in received for seq in range(missing[-1] + 1, last + 1)), measured
        assert [s for s in received if s > missing[-1] and received[s]["replayed"]], measured
