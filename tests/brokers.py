"""Test-side MQTT helpers: brokers of our own on free ports, and a recording subscriber.

``MosquittoBroker`` is ``fleet.mosquitto``'s (generated config, persistence in
its own folder, stopped by PID; raises naming ``apt-get install mosquitto``
when the binary is missing, kept as the user it was started as).
``AmqttBroker`` runs the embedded broker of ``agent.broker`` in a child process
with the same start/stop/restart/url.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.mqtt import parse_broker_url
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, stop_process, wait_for_port

__all__ = ["AmqttBroker", "AnyBroker", "Message", "MosquittoBroker", "Subscriber"]


@dataclass
class AmqttBroker:
    """``agent.broker.run_embedded_broker`` in its own process, stopped by its PID."""

    host: str = "127.0.0.1"
    port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self, timeout: float = 20.0) -> AmqttBroker:
        code = (
            "from edgefleet.agent.broker import run_embedded_broker; "
            f"run_embedded_broker({self.host!r}, {self.port})"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if not wait_for_port(self.host, self.port, timeout):
            process, self._process = self._process, None
            process.kill()
            _, err = process.communicate()
            raise RuntimeError(
                f"embedded broker did not listen on {self.port}: "
                f"{err.decode(errors='replace')[-2000:]}"
            )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by PID (SIGTERM: clean shutdown; SIGKILL: a crash)."""
        process, self._process = self._process, None
        stop_process(process, sig)

    def restart(self) -> AmqttBroker:
        self.stop()
        return self.start()


AnyBroker = MosquittoBroker | AmqttBroker


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    dup: bool = False  # the broker says this may be a redelivery (QoS 1 is at-least-once)

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A paho client that records every message; optionally a persistent session (QoS 1).

    The constructor returns once the broker acknowledged the subscriptions; after a
    reconnection they are made again.
    """

    def __init__(
        self,
        url: str,
        topics: list[str],
        *,
        client_id: str | None = None,
        persistent: bool = False,
        timeout: float = 10.0,
    ) -> None:
        host, port = parse_broker_url(url)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv311,
            clean_session=not persistent,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=1)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.connect_async(host, port, keepalive=10)
        self._client.loop_start()
        if not self._subscribed.wait(timeout):
            self.close()
            raise AssertionError(f"subscriber could not subscribe on {url}")

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        if self._topics:
            client.subscribe([(topic, 1) for topic in self._topics])
        else:
            self._subscribed.set()

    def _on_subscribe(self, client: paho.Client, *args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(
                Message(msg.topic, bytes(msg.payload), bool(msg.retain), bool(msg.dup))
            )
            self._cond.notify_all()

    def on(self, suffix: str) -> list[Message]:
        """The messages so far whose topic ends with ``suffix``."""
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(messages)`` holds; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.messages)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
