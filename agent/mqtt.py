"""One small MQTT client for the agent side, over paho-mqtt 2.x (MQTT 3.1.1).

No paho type leaks out: callers see topics as ``str`` and payloads as ``bytes``.
Subscriptions and connect hooks are re-applied on every reconnection, and a
handler that raises is logged, never allowed to stop the network loop.

Delivery: ``publish`` is fire-and-forget (QoS 1 messages still unacknowledged
when the connection drops are sent again after reconnecting). ``publish_wait``
waits for the PUBACK; when it raises, the message is the caller's to retry and
is never sent again by this client, so a caller that spools and replays does
not produce duplicates.

Security: :class:`MqttSecurity` says how the client checks the broker (a CA file, or the
system's CAs for ``mqtts://``) and proves who it is (a client certificate, or a user
name and password). A broker that refuses us (bad credentials, not authorised, a TLS
failure) is logged once per distinct reason, not at every reconnection, and kept as
:attr:`MqttClient.connect_error` until a connection succeeds.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.errors import BrokerError, BrokerTimeoutError
from edgefleet.agent.mqtt_config import MqttSecurity, parse_broker_url

__all__ = ["Handler", "MqttClient", "MqttSecurity", "Refusal", "RetainHandler", "Will",
           "parse_broker_url", "refusal_of"]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]
# also told whether the message is a retained copy the broker replays on subscribing (a
# device's last word, possibly old), not one just published
RetainHandler = Callable[[str, bytes, bool], None]
Will = tuple[str, bytes, int, bool]  # topic, payload, qos, retain
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 0.2, 10
_ACK_POLL_S = 0.05
_MAX_ROUTES = 200_000  # remembered topics (a fleet of 10,000 devices has 40,000)



class MqttClient:
    """A reconnecting client; ``publish`` never blocks, ``publish_wait`` waits for PUBACK."""

    def __init__(
        self,
        client_id: str,
        host: str,
        port: int,
        *,
        will: Will | None = None,
        security: MqttSecurity | None = None,
        keepalive: int = 30,
        clean_session: bool = True,
        tls: bool = False,
        max_inflight: int = 20,
    ) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.security = security or MqttSecurity()
        self.tls = tls or self.security.tls
        self._client = _paho_client(client_id, clean_session)
        self._client.max_inflight_messages_set(max_inflight)  # QoS 1 publishes unacknowledged
        _apply_security(self._client, self.security, self.tls)
        self._errors = _ErrorTap()
        self._client.enable_logger(self._errors)
        self.connect_error: BrokerError | None = None  # why connecting fails, until it works
        self._attempt_failed = False  # this attempt's failure is already reported
        self._reported: set[str] = set()  # reasons logged since the last connection
        if self.security.password is not None and not self.tls:
            log.warning("the MQTT password for %s:%s goes in clear text: use mqtts:// or "
                        "--ca", host, port)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=will[2], retain=will[3])
        self._subscriptions: dict[str, tuple[RetainHandler, int]] = {}
        self._routes: dict[str, tuple[RetainHandler, ...]] = {}  # topic -> matching handlers
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
        """A client for ``mqtt://host:port``; ``mqtts://`` turns TLS on (system CAs unless
        ``security`` names a CA file)."""
        host, port = parse_broker_url(url)
        options.setdefault("tls", url.startswith(("mqtts://", "ssl://")))
        return cls(client_id, host, port, **options)

    def _bind_callbacks(self) -> None:
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_pre_connect = self._on_pre_connect

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

        def plain(topic: str, payload: bytes, retained: bool) -> None:
            handler(topic, payload)

        plain.__name__ = getattr(handler, "__name__", plain.__name__)  # named in logs
        self.subscribe_retain(topic_filter, plain, qos)

    def subscribe_retain(self, topic_filter: str, handler: RetainHandler, qos: int = 1) -> None:
        """As :meth:`subscribe`, ``handler`` also told whether a message is retained."""
        self._subscriptions[topic_filter] = (handler, qos)
        self._routes = {}
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

    def unacknowledged(self) -> int:
        """Publishes handed to this client that the broker has not acknowledged yet: in
        flight (at most ``max_inflight``) and queued behind them, in this process. A sender
        that may produce faster than the broker takes checks it rather than pile up here."""
        return len(self._client._out_messages)

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
            self._refused(f"refused the connection: {reason}",
                          _REFUSAL_HINTS[refusal_of(reason)])
            return
        log.info("connected to %s:%s", self.host, self.port)
        self.connect_error = None
        self._reported.clear()
        self._errors.last = ""
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
        elif getattr(reason, "is_failure", True) and not self._attempt_failed:
            # closed before its CONNACK: a TLS alert or a plain client on a TLS port
            error = self._errors.last or str(reason)
            self._refused(f"closed the connection before accepting it: {error}",
                          _closed_hint(error, self.security, self.tls))
        self._errors.last = ""
        self._connected.clear()
        self._subscribed.clear()

    def _on_pre_connect(self, client: paho.Client, userdata: Any) -> None:
        self._attempt_failed = False

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        """paho calls this inside its ``except OSError``: the exception is the reason."""
        exc = sys.exc_info()[1]
        if exc is not None:
            self._refused(f"could not connect: {exc}", _connect_hint(exc, self.security))

    def _refused(self, reason: str, hint: str) -> None:
        """Log a failed connection once per distinct reason; keep it as ``connect_error``."""
        self._errors.last = ""
        self._attempt_failed = True
        self.connect_error = BrokerError(reason, hint=hint)
        if reason in self._reported:
            return
        self._reported.add(reason)
        log.warning("MQTT broker %s:%s (%s): %s; retrying in the background. Fix: %s",
                    self.host, self.port, self.security.describe(), reason, hint)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._network_thread = threading.get_ident()
        topic = message.topic
        handlers = self._routes.get(topic)
        if handlers is None:
            handlers = self._route(topic)
        payload = bytes(message.payload)
        retained = bool(message.retain)
        for handler in handlers:
            _guarded(handler, topic, payload, retained)

    def _route(self, topic: str) -> tuple[RetainHandler, ...]:
        """The handlers of every subscription matching ``topic``, remembered per topic (a
        fleet's topics repeat: matching each message against every filter would cost more
        than handling it)."""
        if len(self._routes) >= _MAX_ROUTES:
            self._routes.clear()
        handlers = tuple(handler for topic_filter, (handler, _) in
                         list(self._subscriptions.items()) if topic_matches(topic_filter, topic))
        self._routes[topic] = handlers
        return handlers


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching (``+`` one level, ``#`` the rest); a shared subscription
    (``$share/GROUP/FILTER``) matches as its FILTER."""
    if topic_filter.startswith("$share/"):
        topic_filter = topic_filter.split("/", 2)[2] if topic_filter.count("/") >= 2 else ""
    wanted, parts = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and wanted[0] in ("+", "#"):
        return False  # $SYS and friends never match a leading wildcard
    for i, level in enumerate(wanted):
        if level == "#":
            return True
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return False
    return len(parts) == len(wanted)


def _paho_client(client_id: str, clean_session: bool) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv311,
        clean_session=clean_session,
    )
    # paho types the delays as int but computes with floats.
    client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)  # type: ignore[arg-type]
    return client


def _apply_security(client: paho.Client, security: MqttSecurity, tls: bool) -> None:
    """Credentials and TLS files, read now: a missing or unreadable file fails here."""
    if security.username:
        client.username_pw_set(security.username, security.password)
    if not tls:
        return
    files = [str(p) if p is not None else None
             for p in (security.ca_file, security.cert_file, security.key_file)]
    try:
        client.tls_set(ca_certs=files[0], certfile=files[1], keyfile=files[2])
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise BrokerError(f"cannot use the TLS files ({security.describe()}): {exc}",
                          hint="pass the CA certificate (--ca), and the client certificate "
                               "(--cert) with its own key (--key), as PEM files this user "
                               "may read", transient=False) from exc


class _ErrorTap(logging.Logger):
    """paho's logger: keeps its last error (e.g. a TLS alert read from the socket), cheaply.

    paho formats its debug lines only for a logger that wants them; this one wants only
    warnings and errors, which are rare.
    """

    def __init__(self) -> None:
        super().__init__("edgefleet.agent.mqtt.paho", logging.WARNING)
        self.last = ""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.WARNING:
            self.last = str(msg) % args if args else str(msg)
            log.debug("paho: %s", self.last)


class Refusal(Enum):
    """Why a broker's CONNACK said no, read from its reason code."""

    CREDENTIALS = "credentials"  # bad user name or password, or not authorised
    CLIENT_ID = "client_id"
    OTHER = "other"


# MQTT 5 CONNACK reason codes; paho maps the MQTT 3.1.1 return codes 2, 4 and 5 onto them
_REFUSALS = {0x85: Refusal.CLIENT_ID, 0x86: Refusal.CREDENTIALS, 0x87: Refusal.CREDENTIALS}

_REFUSAL_HINTS = {
    Refusal.CREDENTIALS: "check this client's credentials: its certificate (signed by the "
                         "broker's CA) or its user name and password (--password-file), and "
                         "that the broker's password file and ACL list it",
    Refusal.CLIENT_ID: "the broker refused the client id: see its log",
    Refusal.OTHER: "see the broker's log",
}


def refusal_of(reason: object) -> Refusal:
    """The kind of a CONNACK refusal, from paho's ``ReasonCode`` (its ``value``)."""
    return _REFUSALS.get(getattr(reason, "value", 0), Refusal.OTHER)


_NETWORK_WORDS = ("reset", "timed out", "timeout", "unreachable", "no route", "broken pipe",
                  "network", "refused", "keepalive", "lost")


def _closed_hint(error: str, security: MqttSecurity, tls: bool) -> str:
    lowered = error.lower()
    network = any(word in lowered for word in _NETWORK_WORDS)
    if not tls:  # a plain client on a TLS port and a cut link look the same from here
        return ("if the broker's port takes TLS, use mqtts://HOST:8883 with --ca CA.crt"
                + ("; if the network is what dropped it, the client keeps reconnecting by "
                   "itself" if network else "; else see the broker's log"))
    if network:
        return ("the network dropped the connection before the broker answered; the client "
                "keeps reconnecting by itself (check the link if it lasts)")
    if "certificate required" in lowered or (security.cert_file is None
                                              and "certificate" in lowered):
        return "the broker wants a client certificate: pass --cert and --key"
    if "unknown ca" in lowered or "bad certificate" in lowered or "expired" in lowered:
        return ("the broker does not accept this client certificate: it must be signed by "
                "the broker's CA and still valid (see 'edgefleet certs show')")
    return "see the broker's log"


def _connect_hint(exc: BaseException, security: MqttSecurity) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ("the broker's certificate is not trusted: pass the CA that signed it with "
                "--ca, and dial a host name or IP address listed in it (--host of "
                "'edgefleet certs server')")
    if isinstance(exc, ssl.SSLError):
        return "TLS failed: is this a TLS port, and does it accept TLS 1.2 or newer?"
    if isinstance(exc, ConnectionRefusedError):
        return "nothing listens there yet: start the broker or fix the URL"
    return "check the host, the port and the network"


def _guarded(func: Callable[..., None], *args: Any) -> None:
    try:
        func(*args)
    except Exception:
        log.exception(
            "MQTT callback %s failed; the message was dropped", getattr(func, "__name__", func)
        )
