"""``edgefleet demo``: the product on one machine, on the embedded digits model.

Packages the embedded model into signed bundles, starts a broker (Mosquitto
when installed, else the embedded one), starts a few simulated devices that
serve the bundle over HTTP and report over MQTT, sends them real requests, and
shows the telemetry the fleet sees. Rollouts and rollback join it with the
fleet controller.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.core import Agent
from agent.mqtt import MqttClient, parse_broker_url
from agent.protocol.payloads import decode_telemetry
from agent.protocol.signing import SigningKey, TrustedKeys, generate_keypair
from agent.protocol.topics import Leaf, fleet_filter, parse_topic
from agent.runtime import load_runtime
from agent.service import AgentService, ServiceConfig
from converter.package import PackageSpec, package_model
from fleet.mosquitto import MosquittoBroker, MosquittoMissingError, find_mosquitto, free_port

__all__ = ["DemoResult", "run_demo"]

ASSETS = Path(__file__).resolve().parent / "demo_assets"
FLEET = "demo"


@dataclass(frozen=True)
class DemoResult:
    broker: str
    devices: list[dict[str, Any]]
    accuracy: float

    def as_dict(self) -> dict[str, Any]:
        return {"broker": self.broker, "accuracy": self.accuracy, "devices": self.devices}


class TelemetryCollector:
    """Keeps the latest telemetry point of every device of a fleet."""

    def __init__(self, url: str) -> None:
        host, port = parse_broker_url(url)
        self.latest: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._client = MqttClient(f"edgefleet-demo-{port}", host, port)
        self._client.subscribe(fleet_filter(FLEET, Leaf.TELEMETRY), self._message)
        self._client.start()

    def _message(self, topic: str, payload: bytes) -> None:
        device = parse_topic(topic).device
        for point in decode_telemetry(payload):
            with self._lock:
                self.latest[device] = point.values

    def close(self) -> None:
        self._client.stop()


@contextmanager
def _broker(workdir: Path) -> Iterator[str]:
    try:
        find_mosquitto()
    except MosquittoMissingError:
        from agent.broker import EmbeddedBroker

        with EmbeddedBroker(port=free_port()) as embedded:
            yield embedded.url
        return
    with MosquittoBroker(workdir=workdir / "mosquitto") as mosquitto:
        yield mosquitto.url


def _bundle(workdir: Path, fmt: str, key: Path) -> Path:
    model = ASSETS / f"digits.{fmt}"
    sample = np.load(ASSETS / "digits-sample.npz")["x"][:8]
    name = load_runtime(model.read_bytes(), fmt).inputs[0].name
    spec = PackageSpec("digits", "1.0.0", {name: sample}, task="classification",
                       labels=tuple(str(i) for i in range(10)))
    return package_model(model, workdir / f"digits-{fmt}.efb", spec, SigningKey.load(key))


def run_demo(devices: int = 3, requests: int = 100, workdir: Path | None = None) -> DemoResult:
    """Run the one-machine demo and return what the fleet saw."""
    with ExitStack() as stack:
        work = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        secret, public = generate_keypair(work / "keys", "demo")
        bundles = [_bundle(work, fmt, secret) for fmt in ("tflite", "onnx")]
        url = stack.enter_context(_broker(work))
        collector = TelemetryCollector(url)
        stack.callback(collector.close)
        services = []
        for i in range(devices):
            agent = Agent(TrustedKeys.from_paths([public]))
            agent.load(bundles[i % len(bundles)])
            config = ServiceConfig(fleet=FLEET, device_id=f"device-{i + 1}",
                                   data_dir=work / f"device-{i + 1}", broker_url=url,
                                   http_port=free_port(), telemetry_interval_s=0.5,
                                   profile="generic-x86_64")
            service = AgentService(config, agent)
            service.start()
            stack.callback(service.stop)
            services.append(service)
        accuracy = _send_requests(services, requests)
        _wait_for(lambda: all(collector.latest.get(s.config.device_id, {}).get("inferences_total")
                              for s in services))
        rows = [_row(s.config.device_id, collector.latest.get(s.config.device_id, {}))
                for s in services]
        return DemoResult(url, rows, accuracy)


def _send_requests(services: list[AgentService], count: int) -> float:
    import http.client
    import json

    data = np.load(ASSETS / "digits-sample.npz")
    x, y = data["x"], data["y"]
    correct = 0
    for i in range(count):
        service = services[i % len(services)]
        assert service.http is not None and service.agent.model is not None
        name = service.agent.model.runtime.inputs[0].name
        body = json.dumps({"inputs": [{"name": name, "shape": [1, 8, 8, 1], "datatype": "FP32",
                                       "data": x[i % len(x)].reshape(-1).tolist()}]})
        conn = http.client.HTTPConnection("127.0.0.1", service.http.port, timeout=10)
        conn.request("POST", "/v2/models/digits/infer", body)
        probs = json.loads(conn.getresponse().read())["outputs"][0]["data"]
        conn.close()
        correct += int(int(np.argmax(probs)) == int(y[i % len(y)]))
    return correct / count


def _wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.1)


def _row(device: str, values: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "model_version", "inferences_total", "latency_p50_ms", "latency_p95_ms",
            "cpu_percent", "rss_bytes", "spool_dropped")
    return {"device": device, **{k: values.get(k) for k in keys}}
