"""The agent's MQTT layer on real brokers: client, last will, spool, reporter across outages."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.errors import BrokerError, BrokerTimeoutError
from edgefleet.agent.mqtt import MqttClient, parse_broker_url
from edgefleet.agent.protocol.payloads import STATUS_OFFLINE, STATUS_ONLINE, decode_telemetry
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.agent.telemetry.reporter import TelemetryReporter
from edgefleet.agent.telemetry.spool import Spool
from tests.brokers import AnyBroker, Message, MosquittoBroker, Subscriber

ClientFactory = Callable[..., MqttClient]

# A device in its own process: connects with a last will and says "online" (retained).
_DEVICE = """
import sys, time
from edgefleet.agent.mqtt import MqttClient
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
client = MqttClient("will-device", host, port, will=(topic, b"offline", 1, True), keepalive=5)
client.on_connect(lambda: client.publish(topic, b"online", qos=1, retain=True))
client.start()
print("connected" if client.wait_connected(10) else "failed", flush=True)
time.sleep(120)
"""


@pytest.fixture()
def clients() -> Iterator[ClientFactory]:
    """Make started MqttClients on a broker URL; every one is stopped at the end."""
    made: list[MqttClient] = []

    def make(url: str, client_id: str, **kwargs: Any) -> MqttClient:
        client = MqttClient.from_url(client_id, url, **kwargs)
        made.append(client)
        client.start()
        assert client.wait_connected(10), f"{client_id} could not connect to {url}"
        return client

    yield make
    for client in made:
        client.stop()


@pytest.fixture()
def subscribers() -> Iterator[Callable[..., Subscriber]]:
    made: list[Subscriber] = []

    def make(url: str, topics: list[str], **kwargs: Any) -> Subscriber:
        made.append(Subscriber(url, topics, **kwargs))
        return made[-1]

    yield make
    for sub in made:
        sub.close()


@pytest.fixture()
def device_process(any_broker: AnyBroker) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    """Start the will-carrying device of ``_DEVICE``; killed at the end if still alive."""
    started: list[subprocess.Popen[str]] = []

    def start(topic: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", _DEVICE, any_broker.host, str(any_broker.port), topic],
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        assert process.stdout is not None and process.stdout.readline().strip() == "connected"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()
        if process.stdout:
            process.stdout.close()


def _first_deliveries(messages: list[Message]) -> list[Message]:
    """Without the broker's redeliveries: a DUP-flagged copy of a message already received.

    A broker that stops while a QoS 1 message to a persistent subscriber awaits its
    PUBACK sends it again after the restart, as MQTT's at-least-once allows.
    """
    seen: set[tuple[str, bytes]] = set()
    first = []
    for message in messages:
        key = (message.topic, message.payload)
        if not (message.dup and key in seen):
            first.append(message)
        seen.add(key)
    return first


def _seqs(messages: list[Message]) -> list[int]:
    """Every telemetry seq in arrival order; replayed batches (JSON arrays) unrolled."""
    return [
        int(point.values["seq"])
        for m in _first_deliveries(messages)
        if m.topic.endswith("/telemetry")
        for point in decode_telemetry(m.payload)
    ]


# --- broker URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://10.0.0.5:1884", ("10.0.0.5", 1884)),
        ("mqtt://broker.local", ("broker.local", 1883)),
        ("mqtts://broker.local", ("broker.local", 8883)),
        ("127.0.0.1:2000", ("127.0.0.1", 2000)),
    ],
)
def test_broker_urls_give_host_and_port(url: str, expected: tuple[str, int]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize("url", ["http://host:1883", "mqtt://", "mqtt://host:notaport"])
def test_a_bad_broker_url_is_a_fatal_broker_error(url: str) -> None:
    with pytest.raises(BrokerError, match="mqtt://") as caught:
        parse_broker_url(url)
    assert not caught.value.transient


# --- the client on both brokers ----------------------------------------------------------


def test_retained_status_and_last_will_after_a_crash(
    any_broker: AnyBroker,
    fleet_name: str,
    subscribers: Callable[..., Subscriber],
    device_process: Callable[[str], subprocess.Popen[str]],
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.STATUS)
    watcher = subscribers(any_broker.url, [topic])
    device = device_process(topic)
    assert watcher.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
    device.kill()  # SIGKILL: the socket closes without DISCONNECT, so the broker sends the will
    assert watcher.wait_for(lambda ms: ms[-1].payload == STATUS_OFFLINE.encode())
    late = subscribers(any_broker.url, [topic])
    assert late.wait_for(lambda ms: len(ms) >= 1)
    assert late.messages[0] == Message(topic, STATUS_OFFLINE.encode(), retain=True)


def test_a_clean_stop_sends_no_last_will(
    any_broker: AnyBroker,
    fleet_name: str,
    clients: ClientFactory,
    subscribers: Callable[..., Subscriber],
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.STATUS)
    watcher = subscribers(any_broker.url, [topic])
    client = clients(
        any_broker.url, f"{fleet_name}-dev", will=(topic, STATUS_OFFLINE.encode(), 1, True)
    )
    client.publish_wait(topic, STATUS_ONLINE.encode(), retain=True)
    client.stop()
    assert not watcher.wait_for(lambda ms: any(m.payload == b"offline" for m in ms), 1.0)


def test_publish_wait_returns_once_the_broker_acknowledged(
    any_broker: AnyBroker,
    fleet_name: str,
    clients: ClientFactory,
    subscribers: Callable[..., Subscriber],
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.REPORTED)
    client = clients(any_broker.url, f"{fleet_name}-dev")
    client.publish_wait(topic, b'{"serving": true}', qos=1, retain=True, timeout=5.0)
    late = subscribers(any_broker.url, [topic])
    assert late.wait_for(lambda ms: len(ms) >= 1)
    assert late.messages[0] == Message(topic, b'{"serving": true}', retain=True)


def test_publishing_while_offline_fails_fast(fleet_name: str) -> None:
    client = MqttClient(f"{fleet_name}-offline", "127.0.0.1", 1)  # never started
    topic = device_topic(fleet_name, "dev-1", Leaf.EVENTS)
    assert client.publish(topic, b"x", qos=1) is False
    started = time.monotonic()
    with pytest.raises(BrokerTimeoutError, match="not connected") as caught:
        client.publish_wait(topic, b"x", timeout=5.0)
    assert caught.value.transient and time.monotonic() - started < 1.0


def test_subscriptions_come_back_after_a_broker_restart(
    any_broker: AnyBroker,
    fleet_name: str,
    clients: ClientFactory,
    subscribers: Callable[..., Subscriber],
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.DESIRED)
    received: list[bytes] = []
    connects = threading.Semaphore(0)
    client = MqttClient(f"{fleet_name}-dev", any_broker.host, any_broker.port)
    client.subscribe(topic, lambda _topic, payload: received.append(payload))
    client.on_connect(connects.release)
    client.start()
    try:
        assert connects.acquire(timeout=10) and client.wait_subscribed(10)
        any_broker.restart()
        assert connects.acquire(timeout=15), "the client reconnected by itself"
        assert client.wait_subscribed(10)
        subscribers(any_broker.url, []).publish(topic, b"after-restart")
        deadline = time.monotonic() + 5
        while b"after-restart" not in received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert received == [b"after-restart"]
    finally:
        client.stop()


def test_a_handler_that_raises_does_not_stop_the_client(
    any_broker: AnyBroker,
    fleet_name: str,
    clients: ClientFactory,
    subscribers: Callable[..., Subscriber],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.DESIRED)
    received: list[bytes] = []

    def handler(_topic: str, payload: bytes) -> None:
        if payload == b"boom":
            raise ValueError("handler bug")
        received.append(payload)

    client = clients(any_broker.url, f"{fleet_name}-dev")
    client.subscribe(topic, handler)
    assert client.wait_subscribed(10)
    sender = subscribers(any_broker.url, [])
    for payload in (b"boom", b"next", b"boom", b"last"):
        sender.publish(topic, payload)
    deadline = time.monotonic() + 5
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert received == [b"next", b"last"] and client.connected
    assert "handler bug" in caplog.text


def test_publish_wait_refuses_to_run_on_the_network_thread(
    mosquitto: MosquittoBroker,
    fleet_name: str,
    clients: ClientFactory,
    subscribers: Callable[..., Subscriber],
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.DESIRED)
    errors: list[BrokerError] = []

    def handler(_topic: str, _payload: bytes) -> None:
        try:
            client.publish_wait(topic + "/echo", b"x")
        except BrokerError as exc:
            errors.append(exc)

    client = clients(mosquitto.url, f"{fleet_name}-dev")
    client.subscribe(topic, handler)
    assert client.wait_subscribed(10)
    subscribers(mosquitto.url, []).publish(topic, b"ping")
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:
        time.sleep(0.02)
    assert errors and "use publish()" in str(errors[0]) and not errors[0].transient


def test_a_mosquitto_restart_keeps_retained_messages_and_persistent_sessions(
    mosquitto: MosquittoBroker, fleet_name: str, subscribers: Callable[..., Subscriber]
) -> None:
    status, events = (
        device_topic(fleet_name, "dev-1", leaf) for leaf in (Leaf.STATUS, Leaf.EVENTS)
    )
    subscribers(mosquitto.url, [events], client_id=f"{fleet_name}-sub", persistent=True).close()
    publisher = subscribers(mosquitto.url, [])
    publisher.publish(status, b"online", retain=True)
    mosquitto.restart()
    subscribers(mosquitto.url, []).publish(events, b"while-away")
    back = subscribers(mosquitto.url, [], client_id=f"{fleet_name}-sub", persistent=True)
    assert back.wait_for(lambda ms: [m.payload for m in ms] == [b"while-away"], 5)
    late = subscribers(mosquitto.url, [status])
    assert late.wait_for(lambda ms: [m.payload for m in ms] == [b"online"], 5)


# --- the spool ---------------------------------------------------------------------------


def _fill(spool: Spool, first: int, count: int) -> None:
    for i in range(first, first + count):
        spool.append(json.dumps({"n": i}).encode().ljust(100))


def _numbers(spool: Spool) -> list[int]:
    return [json.loads(data)["n"] for _, data in spool.peek_batch(1000)]


def test_the_spool_bound_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    _fill(spool, 0, 25)
    assert _numbers(spool) == list(range(15, 25))
    assert spool.dropped == 15 and spool.size_bytes == 1000 and len(spool) == 10


def test_the_spool_survives_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1000)
    _fill(spool, 0, 12)
    spool.remove([spool_id for spool_id, _ in spool.peek_batch(3)])
    again = Spool(tmp_path / "spool", max_bytes=1000)
    assert _numbers(again) == list(range(5, 12))
    assert again.dropped == 2 and again.size_bytes == 700
    _fill(again, 12, 1)
    assert _numbers(again)[-1] == 12


def test_the_spool_skips_a_corrupt_file_and_counts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10_000)
    _fill(spool, 0, 3)
    second = sorted((tmp_path / "spool").glob("*.json"))[1]
    second.write_bytes(b'{"n": 9')  # torn or overwritten
    (tmp_path / "spool" / ".000000000004-00000000.json.x1.tmp").write_bytes(b"{")  # a crash
    again = Spool(tmp_path / "spool", max_bytes=10_000)
    assert _numbers(again) == [0, 2]
    assert again.dropped == 1 and len(again) == 2
    assert "corrupt" in caplog.text and "cut short" in caplog.text
    assert not list((tmp_path / "spool").glob(".*.tmp"))


# --- the reporter ------------------------------------------------------------------------


class _Counter:
    """Stands in for the agent's snapshot and notes which threads called it."""

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def snapshot(self) -> dict[str, Any]:
        self.threads.add(threading.current_thread().name)
        return {"inferences": 1}


def _reporter(
    url: str, fleet: str, spool: Spool, counter: _Counter, interval: float = 0.1
) -> tuple[MqttClient, TelemetryReporter]:
    client = MqttClient(f"{fleet}-dev", *parse_broker_url(url))
    return client, TelemetryReporter(client, fleet, "dev-1", counter.snapshot, spool, interval)


def test_seq_stays_monotonic_across_a_restart(tmp_path: Path, fleet_name: str) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    _, first = _reporter("mqtt://127.0.0.1:1", fleet_name, spool, _Counter())
    for _ in range(3):
        first.tick()  # never connected: every point goes to the spool
    _, second = _reporter(
        "mqtt://127.0.0.1:1", fleet_name, Spool(spool.directory, 1 << 20), _Counter()
    )
    second.tick()
    points = [json.loads(data) for _, data in second.spool.peek_batch(10)]
    assert [p["values"]["seq"] for p in points] == [1, 2, 3, 4]
    assert points[-1]["values"]["spool_pending"] == 3
    assert {"cpu_percent", "rss_bytes", "temperature_c"} <= points[-1]["values"].keys()


def _outage(
    broker: MosquittoBroker, reporter: TelemetryReporter, sub: Subscriber, seconds: float = 2.0
) -> int:
    """Stop the broker by PID while points keep coming; restart it on the same port."""
    assert sub.wait_for(lambda ms: len(_seqs(ms)) >= 3), "points flow before the outage"
    broker.stop()
    at_stop = reporter.seq
    time.sleep(seconds)
    assert reporter.seq >= at_stop + int(seconds / reporter.interval_s) - 3, "points kept coming"
    broker.start()
    target = reporter.seq + 3
    assert sub.wait_for(lambda ms: max(_seqs(ms), default=0) >= target, timeout=20)
    return at_stop


def test_a_broker_outage_loses_no_telemetry_and_keeps_order(
    mosquitto: MosquittoBroker,
    fleet_name: str,
    tmp_path: Path,
    subscribers: Callable[..., Subscriber],
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.TELEMETRY)
    sub = subscribers(mosquitto.url, [topic], client_id=f"{fleet_name}-sub", persistent=True)
    counter = _Counter()
    client, reporter = _reporter(
        mosquitto.url, fleet_name, Spool(tmp_path / "spool", 1 << 20), counter
    )
    client.start()
    reporter.start()
    try:
        _outage(mosquitto, reporter, sub)
        assert counter.threads == {"edgefleet-telemetry"}, "snapshot only on its own thread"
    finally:
        reporter.stop(flush=True)
        client.stop()
    last = reporter.seq
    assert sub.wait_for(lambda ms: max(_seqs(ms), default=0) >= last, timeout=5)
    assert _seqs(sub.messages) == list(range(1, last + 1)), "every point, once, in order"
    batches = [m for m in sub.messages if m.payload.startswith(b"[")]
    assert batches and max(len(json.loads(m.payload)) for m in batches) > 1
    assert len(reporter.spool) == 0


def test_an_outage_beyond_the_spool_bound_loses_the_oldest_and_says_how_many(
    mosquitto: MosquittoBroker,
    fleet_name: str,
    tmp_path: Path,
    subscribers: Callable[..., Subscriber],
) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.TELEMETRY)
    sub = subscribers(mosquitto.url, [topic], client_id=f"{fleet_name}-sub", persistent=True)
    spool = Spool(tmp_path / "spool", max_bytes=1500)  # room for about five points
    client, reporter = _reporter(mosquitto.url, fleet_name, spool, _Counter())
    client.start()
    reporter.start()
    try:
        at_stop = _outage(mosquitto, reporter, sub)
    finally:
        reporter.stop(flush=False)
        client.stop()
    last = reporter.seq
    assert len(spool) == 0 and sub.wait_for(lambda ms: max(_seqs(ms)) >= last, timeout=5)
    points = {p.values["seq"]: p.values for m in sub.messages for p in decode_telemetry(m.payload)}
    received = sorted(points)
    missing = sorted(set(range(1, received[-1] + 1)) - set(received))
    dropped = points[received[-1]]["spool_dropped"]
    assert dropped == spool.dropped > 0 and len(missing) == dropped
    assert missing == list(range(missing[0], missing[0] + dropped)), "one block, no other gap"
    assert at_stop - 1 <= missing[0] <= at_stop + 2, "the oldest points of the outage went first"
    assert _seqs(sub.messages) == received, "what arrived came in order"
