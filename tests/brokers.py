"""Test-side MQTT helpers: the embedded broker as a process, and a recording subscriber."""

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

from agent.mqtt import parse_broker_url
from fleet.mosquitto import free_port, wait_for_port


@dataclass
class AmqttBroker:
    """``edgefleet broker`` in its own process, stopped by its PID."""

    host: str = "127.0.0.1"
    port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> AmqttBroker:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "broker", "--host", self.host,
             "--port", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_port(self.host, self.port, 20), "embedded broker did not start"
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        process, self._process = self._process, None
        if process and process.poll() is None:
            process.send_signal(sig)
            process.wait(timeout=10)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Subscriber:
    """A paho client that records every message; optional persistent session."""

    def __init__(self, url: str, topics: list[str], *, client_id: str | None = None,
                 persistent: bool = False) -> None:
        host, port = parse_broker_url(url)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._topics = topics
        self._client = paho.Client(CallbackAPIVersion.VERSION2,
                                   client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                   protocol=paho.MQTTv311, clean_session=not persistent)
        self._client.reconnect_delay_set(min_delay=1, max_delay=2)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.connect_async(host, port, keepalive=10)
        self._client.loop_start()
        assert self._subscribed.wait(10), f"subscriber could not connect to {url}"

    def _on_connect(self, client: paho.Client, *args: Any) -> None:
        for topic in self._topics:
            client.subscribe(topic, qos=1)
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Message(msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def on(self, suffix: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
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
