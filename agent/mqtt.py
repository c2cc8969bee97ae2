"""One small MQTT client for the agent side, over paho-mqtt 2.x (MQTT 3.1.1).

No paho type leaks out: callers see topics as ``str`` and payloads as ``bytes``.
Subscriptions and connect hooks are re-applied on every reconnection, and a
handler that raises is logged, never allowed to stop the network loop.

Delivery: ``publish`` is fire-and-forget (QoS 1 messages still unacknowledged
when the connection drops are sent again after reconnecting). ``publish_wait``
waits for the PUBACK; when it raises, the message is the caller's to retry and
is never sent again by this client, so a caller that spools and replays does
not produce duplicates.
"""

from __future__ import annotations

import logging
import threading
import time
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
_URL_HINT = "write it like mqtt://127.0.0.1:1883 or mqtts://broker.example:8883"
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 0.2, 10
_ACK_POLL_S = 0.05


def parse_broker_url(url: str) -> tuple[str, int]:
    """``mqtt://host[:port]`` or ``mqtts://host[:port]`` -> (host, port)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise BrokerError(
            f"broker URL {url!r} is not mqtt://HOST:PORT", hint=_URL_HINT, transient=False
        )
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise BrokerError(
            f"broker URL {url!r} has a bad port", hint=_URL_HINT, transient=False
        ) from exc
    return parts.hostname, port


class MqttClient:
    """A reconnecting client; ``publish`` never blocks, ``publish_wait`` waits for PUBACK."""

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        *,
        will: Will | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive: int = 30,
        clean_session: bool = True,
        tls: bool = False,
    ) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self._client = _paho_client(client_id, clean_session, tls)
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        self._subscriptions: dict[str, tuple[Handler, int]] = {}
        self._hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending_subacks: set[int] = set()
        self._owned: set[int] = set()  # unacknowledged mids that their sender retries itself
        self._lock = threading.Lock()  # guards _owned; taken inside paho's own locks
        self._send_lock = threading.Lock()  # a publish and its marking vs. a reconnection
        self._network_thread: int | None = None
        self._bind_callbacks()

    @classmethod
    def from_url(cls, client_id: str, url: str, **options: Any) -> MqttClient:
        """A client for ``mqtt://host:port``; ``mqtts://`` turns TLS on (system CAs)."""
        host, port = parse_broker_url(url)
        options.setdefault("tls", url.startswith(("mqtts://", "ssl://")))
        return cls(client_id, host, port, **options)

    def _bind_callbacks(self) -> None:
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background; retries with backoff (0.2 s doubling to 10 s)."""
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the broker acknowledged every subscription of this connection."""
        return self._subscribed.wait(timeout)

    def on_connect(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` on the network thread after every connection; use ``publish`` there."""
        self._hooks.append(hook)

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route matching messages to ``handler``; re-subscribed after every reconnection."""
        self._subscriptions[topic_filter] = (handler, qos)
        if self.connected:
            self._subscribe(topic_filter, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message if connected; False when offline (the caller decides what to do)."""
        if not self.connected:
            return False
        with self._send_lock:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self._no_resend(info.mid, True)
                return False
        return True

    def publish_wait(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 5.0
    ) -> None:
        """Publish and wait for the broker's acknowledgement; BrokerTimeoutError if none."""
        self._check_not_network_thread()
        if not self.connected:
            raise BrokerTimeoutError(
                f"not connected to {self.host}:{self.port}",
                hint="keep the message and retry after reconnecting",
            )
        with self._send_lock:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
            self._no_resend(info.mid, True)
        try:
            self._wait_acknowledged(info, topic, timeout)
        except (RuntimeError, ValueError) as exc:
            raise BrokerTimeoutError(
                f"publish to {topic} failed: {exc}", hint="retry after reconnecting"
            ) from exc
        self._no_resend(info.mid, False)

    def _wait_acknowledged(self, info: paho.MQTTMessageInfo, topic: str, timeout: float) -> None:
        """Return once acknowledged; raise as soon as the connection drops or time runs out."""
        deadline = time.monotonic() + timeout
        while not info.is_published():
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerTimeoutError(
                    f"no acknowledgement for {topic} within {timeout:.1f} s",
                    hint="the broker is slow or gone; retry later",
                )
            if not self.connected:
                raise BrokerTimeoutError(
                    f"the connection dropped before {topic} was acknowledged",
                    hint="retry after reconnecting",
                )
            info.wait_for_publish(min(left, _ACK_POLL_S))

    def _no_resend(self, mid: int, flag: bool) -> None:
        """Mark a message as owned by its sender: never re-sent after a reconnection."""
        with self._lock:
            if flag:
                self._owned.add(mid)
            else:
                self._owned.discard(mid)

    def _check_not_network_thread(self) -> None:
        if threading.get_ident() == self._network_thread:
            raise BrokerError(
                "publish_wait() called from an MQTT handler or on_connect hook",
                hint="use publish() there: waiting would block the network "
                "thread that receives the acknowledgement",
                transient=False,
            )

    def _subscribe(self, topic_filter: str, qos: int) -> None:
        self._subscribed.clear()
        _, mid = self._client.subscribe(topic_filter, qos)
        if mid is not None:
            self._pending_subacks.add(mid)

    def _resend_unacknowledged(self) -> None:
        """Replace paho's resend: drop what senders retry themselves, send the rest again."""
        stale = self._client.drop_out_messages()
        with self._lock:
            owned, self._owned = self._owned, set()
        for message in stale:
            if message.mid not in owned:
                self._client.publish(message.topic, message.payload, message.qos, message.retain)

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._network_thread = threading.get_ident()
        if getattr(reason, "is_failure", False):
            log.warning("broker %s:%s refused the connection: %s", self.host, self.port, reason)
            return
        log.info("connected to %s:%s", self.host, self.port)
        self._connected.set()
        with self._send_lock:
            self._resend_unacknowledged()
        self._pending_subacks.clear()
        if not self._subscriptions:
            self._subscribed.set()
        for topic_filter, (_, qos) in list(self._subscriptions.items()):
            self._subscribe(topic_filter, qos)
        for hook in list(self._hooks):
            _guarded(hook)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        self._pending_subacks.discard(mid)
        if not self._pending_subacks:
            self._subscribed.set()

    def _on_publish(
        self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        self._no_resend(mid, False)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._connected.is_set():
            log.info("disconnected from %s:%s: %s", self.host, self.port, reason)
        self._connected.clear()
        self._subscribed.clear()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._network_thread = threading.get_ident()
        for topic_filter, (handler, _) in list(self._subscriptions.items()):
            if paho.topic_matches_sub(topic_filter, message.topic):
                _guarded(handler, message.topic, bytes(message.payload))


def _paho_client(client_id: str, clean_session: bool, tls: bool) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
        clean_session=clean_session,
    )
    # paho types the delays as int but computes with floats.
    client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)  # type: ignore[arg-type]
    if tls:
        client.tls_set()
    return client


def _guarded(func: Callable[..., None], *args: Any) -> None:
    try:
        func(*args)
    except Exception:
        log.exception(
            "MQTT callback %s failed; the message was dropped", getattr(func, "__name__", func)
        )
