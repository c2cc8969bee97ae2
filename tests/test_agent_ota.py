"""Over-the-air updates on a real broker: download with resume, verify, switch, probation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.payloads import DesiredState, ReportedState, decode, encode
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import local
from edgefleet.agent.update.download import CHUNK, DownloadStats, fetch
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests import tamper
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.http_files import FileServer
from tests.models import TrainedModels


@pytest.fixture(scope="module")
def served(digits_models: TrainedModels, signing_keys: Keys,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileServer, Path]]:
    root = tmp_path_factory.mktemp("www")
    make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0")
    make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0", rows=64)
    server = FileServer(root)
    yield server, root
    server.stop()


def test_an_interrupted_download_resumes_with_range(served: tuple[FileServer, Path],
                                                    tmp_path: Path) -> None:
    server, root = served
    size = (root / "v2.efb").stat().st_size
    server.faults.cut_after, server.faults.cuts, server.faults.sent = 20_000, 2, 0
    server.faults.requests.clear()
    stats = DownloadStats()
    out = fetch(server.url("v2.efb"), tmp_path / "v2.efb", size, stats=stats, backoff_s=0.01)
    assert hashlib.sha256(out.read_bytes()).digest() == \
        hashlib.sha256((root / "v2.efb").read_bytes()).digest()
    assert server.faults.requests[0] is None
    assert server.faults.requests[1:] == ["bytes=20000-", "bytes=40000-"]
    assert stats.attempts == 3 and stats.resumed_from == 40_000
    assert server.faults.sent - size <= CHUNK, "at most one chunk is sent twice"


def _desired(root: Path, server: FileServer, name: str, keys: Keys,
             **extra: object) -> DesiredState:
    bundle = read_bundle(root / name, keys.trusted)
    return DesiredState(name=bundle.manifest.name, version=bundle.manifest.version,
                        sha256=bundle.sha256, url=server.url(name),
                        size=(root / name).stat().st_size, **extra)


@pytest.fixture()
def device(mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
           served: tuple[FileServer, Path], signing_keys: Keys) -> Iterator[AgentService]:
    _, root = served
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, root / "v1.efb")
    config = ServiceConfig(fleet=fleet_name, device_id="pi-1", data_dir=tmp_path,
                           broker_url=mosquitto.url, telemetry_interval_s=0.5,
                           probation_s=0.3)
    service = AgentService(config, agent)
    service.start()
    assert service.mqtt is not None and service.mqtt.wait_subscribed(10)
    yield service
    service.stop()


def _reported(sub: Subscriber) -> ReportedState | None:
    found = sub.on("/state/reported")
    return decode(ReportedState, found[-1].payload) if found else None


def _wait_state(sub: Subscriber, state: str, version: str, timeout: float = 30) -> ReportedState:
    def done(_: object) -> bool:
        r = _reported(sub)
        return bool(r and r.update.state == state and r.active and r.active.version == version)

    assert sub.wait_for(done, timeout), f"never reached {state} on {version}: {_reported(sub)}"
    reported = _reported(sub)
    assert reported is not None
    return reported


def test_ota_update_commits_then_the_fleet_rolls_it_back(
        device: AgentService, mosquitto: MosquittoBroker, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    server, root = served
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    desired = _desired(root, server, "v2.efb", signing_keys, auto_commit=True)
    topic = device_topic(fleet_name, "pi-1", Leaf.DESIRED)
    sub.publish(topic, encode(desired), retain=True)
    reported = _wait_state(sub, "COMMITTED", "2.0.0")
    assert reported.previous is not None and reported.previous.version == "1.0.0"
    events = [m.json() for m in sub.on("/events") if m.json()["kind"] == "update"]
    assert [e["state"] for e in events] == ["DOWNLOADING", "VERIFYING", "STAGED",
                                            "HEALTH_CHECK", "SWITCHING", "PROBATION",
                                            "COMMITTED"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    back = desired.model_copy(update={"action": "rollback"})
    sub.publish(topic, encode(back), retain=True)
    _wait_state(sub, "ROLLED_BACK", "1.0.0")
    assert device.agent.model is not None and device.agent.model.version == "1.0.0"
    sub.close()


def test_probation_waits_for_the_fleet_to_commit(
        device: AgentService, mosquitto: MosquittoBroker, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    server, root = served
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    desired = _desired(root, server, "v2.efb", signing_keys)
    topic = device_topic(fleet_name, "pi-1", Leaf.DESIRED)
    sub.publish(topic, encode(desired), retain=True)
    _wait_state(sub, "PROBATION", "2.0.0")
    assert not sub.wait_for(lambda _: (_reported(sub) or ReportedState(
        fleet="x", device="y", agent_version="0")).update.state == "COMMITTED", 1.0), \
        "no commit without the fleet"
    sub.publish(topic, encode(desired.model_copy(update={"action": "commit"})), retain=True)
    _wait_state(sub, "COMMITTED", "2.0.0")
    sub.close()


def test_a_corrupt_download_is_rejected_and_v1_keeps_serving(
        device: AgentService, mosquitto: MosquittoBroker, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys, tmp_path: Path) -> None:
    server, root = served
    raw = bytearray((root / "v2.efb").read_bytes())
    files = tamper.members(bytes(raw))
    model = bytearray(files["model.onnx"])
    model[200] ^= 0x40  # one flipped bit
    (root / "flipped.efb").write_bytes(tamper.with_member(root / "v2.efb", "model.onnx",
                                                          bytes(model)))
    good = _desired(root, server, "v2.efb", signing_keys)
    bad = good.model_copy(update={"url": server.url("flipped.efb"),
                                  "size": (root / "flipped.efb").stat().st_size})
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    sub.publish(device_topic(fleet_name, "pi-1", Leaf.DESIRED), encode(bad), retain=True)
    reported = _wait_state(sub, "FAILED", "1.0.0")
    assert "sha256 differs" in reported.update.detail
    assert device.agent.model is not None and device.agent.model.version == "1.0.0"
    pointer = device.config.data_dir / "models" / "digits" / "slots.json"
    assert json.loads(pointer.read_text())["active"] == "a"
    sub.close()


@pytest.mark.parametrize("damage", ["unknown-key", "bad-signature", "truncated"])
def test_a_bundle_that_does_not_verify_is_rejected(
        damage: str, device: AgentService, mosquitto: MosquittoBroker, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys, tmp_path: Path) -> None:
    from edgefleet.agent.protocol.signing import SigningKey, generate_keypair

    server, root = served
    good = _desired(root, server, "v2.efb", signing_keys)
    if damage == "unknown-key":
        other, _ = generate_keypair(tmp_path / "other", "other")
        raw = tamper.resigned(root / "v2.efb", SigningKey.load(other), lambda m: None)
        expected = "unknown key"
    elif damage == "bad-signature":  # signed by the trusted key, altered afterwards
        files = tamper.members((root / "v2.efb").read_bytes())
        files["manifest.json"] = files["manifest.json"].replace(b'"2.0.0"', b'"2.0.1"')
        raw = tamper.pack(files)
        expected = "does not verify"
    else:
        raw = (root / "v2.efb").read_bytes()[: (root / "v2.efb").stat().st_size // 2]
        expected = "bundle"
    (root / f"{damage}.efb").write_bytes(raw)
    bad = good.model_copy(update={"url": server.url(f"{damage}.efb"), "size": len(raw)})
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    sub.publish(device_topic(fleet_name, "pi-1", Leaf.DESIRED), encode(bad), retain=True)
    reported = _wait_state(sub, "FAILED", "1.0.0")
    assert expected in reported.update.detail
    assert device.agent.model is not None and device.agent.model.version == "1.0.0"
    sub.close()


def test_an_update_that_does_not_fit_on_disk_fails_before_downloading(
        device: AgentService, mosquitto: MosquittoBroker, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    import shutil

    server, root = served
    huge = _desired(root, server, "v2.efb", signing_keys).model_copy(
        update={"size": shutil.disk_usage(device.config.data_dir).free})
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    sub.publish(device_topic(fleet_name, "pi-1", Leaf.DESIRED), encode(huge), retain=True)
    reported = _wait_state(sub, "FAILED", "1.0.0")
    assert "not enough free disk" in reported.update.detail
    downloads = device.config.data_dir / "models" / "digits" / "downloads"
    assert not list(downloads.glob(f"{huge.sha256}*")), "nothing was fetched"
    sub.close()


def test_an_update_slower_than_the_latency_budget_is_refused_before_the_switch(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    server, root = served
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, root / "v1.efb")
    config = ServiceConfig(fleet=fleet_name, device_id="pi-1", data_dir=tmp_path,
                           broker_url=mosquitto.url, probation_s=0.3,
                           latency_budget_ms=1e-6)  # no model is this fast
    service = AgentService(config, agent)
    service.start()
    try:
        assert service.mqtt is not None and service.mqtt.wait_subscribed(10)
        sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
        desired = _desired(root, server, "v2.efb", signing_keys, auto_commit=True)
        sub.publish(device_topic(fleet_name, "pi-1", Leaf.DESIRED), encode(desired), retain=True)
        reported = _wait_state(sub, "FAILED", "1.0.0")
        assert "exceeds the budget" in reported.update.detail
        sub.close()
    finally:
        service.stop()


def test_a_rollback_sent_while_the_update_is_on_its_way_is_not_lost(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    """The fleet aborts while the device still downloads: the word waits for the probation
    (it used to queue behind the update, which then waited in probation for ever)."""
    server, root = served
    agent = Agent(signing_keys.trusted)
    local.install(agent, tmp_path, root / "v1.efb")
    service = AgentService(ServiceConfig(fleet=fleet_name, device_id="pi-2", data_dir=tmp_path,
                                         broker_url=mosquitto.url, probation_s=0.3,
                                         step_delay_s=0.3), agent)
    service.start()
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    try:
        desired = _desired(root, server, "v2.efb", signing_keys)  # the fleet's word commits
        topic = device_topic(fleet_name, "pi-2", Leaf.DESIRED)
        sub.publish(topic, encode(desired), retain=True)
        assert sub.wait_for(lambda _: any(m.json().get("state") == "DOWNLOADING"
                                          for m in sub.on("/events")), 30)
        sub.publish(topic, encode(desired.model_copy(update={"action": "rollback"})),
                    retain=True)
        _wait_state(sub, "ROLLED_BACK", "1.0.0")
        assert agent.model is not None and agent.model.version == "1.0.0"
    finally:
        sub.close()
        service.stop()
