"""Simulated devices take deltas as the agent does: on a real Mosquitto, from the real
controller (or a plain file server), rebuilt by the agent's code, counted in bytes.

A device that serves the delta's base downloads only the delta; a device whose base the
controller does not hold, or the device does not hold, downloads the full bundle, and so
does a device told not to use deltas and one given a corrupted delta."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.delta import build_delta
from edgefleet.agent.protocol.payloads import DeltaRef, DesiredState, encode
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.fleet.mosquitto import MosquittoBroker
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.http_files import FileServer
from tests.models import TrainedModels

FAST = dict(telemetry_interval_s=0.2, request_rate=200.0, connect_rate=1000.0)


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 and v2 of the digits model; v0, a bundle the controller is never given."""
    root = tmp_path_factory.mktemp("sim-deltas")
    return {v: make_bundle(digits_models.tflite, root / f"{v}.efb", signing_keys, version)
            for v, version in (("v0", "0.9.0"), ("v1", "1.0.0"), ("v2", "1.0.1"))}


@pytest.fixture()
def sims() -> Iterator[list[SimulatedFleet]]:
    started: list[SimulatedFleet] = []
    yield started
    for sim in started:
        sim.stop()


def _start(sims: list[SimulatedFleet], broker: MosquittoBroker, fleet: str, count: int,
           keys: Keys, initial: Path, **options: Any) -> SimulatedFleet:
    sim = SimulatedFleet(broker.url, fleet, count, keys.trusted,
                         SimOptions(**{**FAST, **options}), initial)
    sims.append(sim.start())
    assert sim.wait_until(lambda d: all(v.online for v in d.values()), 10)
    return sim


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_devices_on_the_base_take_the_controllers_delta_one_on_an_unknown_base_the_bundle(
        fleet: Fleet, mosquitto: MosquittoBroker, fleet_name: str, signing_keys: Keys,
        sims: list[SimulatedFleet], versions: dict[str, Path]) -> None:
    client = fleet.start_controller()
    for name in ("v1", "v2"):  # never v0: the controller cannot offer a delta from it
        client.upload("/api/v1/models", versions[name].read_bytes())
    on_base = _start(sims, mosquitto, fleet_name, 4, signing_keys, versions["v1"],
                     device_prefix="base-")
    unknown = _start(sims, mosquitto, fleet_name, 1, signing_keys, versions["v0"],
                     device_prefix="other-")
    ids = [*on_base.devices, *unknown.devices]
    wait_until(lambda: sum(bool(d["active"]) for d in client.get("/api/v1/devices")) == 5, 30,
               what="5 devices registered with their bundle")
    client.post("/api/v1/devices/group", {"devices": ids, "group": "sims"})
    rollout = client.post("/api/v1/rollouts", {"model": "digits:1.0.1", "selectors":
                                               ["group:sims"], "soak_s": 0.5,
                                               "device_timeout_s": 60})
    done = wait_until(lambda: (r := client.get(f"/api/v1/rollouts/{rollout['id']}"))
                      ["state"] in ("SUCCEEDED", "ABORTED") and r, 90, what="rollout end")
    assert done["state"] == "SUCCEEDED", done["reason"]
    for sim in (on_base, unknown):
        assert all(v.active_version == "1.0.1" for v in sim.devices.values()), sim.devices

    v1, v2 = (read_bundle(versions[v], fleet.keys.trusted).sha256 for v in ("v1", "v2"))
    assert fleet.controller is not None
    record = fleet.controller.deltas.record(v1, v2)
    assert record is not None and record.usable
    full = versions["v2"].stat().st_size
    assert on_base.downloads.received == {"bundle": 0, "delta": 4 * record.size}
    stats = on_base.deltas.stats
    assert (stats.used, stats.fallbacks) == (4, 0), stats.last_fallback
    assert unknown.downloads.received == {"bundle": full, "delta": 0}
    assert unknown.deltas.stats.used == 0
    expected = {"bundle": full, "delta": 4 * record.size}
    wait_until(lambda: fleet.controller is not None
               and fleet.controller.bytes_served == expected, 30,
               what=f"the controller's bytes served {expected}")


# --- offers made by hand, the bundle and the delta on a plain file server ---------------

@pytest.fixture()
def served(versions: dict[str, Path], tmp_path: Path) -> Iterator[tuple[FileServer, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    for name in ("v0", "v1", "v2"):
        shutil.copy(versions[name], root / f"{name}.efb")
    (root / "v1-v2.zst").write_bytes(build_delta(versions["v1"].read_bytes(),
                                                 versions["v2"].read_bytes()))
    (root / "v0-v2.zst").write_bytes(build_delta(versions["v0"].read_bytes(),
                                                 versions["v2"].read_bytes()))
    corrupt = bytearray((root / "v1-v2.zst").read_bytes())
    corrupt[-8] ^= 0xFF
    (root / "corrupt.zst").write_bytes(bytes(corrupt))
    server = FileServer(root)
    yield server, root
    server.stop()


def _offer(served: tuple[FileServer, Path], keys: Keys, delta: str, base: str) -> DesiredState:
    server, root = served
    target = root / "v2.efb"
    bundle = read_bundle(target, keys.trusted)
    patch = root / delta
    return DesiredState(name=bundle.manifest.name, version=bundle.manifest.version,
                        sha256=bundle.sha256, url=server.url("v2.efb"),
                        size=target.stat().st_size,
                        delta=DeltaRef(url=server.url(delta), sha256=_sha(patch),
                                       size=patch.stat().st_size, base=_sha(root / base),
                                       result=_sha(target)))


def _send_and_wait(sim: SimulatedFleet, mosquitto: MosquittoBroker, fleet: str,
                   desired: DesiredState) -> None:
    publisher = Subscriber(mosquitto.url, [fleet_filter(fleet)])
    try:
        for device in sim.devices:
            publisher.publish(device_topic(fleet, device, Leaf.DESIRED), encode(desired),
                              retain=True)
    finally:
        publisher.close()
    assert sim.wait_until(lambda d: all(v.update_state == "PROBATION"
                                        and v.active_version == "1.0.1"
                                        for v in d.values()), 20), sim.devices


@pytest.mark.parametrize(("delta", "base", "options", "received", "reasons"), [
    ("v1-v2.zst", "v1.efb", {}, "delta", {}),
    ("v0-v2.zst", "v0.efb", {}, "bundle", {"DeltaError": 2}),
    ("corrupt.zst", "v1.efb", {}, "both", {"DeltaError": 2}),
    ("v1-v2.zst", "v1.efb", {"deltas": False}, "bundle", {}),
], ids=["the device's base", "a base the device does not hold", "a corrupted delta",
        "deltas off"])
def test_an_offered_delta_is_used_only_when_it_applies_to_the_devices_own_bundle(
        delta: str, base: str, options: dict[str, Any], received: str,
        reasons: dict[str, int], mosquitto: MosquittoBroker, fleet_name: str,
        signing_keys: Keys, sims: list[SimulatedFleet],
        served: tuple[FileServer, Path]) -> None:
    sim = _start(sims, mosquitto, fleet_name, 2, signing_keys, served[1] / "v1.efb", **options)
    _send_and_wait(sim, mosquitto, fleet_name, _offer(served, signing_keys, delta, base))
    root = served[1]
    full, patch = (root / "v2.efb").stat().st_size, (root / delta).stat().st_size
    expected = {"delta": {"bundle": 0, "delta": 2 * patch},
                "bundle": {"bundle": 2 * full, "delta": 0},
                "both": {"bundle": 2 * full, "delta": 2 * patch}}[received]
    assert sim.downloads.received == expected
    stats = sim.deltas.stats
    assert dict(stats.reasons) == reasons
    assert stats.used == (2 if received == "delta" else 0)
