"""The outbox hands MQTT at most ``MAX_UNACKNOWLEDGED`` desired states the broker has not
acknowledged; the rest wait in the outbox, where a newer word for a device replaces the
older one instead of queueing behind it (the 50,000-device stall of BENCHMARKS.md: re-sent
commits piled up in the client's queue ahead of the next wave's installs)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import cast

import pytest

from edgefleet.agent.mqtt import MqttClient
from edgefleet.agent.protocol.topics import Leaf, fleet_filter
from edgefleet.fleet.control import outbox as outbox_module
from edgefleet.fleet.control.catalog import ModelCatalog
from edgefleet.fleet.control.outbox import Outbox
from edgefleet.fleet.control.role import SingleRole
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.local_fleet import wait_until
from tests.brokers import MosquittoBroker, Subscriber

LIMIT = 3


@pytest.fixture()
def client(mosquitto: MosquittoBroker) -> Iterator[MqttClient]:
    mqtt = MqttClient.from_url("outbox-test", mosquitto.url, max_inflight=2)
    mqtt.start()
    assert mqtt.wait_connected(10)
    try:
        yield mqtt
    finally:
        mqtt.stop()


def test_desired_states_wait_in_the_outbox_while_the_broker_has_not_acknowledged_enough(
        mosquitto: MosquittoBroker, client: MqttClient, fleet_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "MAX_UNACKNOWLEDGED", LIMIT)
    # flush reads neither the catalog nor the clock
    box = Outbox(fleet_name, DeviceRegistry(fleet_name), cast(ModelCatalog, None),
                 SingleRole("ctl", lambda: None), clock=lambda: 0)
    box.mqtt = client
    watch = Subscriber(mosquitto.url, [fleet_filter(fleet_name, Leaf.DESIRED)])
    assert mosquitto.pid is not None
    os.kill(mosquitto.pid, signal.SIGSTOP)  # connected, but nothing is acknowledged
    try:
        for i in range(6):
            box.waiting[f"d{i}"] = b"install"
        box.flush()
        assert client.unacknowledged() == LIMIT
        assert list(box) == ["d3", "d4", "d5"]  # oldest first went; the rest wait here
        box.waiting["d5"] = b"commit"  # a newer word replaces the waiting one
        box.waiting["d0"] = b"commit"  # a re-send of one already handed over waits too
        box.flush()
        assert client.unacknowledged() == LIMIT
        assert len(box) == 4
    finally:
        os.kill(mosquitto.pid, signal.SIGCONT)

    def drained() -> bool:
        box.flush()
        return not box and client.unacknowledged() == 0

    wait_until(drained, 20, 0.05, "the outbox drained once the broker acknowledged")
    assert watch.wait_for(lambda ms: len(ms) >= 7)
    got = [(m.topic.split("/")[-3], m.payload) for m in watch.messages]
    watch.close()
    assert sorted(got) == [("d0", b"commit"), ("d0", b"install"), ("d1", b"install"),
                           ("d2", b"install"), ("d3", b"install"), ("d4", b"install"),
                           ("d5", b"commit")]
