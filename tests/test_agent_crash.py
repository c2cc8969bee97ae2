"""Crash safety: SIGKILL the agent in every state of an update and inside the download and
the switch; after a restart it always serves a working model and reports the truth."""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.payloads import DesiredState, ReportedState, decode, encode
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.agent.update import local
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, wait_for_port
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.http_files import FileServer
from tests.models import TrainedModels

STEP_DELAY = 0.8


@pytest.fixture(scope="module")
def www(digits_models: TrainedModels, signing_keys: Keys,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileServer, Path]]:
    root = tmp_path_factory.mktemp("www")
    make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0")
    make_bundle(digits_models.tflite, root / "v2.efb", signing_keys, "2.0.0", rows=32)
    server = FileServer(root)
    yield server, root
    server.stop()


class Device:
    """``edgefleet agent run`` as a real process on one data directory."""

    def __init__(self, data: Path, keys: Keys, broker: str, fleet: str) -> None:
        self.data, self.keys, self.broker, self.fleet = data, keys, broker, fleet
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, delay: float) -> None:
        env = {**os.environ, "EDGEFLEET_FAULT_STEP_DELAY": str(delay)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--data-dir", str(self.data),
             "--trusted-key", str(self.keys.public), "--broker", self.broker, "--fleet",
             self.fleet, "--device-id", "dev", "--http", f"127.0.0.1:{self.port}",
             "--telemetry-interval", "1", "--probation", "0.5", "--log-level", "WARNING"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for_port("127.0.0.1", self.port, 60), "agent did not come up"

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)

    def served_version(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("GET", "/v2/models/digits")
        meta = json.loads(conn.getresponse().read())
        name = meta["inputs"][0]["name"]
        body = json.dumps({"inputs": [{"name": name, "shape": [1, 8, 8, 1], "datatype": "FP32",
                                       "data": [0.0] * 64}]})
        conn.request("POST", "/v2/models/digits/infer", body)
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        return str(answer["model_version"])


def _update_events(sub: Subscriber) -> list[str]:
    return [m.json()["state"] for m in sub.on("/events") if m.json()["kind"] == "update"]


CASES = [(state, 0.0) for state in ("DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK",
                                    "SWITCHING", "PROBATION")]
RANDOM = random.Random(7)
CASES += [("DOWNLOADING", RANDOM.uniform(STEP_DELAY + 0.2, STEP_DELAY + 1.0)) for _ in range(2)]
CASES += [("SWITCHING", RANDOM.uniform(0.0, STEP_DELAY + 0.1))]


@pytest.mark.parametrize(("state", "after"), CASES,
                         ids=[f"{s}+{a:.2f}s" for s, a in CASES])
def test_killed_in_a_state_the_agent_restarts_serving_and_converges(
        state: str, after: float, www: tuple[FileServer, Path], mosquitto: MosquittoBroker,
        fleet_name: str, signing_keys: Keys, tmp_path: Path) -> None:
    server, root = www
    local.install(Agent(signing_keys.trusted), tmp_path, root / "v1.efb")
    device = Device(tmp_path, signing_keys, mosquitto.url, fleet_name)
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    inside_download = state == "DOWNLOADING" and after > 0
    server.faults.throttle_s = 0.1 if inside_download else 0.0  # ~1.3 s: land inside it
    server.faults.requests.clear()
    try:
        device.start(STEP_DELAY)
        bundle = read_bundle(root / "v2.efb", signing_keys.trusted)
        desired = DesiredState(name="digits", version="2.0.0", sha256=bundle.sha256,
                               url=server.url("v2.efb"), size=(root / "v2.efb").stat().st_size,
                               auto_commit=True)
        sub.publish(device_topic(fleet_name, "dev", Leaf.DESIRED), encode(desired), retain=True)
        assert sub.wait_for(lambda _: state in _update_events(sub), 60), _update_events(sub)
        time.sleep(after)
        device.kill()
        server.faults.throttle_s = 0.0
        if inside_download:
            assert list((tmp_path / "models" / "digits" / "downloads").glob("*.part")), \
                "killed inside the download"
        device.start(0.0)
        assert device.served_version() in ("1.0.0", "2.0.0"), "never without a model"

        def settled(_: object) -> bool:
            found = sub.on("/state/reported")
            last = decode(ReportedState, found[-1].payload) if found else None
            return bool(last and last.update.state == "COMMITTED" and last.active
                        and last.active.version == "2.0.0")

        assert sub.wait_for(settled, 60), _update_events(sub)
        assert device.served_version() == "2.0.0", "reported state tells the truth"
        if inside_download:
            assert any(r and r.startswith("bytes=") for r in server.faults.requests), \
                "the download resumed with Range"
        pointer = json.loads((tmp_path / "models" / "digits" / "slots.json").read_text())
        assert pointer["active"] == pointer["committed"]
    finally:
        device.stop()
        sub.close()
        server.faults.throttle_s = 0.0
