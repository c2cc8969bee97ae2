"""The agent on a real broker: status, last will, reported state, telemetry, outages."""

from __future__ import annotations

import platform
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.payloads import ReportedState, Telemetry, decode, decode_telemetry
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.brokers import AmqttBroker, Message, Subscriber
from tests.conftest import Keys
from tests.models import TrainedModels


def _service(broker_url: str, fleet: str, data_dir: Path, bundle: Path, keys: Keys,
             interval: float = 0.1, spool_max_bytes: int = 1 << 20) -> AgentService:
    agent = Agent(keys.trusted)
    agent.load(bundle)
    config = ServiceConfig(fleet=fleet, device_id="dev-1", data_dir=data_dir,
                           broker_url=broker_url, telemetry_interval_s=interval,
                           spool_max_bytes=spool_max_bytes, profile="generic-x86_64")
    return AgentService(config, agent)


def _points(messages: list[Message]) -> list[Telemetry]:
    return [p for m in messages if m.topic.endswith("/telemetry")
            for p in decode_telemetry(m.payload)]


def _seqs(messages: list[Message]) -> list[int]:
    return [p.values["seq"] for p in _points(messages)]


class _Load:
    """Keeps inferring on a thread, as a device does, and counts what it did."""

    def __init__(self, agent: Agent, x: np.ndarray) -> None:
        self.count, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(agent, x), daemon=True)
        self._thread.start()

    def _run(self, agent: Agent, x: np.ndarray) -> None:
        while not self._stop.is_set():
            agent.predict(x)
            self.count += 1
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture()
def digit(digits_models: TrainedModels) -> np.ndarray:
    return digits_models.digits.x_test[:1]


def test_status_reported_state_and_telemetry_on_both_brokers(
        any_broker: MosquittoBroker | AmqttBroker, fleet_name: str, tmp_path: Path,
        digits_bundles: dict[str, Path], signing_keys: Keys, digit: np.ndarray) -> None:
    sub = Subscriber(any_broker.url, [fleet_filter(fleet_name)])
    service = _service(any_broker.url, fleet_name, tmp_path, digits_bundles["tflite"],
                       signing_keys)
    service.start()
    try:
        for _ in range(20):
            service.agent.predict(digit)
        assert sub.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        assert sub.wait_for(lambda ms: sum((_seqs(ms) and [1]) or [0]) > 0 and
                            any("inferences" in p.values and p.values["inferences"] > 0
                                for m in ms if m.topic.endswith("/telemetry")
                                for p in decode_telemetry(m.payload)))
        reported = decode(ReportedState, sub.on("/state/reported")[-1].payload)
        assert reported.active is not None and reported.active.version == "1.0.0"
        assert reported.serving and "litert" in reported.runtimes
        assert reported.arch == platform.machine()  # what fleet selectors read (arch=...)
        point = next(p for m in sub.on("/telemetry") for p in decode_telemetry(m.payload)
                     if p.values["inferences"] > 0)
        assert point.values["model"] == "digits" and point.values["latency_p50_ms"] > 0
        assert point.values["rss_bytes"] > 0 and point.values["schema_version"] == 1
    finally:
        service.stop()
    assert sub.wait_for(lambda ms: (ms[-1].topic.endswith("/status") and
                        ms[-1].payload == b"offline") or
                        any(m.payload == b"offline" for m in ms))
    sub.close()
    late = Subscriber(any_broker.url, [device_topic(fleet_name, "dev-1", Leaf.STATUS),
                                       device_topic(fleet_name, "dev-1", Leaf.REPORTED)])
    assert late.wait_for(lambda ms: len(ms) >= 2), "status and reported state are retained"
    assert {m.retain for m in late.messages} == {True}
    assert late.on("/status")[-1].payload == b"offline"
    late.close()


def test_malformed_desired_state_is_dropped_and_reported(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_bundles: dict[str, Path], signing_keys: Keys, digit: np.ndarray) -> None:
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name, Leaf.EVENTS)])
    service = _service(mosquitto.url, fleet_name, tmp_path, digits_bundles["onnx"],
                       signing_keys)
    service.start()
    try:
        assert service.mqtt is not None and service.mqtt.wait_subscribed(10)
        desired = device_topic(fleet_name, "dev-1", Leaf.DESIRED)
        for bad in (b"{not json", b'{"schema_version": 1, "name": "x"}', b"[1, 2]",
                    b'{"schema_version": 7}'):
            sub.publish(desired, bad)
        assert sub.wait_for(lambda ms: len(ms) >= 4, timeout=10)
        details = [m.json()["detail"] for m in sub.messages]
        assert all(m.json()["kind"] == "payload_rejected" for m in sub.messages)
        assert any("not valid JSON" in d for d in details)
        assert any("schema_version 7" in d for d in details)
        assert next(iter(service.agent.predict(digit).values())).shape == (1, 10)
    finally:
        service.stop()
    sub.close()


def test_broker_outage_loses_no_telemetry(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_bundles: dict[str, Path], signing_keys: Keys, digit: np.ndarray) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.TELEMETRY)
    sub = Subscriber(mosquitto.url, [topic], client_id=f"{fleet_name}-sub", persistent=True)
    service = _service(mosquitto.url, fleet_name, tmp_path / "agent", digits_bundles["tflite"],
                       signing_keys)
    service.start()
    load = _Load(service.agent, digit)
    try:
        assert sub.wait_for(lambda ms: len(_seqs(ms)) >= 3)
        mosquitto.stop()
        before = load.count
        time.sleep(2.0)
        assert load.count - before > 100, "inference kept going while the broker was down"
        mosquitto.start()
        produced_after = service.reporter.seq + 5 if service.reporter else 0
        assert sub.wait_for(lambda ms: max(_seqs(ms), default=0) >= produced_after,
                            timeout=30)
    finally:
        load.stop()
        service.stop()
    seqs = sorted(set(_seqs(sub.messages)))
    assert seqs == list(range(seqs[0], seqs[-1] + 1)), "no point is missing"
    assert any(m.payload.startswith(b"[") for m in sub.messages), "the backlog came as batches"
    sub.close()


def test_outage_beyond_the_spool_bound_drops_the_oldest_and_says_so(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    topic = device_topic(fleet_name, "dev-1", Leaf.TELEMETRY)
    sub = Subscriber(mosquitto.url, [topic], client_id=f"{fleet_name}-sub", persistent=True)
    service = _service(mosquitto.url, fleet_name, tmp_path / "agent", digits_bundles["tflite"],
                       signing_keys, interval=0.05, spool_max_bytes=4096)
    service.start()
    try:
        assert sub.wait_for(lambda ms: len(_seqs(ms)) >= 3)
        last_before = max(_seqs(sub.messages))
        mosquitto.stop()
        time.sleep(2.0)
        mosquitto.start()
        assert service.reporter is not None
        target = service.reporter.seq + 5
        assert sub.wait_for(lambda ms: max(_seqs(ms), default=0) >= target, timeout=30)
    finally:
        service.stop()
    points = {p.values["seq"]: p.values for m in sub.messages if m.topic == topic
              for p in decode_telemetry(m.payload)}
    seqs = sorted(points)
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    dropped = points[seqs[-1]]["spool_dropped"]
    assert dropped > 0 and len(missing) == dropped
    assert missing == list(range(missing[0], missing[0] + len(missing))), "one block"
    assert missing[0] <= last_before + 2, "the oldest points of the outage went first"
    sub.close()
