"""One network thread for thousands of MQTT connections (paho-mqtt 2.x, external loop).

Every paho client of the simulated fleet is driven by one thread with one
selector (epoll on Linux): paho's socket callbacks (``on_socket_open``,
``on_socket_close``, ``on_socket_register_write``, ``on_socket_unregister_write``)
keep the selector's registrations in step, ready sockets get ``loop_read`` and
``loop_write``, and every client gets ``loop_misc`` (keepalive) once a second.
Nothing outside this module touches a paho client: other threads hand the loop
closures (:meth:`NetworkLoop.call_soon`, :meth:`NetworkLoop.call_at`) and
publish through :meth:`Link.publish`, which the loop thread carries out.

Connections (first ones and reconnections alike) are paced by a token bucket at
``connect_rate`` per second, so neither a start nor a broker restart storms the
broker; a lost connection is retried after 0.2 s, doubling to 10 s.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.mqtt import parse_broker_url
from edgefleet.fleet.simulate.options import SimulationError

__all__ = ["Handler", "Link", "NetworkLoop"]

log = logging.getLogger(__name__)

RECONNECT_MIN_S, RECONNECT_MAX_S = 0.2, 10.0
MISC_EVERY_S = 1.0
MISC_SLICES = 5  # keepalive checks per client: every 5 s (keepalive is 30 s)
MAX_WAIT_S = 0.5
Call = Callable[[], None]


class Handler(Protocol):
    """What a connection tells its device; called on the loop thread."""

    def on_connected(self) -> None: ...
    def on_message(self, topic: str, payload: bytes) -> None: ...
    def on_stopping(self) -> None: ...


class Link:
    """One device's connection: its paho client, its subscription and its reconnect state."""

    __slots__ = ("backoff", "client", "closing", "connected", "handler", "hold_until",
                 "inflight", "loop", "name", "queued", "started", "subscription")

    def __init__(self, loop: NetworkLoop, name: str, client: paho.Client, subscription: str,
                 handler: Handler) -> None:
        self.loop, self.name, self.client, self.handler = loop, name, client, handler
        self.subscription = subscription
        self.connected = self.started = self.queued = self.closing = False
        self.inflight = 0  # QoS 1 publishes not acknowledged yet
        self.backoff = RECONNECT_MIN_S
        self.hold_until = 0.0  # no reconnection before this (monotonic), for offline faults

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """QoS 1, from any thread; False (nothing sent) while disconnected, like the agent."""
        if not self.connected:
            return False
        if self.loop.on_loop_thread():
            self._publish_if_connected(topic, payload, retain)
        else:
            self.loop.call_soon(lambda: self._publish_if_connected(topic, payload, retain))
        return True

    def _publish_if_connected(self, topic: str, payload: bytes, retain: bool) -> None:
        if self.connected and not self.closing:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
            if info.rc == paho.MQTT_ERR_SUCCESS:
                self.inflight += 1


class NetworkLoop:
    """The selector thread, its timers, its call queue and its connection pacing."""

    def __init__(self, broker_url: str, *, connect_rate: float, keepalive: int,
                 tls: bool = False, source_address: str = "") -> None:
        """``tls``: every link gets a TLS context (:meth:`link`); an ``mqtts://`` URL needs
        them. ``source_address``: the local address every connection is made from (paho
        binds each socket before connecting, so one address gives at most one connection
        per ephemeral port, about 28,000 on Linux, whatever the brokers)."""
        if broker_url.startswith(("mqtts://", "ssl://")) and not tls:
            raise SimulationError("an mqtts:// broker needs TLS settings for the devices",
                                  hint="pass --ca CA.crt (and --certs DIR for client "
                                       "certificates), or an mqtt:// listener")
        self.host, self.port = parse_broker_url(broker_url)
        self._tls_warned = False
        self.keepalive, self.connect_rate = keepalive, connect_rate
        self.source_address = source_address
        self.links: list[Link] = []
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._woken = False
        self._calls: deque[Call] = deque()
        self._timers: list[tuple[float, int, Call]] = []
        self._timer_lock = threading.Lock()
        self._order = itertools.count()
        self._connects: deque[Link] = deque()
        self._tokens, self._tokens_at = 1.0, time.monotonic()
        self._stopping = False
        self._misc_turn = 0
        self._thread = threading.Thread(target=self._run, name="edgefleet-sim-net", daemon=True)

    # --- public, thread-safe ---------------------------------------------------------
    def link(self, client_id: str, will: tuple[str, bytes], subscription: str,
             handler: Handler, tls: ssl.SSLContext | None = None) -> Link:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv311, clean_session=True)
        client.will_set(will[0], will[1], qos=1, retain=True)
        if tls is not None:
            client.tls_set_context(tls)
        link = Link(self, client_id, client, subscription, handler)
        client.user_data_set(link)
        self._bind(client)
        self.links.append(link)
        return link

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Every device says goodbye (``on_stopping``) and disconnects cleanly; then stop."""
        if not self._thread.is_alive():
            return
        self.call_soon(lambda: self._begin_stop(timeout))
        self._thread.join(timeout + 2.0)

    def connect(self, link: Link) -> None:
        """Queue a connection attempt (paced at ``connect_rate``)."""
        self.call_soon(lambda: self._queue_connect(link))

    def drop(self, link: Link, offline_s: float) -> None:
        """Cut the TCP connection without DISCONNECT (the broker sends the will)."""
        self.call_soon(lambda: self._drop(link, offline_s))

    def call_soon(self, call: Call) -> None:
        self._calls.append(call)
        if not self._woken and not self.on_loop_thread():
            self._woken = True
            with contextlib.suppress(OSError):  # full (it is awake anyway), or closed
                self._wake_w.send(b"\0")

    def call_at(self, when: float, call: Call) -> None:
        """Run ``call`` on the loop thread at ``when`` (``time.monotonic()``)."""
        with self._timer_lock:
            heapq.heappush(self._timers, (when, next(self._order), call))
        if not self.on_loop_thread():
            self.call_soon(lambda: None)  # wake up to recompute the wait

    def call_later(self, delay: float, call: Call) -> None:
        self.call_at(time.monotonic() + delay, call)

    def on_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # --- the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        next_misc = time.monotonic() + MISC_EVERY_S
        while not self._stopping or self._open_sockets():
            for key, mask in self._selector.select(self._wait()):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._service(key.data, mask)
            self._run_calls()
            self._run_timers()
            self._connect_some()
            if time.monotonic() >= next_misc:
                next_misc += MISC_EVERY_S
                self._misc()
        self._close_all()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wait(self) -> float:
        if self._calls:
            return 0.0
        wait = MAX_WAIT_S
        if self._connects:
            wait = min(wait, max(0.002, 1.0 / self.connect_rate))
        with self._timer_lock:
            if self._timers:
                wait = min(wait, self._timers[0][0] - time.monotonic())
        return max(0.0, wait)

    def _drain_wake(self) -> None:
        self._woken = False
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _service(self, link: Link, mask: int) -> None:
        client = link.client
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
                sock = client.socket()
                # TLS may hold decrypted bytes the selector cannot see: read them too
                while isinstance(sock, ssl.SSLSocket) and sock.pending():
                    client.loop_read()
                    sock = client.socket()
            if mask & selectors.EVENT_WRITE and client.want_write():
                client.loop_write()
        except Exception:  # one broken connection must not stop the others
            log.exception("network error on %s", link.name)

    def _run_calls(self) -> None:
        for _ in range(len(self._calls)):
            _guarded(self._calls.popleft())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._timer_lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, call = heapq.heappop(self._timers)
            _guarded(call)

    def _misc(self) -> None:
        """Keepalive for a slice of the clients: each one every ``MISC_SLICES`` seconds."""
        self._misc_turn = (self._misc_turn + 1) % MISC_SLICES
        for link in self.links[self._misc_turn::MISC_SLICES]:
            if link.client.socket() is not None:
                try:
                    link.client.loop_misc()
                except Exception:
                    log.exception("keepalive failed on %s", link.name)

    # --- connections -------------------------------------------------------------------
    def _queue_connect(self, link: Link) -> None:
        if not link.queued and not self._stopping:
            link.queued = True
            self._connects.append(link)

    def _connect_some(self) -> None:
        now = time.monotonic()
        burst = max(1.0, self.connect_rate * 0.05)
        self._tokens = min(self._tokens + (now - self._tokens_at) * self.connect_rate, burst)
        self._tokens_at = now
        while self._connects and self._tokens >= 1.0:
            self._tokens -= 1.0
            self._connect(self._connects.popleft())

    def _connect(self, link: Link) -> None:
        link.queued = False
        if self._stopping or link.client.socket() is not None:
            return
        try:
            if link.started:
                link.client.reconnect()
            else:
                link.started = True
                link.client.connect(self.host, self.port, keepalive=self.keepalive,
                                    bind_address=self.source_address)
        except (OSError, ValueError) as exc:
            if isinstance(exc, ssl.SSLError) and not self._tls_warned:
                self._tls_warned = True  # the same cause for every device: say it once
                log.warning("TLS connection of %s to %s:%d failed: %s (check --ca and "
                            "--certs; retrying in the background)", link.name, self.host,
                            self.port, exc)
            else:
                log.debug("connection of %s failed: %s", link.name, exc)
            self._retry(link)

    def _retry(self, link: Link) -> None:
        if self._stopping:
            return
        delay = max(link.backoff, link.hold_until - time.monotonic())
        link.backoff = min(link.backoff * 2, RECONNECT_MAX_S)
        self.call_later(delay, lambda: self._queue_connect(link))

    def _drop(self, link: Link, offline_s: float) -> None:
        link.hold_until = time.monotonic() + offline_s
        link.connected = False  # from now on, as the broker will see it
        sock = link.client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _begin_stop(self, timeout: float) -> None:
        self._stopping = True
        self._connects.clear()
        for link in self.links:
            if link.connected:
                _guarded(link.handler.on_stopping)
        self._finish_stop(time.monotonic() + timeout)

    def _finish_stop(self, deadline: float) -> None:
        """Disconnect each client once its publishes are acknowledged (or time is up).

        Closing a socket with a PUBACK still unread makes the kernel reset the
        connection, and a broker that sees the reset before the DISCONNECT sends the will.
        """
        late, waiting = time.monotonic() >= deadline, False
        for link in self.links:
            if link.closing or link.client.socket() is None:
                continue
            if link.inflight and link.connected and not late:
                waiting = True
                continue
            link.closing = True
            link.client.disconnect()
        if waiting:
            self.call_later(0.02, lambda: self._finish_stop(deadline))
        else:
            self.call_later(1.0, self._close_all)

    def _open_sockets(self) -> int:
        return len(self._selector.get_map()) - 1  # the wake-up socket stays

    def _close_all(self) -> None:
        for key in list(self._selector.get_map().values()):
            if key.data is not None:
                self._selector.unregister(key.fileobj)
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]

    # --- paho callbacks (loop thread) ----------------------------------------------------
    def _bind(self, client: paho.Client) -> None:
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write

    def _on_connect(self, client: paho.Client, link: Link, flags: Any, reason: Any,
                    properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("broker refused %s: %s", link.name, reason)
            return
        link.connected, link.backoff = True, RECONNECT_MIN_S
        client.subscribe(link.subscription, 1)
        _guarded(link.handler.on_connected)

    def _on_disconnect(self, client: paho.Client, link: Link, flags: Any, reason: Any,
                       properties: Any) -> None:
        link.connected = False
        self._retry(link)

    def _on_message(self, client: paho.Client, link: Link, message: paho.MQTTMessage) -> None:
        _guarded(link.handler.on_message, message.topic, bytes(message.payload))

    def _on_publish(self, client: paho.Client, link: Link, mid: int, reason: Any,
                    properties: Any) -> None:
        link.inflight = max(0, link.inflight - 1)

    def _on_socket_open(self, client: paho.Client, link: Link, sock: Any) -> None:
        self._selector.register(sock, selectors.EVENT_READ, link)

    def _on_socket_close(self, client: paho.Client, link: Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _on_register_write(self, client: paho.Client, link: Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def _on_unregister_write(self, client: paho.Client, link: Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ, link)


def _guarded(call: Callable[..., None], *args: Any) -> None:
    try:
        call(*args)
    except Exception:  # a device's bug must not stop the fleet's network thread
        log.exception("simulator callback %s failed", getattr(call, "__name__", call))
