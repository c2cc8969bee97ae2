"""A tree of brokers (``fleet.mosquitto.bridge_lines``, docs/scale-out.md): devices on a leaf
Mosquitto, the controller's side on the root, one bridge between them. What the fleet relies
on must cross it: device topics up, desired states down, retained flags, wills, clears."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter, keyring_topic
from edgefleet.fleet.control.lifecycle import clear_topics
from edgefleet.fleet.mosquitto import MosquittoBroker, bridge_lines
from edgefleet.local_fleet import wait_until
from tests.brokers import Message, Subscriber

BRIDGE_UP = "$SYS/broker/connection/+/state"  # the bridge's notification: b"1" = up


@dataclass
class Tree:
    root: MosquittoBroker
    leaf: MosquittoBroker
    fleet: str


@pytest.fixture()
def tree(tmp_path: Path, fleet_name: str) -> Iterator[Tree]:
    """A root and one leaf bridged to it; returns once the bridge is connected."""
    root = MosquittoBroker(workdir=tmp_path / "root").start()
    leaf = MosquittoBroker(workdir=tmp_path / "leaf",
                           extra_config=bridge_lines("leaf-1", (root.host, root.port),
                                                     fleet_name)).start()
    watch = Subscriber(root.url, [BRIDGE_UP])
    try:
        assert watch.wait_for(lambda ms: any(m.payload == b"1" for m in ms))
        yield Tree(root, leaf, fleet_name)
    finally:
        watch.close()
        leaf.stop()
        root.stop()


def device_with_will(port: int, fleet: str, device: str) -> paho.Client:
    """A device-like client: retained ``offline`` will on its status topic, connected."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dev-{device}",
                         protocol=paho.MQTTv311)
    client.will_set(device_topic(fleet, device, Leaf.STATUS), b"offline", 1, retain=True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def payloads(messages: list[Message], topic: str) -> list[tuple[bytes, bool]]:
    return [(m.payload, m.retain) for m in messages if m.topic == topic]


def test_device_topics_reach_the_root_and_a_will_stays_retained_there(tree: Tree) -> None:
    status = device_topic(tree.fleet, "d1", Leaf.STATUS)
    telemetry = device_topic(tree.fleet, "d1", Leaf.TELEMETRY)
    controller = Subscriber(tree.root.url, [fleet_filter(tree.fleet)])
    device = device_with_will(tree.leaf.port, tree.fleet, "d1")
    try:
        device.publish(status, b"online", 1, retain=True).wait_for_publish(5)
        device.publish(telemetry, b"{}", 1).wait_for_publish(5)
        assert controller.wait_for(lambda ms: bool(payloads(ms, telemetry)))
        sock = device.socket()
        assert sock is not None
        sock.close()  # no DISCONNECT: the leaf publishes the will
        assert controller.wait_for(lambda ms: (b"offline", False) in payloads(ms, status))
    finally:
        device.loop_stop()
        controller.close()
    late = Subscriber(tree.root.url, [status])  # a controller that starts now
    try:
        assert late.wait_for(lambda ms: payloads(ms, status) == [(b"offline", True)])
    finally:
        late.close()


def retained(url: str, topics: list[str], ready: str) -> list[Message]:
    """What a client subscribing now gets, once the retained ``ready`` topic came."""
    late = Subscriber(url, topics)
    try:
        assert late.wait_for(lambda ms: any(m.topic == ready for m in ms))
        return list(late.messages)
    finally:
        late.close()


def test_desired_states_and_the_keyring_come_down_retained_and_their_clears_too(
        tree: Tree) -> None:
    desired = device_topic(tree.fleet, "d1", Leaf.DESIRED)
    keyring = keyring_topic(tree.fleet)
    controller = Subscriber(tree.root.url, [])
    device = Subscriber(tree.leaf.url, [desired, keyring])
    try:
        controller.publish(desired, b"v2", retain=True)
        controller.publish(keyring, b"keys", retain=True)
        assert device.wait_for(lambda ms: bool(payloads(ms, desired) and payloads(ms, keyring)))
        before = retained(tree.leaf.url, [desired, keyring], keyring)
        controller.publish(desired, b"", retain=True)  # a decommission clears it
        assert device.wait_for(lambda ms: (b"", False) in payloads(ms, desired))
    finally:
        device.close()
        controller.close()
    assert payloads(before, desired) == [(b"v2", True)]
    assert payloads(retained(tree.leaf.url, [desired, keyring], keyring), desired) == []


def test_another_fleet_and_other_topics_stay_on_the_leaf(tree: Tree) -> None:
    other = device_topic(tree.fleet + "x", "d1", Leaf.TELEMETRY)
    ours = device_topic(tree.fleet, "d1", Leaf.TELEMETRY)
    root = Subscriber(tree.root.url, ["edgefleet/#", "elsewhere/#"])
    device = Subscriber(tree.leaf.url, [])
    try:
        for topic in (other, "elsewhere/x", ours):  # in order: ours last
            device.publish(topic, b"{}")
        assert root.wait_for(lambda ms: bool(payloads(ms, ours)))
        assert [m.topic for m in root.messages] == [ours]
    finally:
        device.close()
        root.close()


def test_a_decommission_clears_the_leafs_copies_so_a_leaf_restart_brings_nothing_back(
        tree: Tree) -> None:
    status, reported = (device_topic(tree.fleet, "d1", leaf)
                        for leaf in (Leaf.STATUS, Leaf.REPORTED))
    kept, later = (device_topic(tree.fleet, d, Leaf.STATUS) for d in ("d2", "d3"))
    device = Subscriber(tree.leaf.url, [])
    controller = Subscriber(tree.root.url, [status, reported, kept])
    try:
        for topic, payload in ((status, b"online"), (reported, b"{}"), (kept, b"online")):
            device.publish(topic, payload, retain=True)
        assert controller.wait_for(lambda ms: bool(payloads(ms, kept)))
        for topic in clear_topics(tree.fleet, "d1"):  # what a removal publishes, in order
            controller.publish(topic, b"", retain=True)
    finally:
        device.close()
        controller.close()
    topics = [status, reported, kept]

    def retained_on(broker: MosquittoBroker) -> list[tuple[str, bytes]]:
        return [(m.topic, m.payload) for m in retained(broker.url, topics, kept)]

    wait_until(lambda: retained_on(tree.leaf) == [(kept, b"online")], 10, 0.2,
               "the leaf's copies of d1 cleared")
    tree.leaf.restart()  # its bridge connects again and sends up what the leaf retains
    bridge = Subscriber(tree.root.url, [BRIDGE_UP, later])
    device = Subscriber(tree.leaf.url, [])
    try:
        assert bridge.wait_for(lambda ms: [m.payload for m in ms][-1:] == [b"1"])
        device.publish(later, b"online")  # on the same connection after what it sent first
        assert bridge.wait_for(lambda ms: bool(payloads(ms, later)))
    finally:
        device.close()
        bridge.close()
    assert retained_on(tree.root) == [(kept, b"online")]
