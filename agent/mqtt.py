"""One small MQTT client for the agent side, over paho-mqtt 2.x (MQTT 3.1.1).

No paho type leaks out: callers see topics as ``str`` and payloads as ``bytes``.
Subscriptions and connect hooks are re-applied on every reconnection, and a
handler that raises is logged, never allowed to stop the network loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import BrokerError, BrokerTimeoutError

__all__ = ["Handler", "MqttClient", "Will", "parse_broker_url"]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
Will = tuple[str, bytes, int, bool]  # topic, payload, qos, retain
_DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (or ``mqtts://``) -> (host, port)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise BrokerError(f"broker URL {url!r} is not mqtt://HOST:PORT",
                          hint="write it like mqtt://127.0.0.1:1883", transient=False)
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise BrokerError(f"broker URL {url!r} has a bad port", transient=False,
                          hint="write it like mqtt://127.0.0.1:1883") from exc
    return parts.hostname, port


class MqttClient:
    """A reconnecting client; ``publish`` never blocks, ``publish_wait`` waits for PUBACK."""

    def __init__(self, client_id: str, host: str, port: int, *, will: Will | None = None,
                 username: str | None = None, password: str | None = None,
                 keepalive: int = 30, clean_session: bool = True) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv311, clean_session=clean_session)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        self._subscriptions: dict[str, tuple[Handler, int]] = {}
        self._hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending: set[int] = set()
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every subscription of this connection."""
        return self._subscribed.wait(timeout)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` (on the network thread) after every connection."""
        self._hooks.append(hook)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        self._subscriptions[topic_filter] = (handler, qos)
        if self.connected:
            self._subscribe(topic_filter, qos)

    def _subscribe(self, topic_filter: str, qos: int) -> None:
        self._subscribed.clear()
        _, mid = self._client.subscribe(topic_filter, qos)
        if mid is not None:
            self._pending.add(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message if connected; False when offline (the caller decides what to do)."""
        if not self.connected:
            return False
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    def publish_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                     timeout: float = 5.0) -> None:
        """Publish and wait until the broker acknowledged it; raise BrokerTimeoutError if not."""
        if not self.connected:
            raise BrokerTimeoutError(f"not connected to {self.host}:{self.port}",
                                     hint="the message is kept for a later retry")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise BrokerTimeoutError(f"publish to {topic} failed: {exc}",
                                     hint="the broker connection dropped; retried later") from exc
        if not info.is_published():
            raise BrokerTimeoutError(f"no acknowledgement for {topic} within {timeout:.1f} s",
                                     hint="the broker is slow or gone; retried later")

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason)
            return
        self._connected.set()
        self._pending.clear()
        if not self._subscriptions:
            self._subscribed.set()
        for topic_filter, (_, qos) in list(self._subscriptions.items()):
            self._subscribe(topic_filter, qos)
        for hook in list(self._hooks):
            _guarded(hook)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any,
                      properties: Any) -> None:
        self._pending.discard(mid)
        if not self._pending:
            self._subscribed.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        for topic_filter, (handler, _) in list(self._subscriptions.items()):
            if paho.topic_matches_sub(topic_filter, message.topic):
                _guarded(handler, message.topic, bytes(message.payload))


def _guarded(func: Callable[..., None], *args: Any) -> None:
    try:
        func(*args)
    except Exception:
        log.exception("MQTT callback %s failed; the message was dropped",
                      getattr(func, "__name__", func))
