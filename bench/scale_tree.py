"""The benchmark's brokers: one Mosquitto, or a tree of them (leaves bridged to a root).

One Mosquitto holds at most as many connections as its open-file limit (20,000 here,
soft and hard, and not raisable without CAP_SYS_RESOURCE). Beyond that, devices connect
to leaf brokers, each bridged to the root (:func:`edgefleet.fleet.mosquitto.bridge_lines`)
that the controller connects to, which changes nothing in the controller or the agents.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.fleet.mosquitto import MosquittoBroker, bridge_lines

UNLIMITED = ["max_connections -1"]
# a tree's brokers save as Mosquitto does by default (the tests' 1 s rewrites a root's
# retained and queued messages, 40 MB at 25,000 devices, every 2 s, blocking its only
# thread 0.5-1.5 s each time); one broker keeps the tests' setting, as measured before
TREE_AUTOSAVE_S = 1800
BRIDGES_UP = "$SYS/broker/connection/+/state"


@dataclass
class Brokers:
    """``root`` (the controller's) and ``leaves`` (the devices'; none: devices on the root)."""

    root: MosquittoBroker
    leaves: list[MosquittoBroker] = field(default_factory=list)

    @property
    def device_urls(self) -> list[str]:
        return [b.url for b in self.leaves] or [self.root.url]

    @property
    def pids(self) -> list[int]:
        return [b.pid or 0 for b in (self.root, *self.leaves)]

    @property
    def shape(self) -> str:
        if not self.leaves:
            return "1 broker"
        return f"root + {len(self.leaves)} leaves"


def start_brokers(work: Path, fleet: str, leaves: int, stack: ExitStack) -> Brokers:
    """The root, then ``leaves`` bridged leaves; returns once every bridge is connected."""
    autosave = TREE_AUTOSAVE_S if leaves else 1
    root = MosquittoBroker(workdir=work / "root", extra_config=UNLIMITED,
                           autosave_interval_s=autosave).start()
    stack.callback(root.stop)
    brokers = Brokers(root)
    for i in range(1, leaves + 1):
        bridge = bridge_lines(f"leaf-{i}", (root.host, root.port), fleet)
        leaf = MosquittoBroker(workdir=work / f"leaf-{i}", extra_config=UNLIMITED + bridge,
                               autosave_interval_s=autosave)
        stack.callback(leaf.stop)
        brokers.leaves.append(leaf.start())
    if leaves:
        wait_for_bridges(root.url, leaves)
    return brokers


def wait_for_bridges(url: str, count: int, timeout: float = 30.0) -> None:
    """Until ``count`` bridges announced themselves up on the root (``$SYS`` notifications)."""
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from edgefleet.agent.mqtt import parse_broker_url

    up: set[str] = set()
    done = threading.Event()

    def on_message(_c: object, _u: object, message: paho.MQTTMessage) -> None:
        if message.payload == b"1":
            up.add(message.topic)
        if len(up) >= count:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bridges",
                         protocol=paho.MQTTv311)
    client.on_message = on_message
    client.connect(*parse_broker_url(url))
    client.subscribe(BRIDGES_UP, 1)
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"{len(up)} of {count} bridges connected in {timeout:g} s")
    finally:
        client.disconnect()
        client.loop_stop()
