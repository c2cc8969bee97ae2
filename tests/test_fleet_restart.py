"""A controller killed mid-rollout resumes from its store, and no device is updated twice.

The controller runs as a real process (``edgefleet fleet serve``) on SQLite; the devices
are real agents in this process on a private Mosquitto. What a device did is read from
its own ``events`` topic, not from the controller: a second update would show there as
a second DOWNLOADING of the same version.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.protocol.payloads import BundleRef, DesiredState, Event, decode
from edgefleet.agent.protocol.topics import Leaf, fleet_filter, parse_topic
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.errors import ConflictError
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, stop_process, wait_for_port
from edgefleet.fleet.rollout.spec import RolloutSpec, Selector, Wave
from edgefleet.fleet.rollout.state import ACTIVE, DeviceState, Rollout, RolloutDevice, RolloutState
from edgefleet.fleet.store import open_store
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.models import TrainedModels

SECRET = "ops-restart-secret"


@dataclass
class ControllerProcess:
    """``edgefleet fleet serve`` as a child process on one SQLite file and data dir."""

    fleet: str
    broker_url: str
    root: Path
    keys: Keys
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def db(self) -> Path:
        return self.root / "fleet.db"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / f"controller-{self.starts}.log"

    def start(self) -> FleetClient:
        self.starts += 1
        argv = [sys.executable, "-m", "edgefleet", "fleet", "serve", "--fleet", self.fleet,
                "--broker", self.broker_url, "--db", f"sqlite:///{self.db}",
                "--data-dir", str(self.root / "data"), "--http", f"127.0.0.1:{self.port}",
                "--trusted-key", str(self.keys.public), "--token", f"ops={SECRET}",
                "--tick", "0.2", "--verbose"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        if not wait_for_port("127.0.0.1", self.port, 30):
            self.stop()
            raise AssertionError(f"the controller did not listen:\n{self.log.read_text()}")
        return FleetClient(self.url, SECRET)

    def kill(self) -> None:
        """SIGKILL by PID: a crash, no clean shutdown."""
        process, self.process = self.process, None
        stop_process(process, signal.SIGKILL)

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process, signal.SIGTERM)

    def stored_rollout(self, rollout_id: str) -> Rollout:
        store = open_store(f"sqlite:///{self.db}")
        try:
            found = store.rollout(rollout_id)
        finally:
            store.close()
        assert found is not None, f"rollout {rollout_id} is not in {self.db}"
        return found


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("restart-bundles")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0")}


@pytest.fixture()
def controller(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
               signing_keys: Keys) -> Iterator[ControllerProcess]:
    process = ControllerProcess(fleet_name, mosquitto.url, tmp_path / "controller",
                                signing_keys)
    process.root.mkdir()
    yield process
    process.stop()


@pytest.fixture()
def devices(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
            signing_keys: Keys) -> Iterator[Fleet]:
    """Real agents only: the controller is the child process above."""
    harness = Fleet(fleet_name, mosquitto.url, tmp_path, signing_keys)
    yield harness
    harness.stop()


def _on_v1_in_group(client: FleetClient, devices: Fleet, v1: Path, ids: list[str],
                    group: str) -> None:
    for device in ids:
        devices.add_agent(device, v1, traffic=False)

    def registered() -> bool:
        known = {d["id"]: d for d in client.get("/api/v1/devices")}
        return all(i in known and known[i]["active"] and known[i]["active"]["version"]
                   == "1.0.0" for i in ids)

    wait_until(registered, 30, what="devices registered on v1")
    client.post("/api/v1/devices/group", {"devices": ids, "group": group})


def _touched(rollout: dict[str, Any]) -> int:
    return sum(1 for d in rollout["devices"] if d["state"] != "PENDING")


def _updates(events: Subscriber, version: str) -> dict[str, list[str]]:
    """Each device's update states for ``version``, in order, each event counted once
    (QoS 1 may deliver one twice; its ``seq`` says so)."""
    seen: set[tuple[str, int]] = set()
    states: dict[str, list[str]] = {}
    for message in events.on(Leaf.EVENTS.value):
        device = parse_topic(message.topic).device
        event = decode(Event, message.payload)
        if event.kind != "update" or event.bundle is None or event.bundle.version != version:
            continue
        if (device, event.seq) not in seen:
            seen.add((device, event.seq))
            states.setdefault(device, []).append(str(event.state))
    return states


def _serving(devices: Fleet, device: str) -> str | None:
    model = devices.agents[device].agent.model
    return model.version if model is not None else None


@pytest.mark.faults
def test_a_controller_killed_mid_rollout_resumes_and_updates_no_device_twice(
        controller: ControllerProcess, devices: Fleet, versions: dict[str, Path],
        mosquitto: MosquittoBroker) -> None:
    ids = [f"cam-{i}" for i in range(4)]
    client = controller.start()
    _on_v1_in_group(client, devices, versions["v1"], ids, "cams")
    events = Subscriber(mosquitto.url, [fleet_filter(controller.fleet, Leaf.EVENTS)])
    try:
        client.upload("/api/v1/models", versions["v2"].read_bytes())
        rollout = client.post("/api/v1/rollouts", {
            "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["1", "100%"],
            "rate_per_min": 20, "soak_s": 0.5, "device_timeout_s": 60})
        # canary done, the second wave has sent its first bundle; 3 s until the next one
        wait_until(lambda: _touched(client.get(f"/api/v1/rollouts/{rollout['id']}")) >= 2,
                   30, every=0.05, what="the second wave to start")
        controller.kill()

        stored = controller.stored_rollout(rollout["id"])
        touched = [d for d in stored.devices.values() if d.state != DeviceState.PENDING]
        assert stored.state == RolloutState.RUNNING
        assert 2 <= len(touched) < len(ids), stored.counts()
        assert any(d.state in ACTIVE for d in touched), stored.counts()  # one on its way

        client = controller.start()
        done = wait_until(lambda: (r := client.get(f"/api/v1/rollouts/{rollout['id']}"))
                          ["state"] not in ("RUNNING", "PENDING") and r, 60,
                          what="the rollout to end after the restart")
        assert done["state"] == "SUCCEEDED", done["reason"]
        assert {d["state"] for d in done["devices"]} == {"SUCCEEDED"}

        assert events.wait_for(lambda _: all(
            _updates(events, "2.0.0").get(i, [])[-1:] == ["COMMITTED"] for i in ids), 10)
        updates = _updates(events, "2.0.0")
        assert {i: Counter(updates[i])["DOWNLOADING"] for i in ids} == dict.fromkeys(ids, 1)
        assert {i: updates[i][-1] for i in ids} == dict.fromkeys(ids, "COMMITTED")
        assert {i: _serving(devices, i) for i in ids} == dict.fromkeys(ids, "2.0.0")
    finally:
        events.close()


@pytest.mark.parametrize("crash", [False, True], ids=["running", "after-a-crash"])
def test_a_second_rollout_over_devices_a_running_one_holds_is_refused_naming_it(
        controller: ControllerProcess, devices: Fleet, versions: dict[str, Path],
        crash: bool) -> None:
    client = controller.start()
    _on_v1_in_group(client, devices, versions["v1"], ["cam-0", "cam-1"], "cams")
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    slow = {"model": "digits:2.0.0", "waves": ["1", "100%"], "rate_per_min": 1,
            "soak_s": 60, "device_timeout_s": 60}
    holder = client.post("/api/v1/rollouts", {**slow, "selectors": ["group:cams"]})
    assert holder["state"] == "RUNNING"
    if crash:
        controller.kill()
        client = controller.start()
    with pytest.raises(ConflictError, match=f"rollout {holder['id']}, which is still running"):
        client.post("/api/v1/rollouts", {**slow, "selectors": ["device:cam-1"]})
    rollouts = client.get("/api/v1/rollouts")
    assert [r["id"] for r in rollouts] == [holder["id"]]


@pytest.mark.parametrize("later", ["r-a", "r-b"])
def test_after_a_restart_a_device_two_rollouts_wait_on_hears_the_later_word(
        tmp_path: Path, signing_keys: Keys, later: str) -> None:
    """A device in two rollouts' lists (the first one finished, still following it; the
    second sent it a bundle since): the restarted controller repeats only the word it sent
    last, whatever order the store lists the rollouts in."""
    config = ControllerConfig(fleet="f", broker_url="mqtt://127.0.0.1:1",
                              data_dir=tmp_path / "controller",
                              public_url="http://127.0.0.1:1", trusted=signing_keys.trusted)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    now = int(time.time() * 1000)
    for rollout_id, sha, patch in (("r-a", "a", 1), ("r-b", "b", 2)):
        spec = RolloutSpec(model=BundleRef(name="digits", version=f"1.0.{patch}", sha256=sha * 64),
                           url="http://x/b.efb", size=10, selectors=(Selector("device", "d1"),),
                           waves=(Wave(100.0, True),))
        sent = now - (1_000 if rollout_id == later else 5_000)
        item = RolloutDevice("d1", wave=0, state=DeviceState.TARGETED, since_ms=sent,
                             targeted_ms=sent, sent_ms=sent)
        store.save_rollout(Rollout(id=rollout_id, spec=spec, state=RolloutState.RUNNING,
                                   created_ms=now - 9_000, updated_ms=now,
                                   devices={"d1": item}))
    controller = FleetController(config, store)
    controller.runner.load()
    desired = decode(DesiredState, controller.outbox["d1"])
    assert desired.rollout == later and desired.action == "install"
    store.close()
