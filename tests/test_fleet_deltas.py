"""Delta updates end to end: a real Mosquitto, the controller with its API, a real agent.

The controller offers a delta from the bundle the device reports to the one the rollout
sends; the device rebuilds the bundle from its own copy. A corrupted delta, a delta built
from another base, and a device whose base bundle was altered all end in the full
download and the right model, never in a wrong one."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.delta import build_delta
from edgefleet.agent.service import AgentService
from edgefleet.agent.update.layout import model_dir
from edgefleet.agent.update.slots import SlotStore
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.models import TrainedModels
from tests.test_fleet_metrics import metrics_text


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("delta-fleet")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.tflite, root / "v2.efb", signing_keys, "1.0.1"),
            "other": make_bundle(digits_models.onnx, root / "o.efb", signing_keys, "0.9.0")}


def _model_dir(fleet: Fleet) -> Path:
    """The device's folder of the digits model (one folder a model: agent/update/layout.py)."""
    return model_dir(fleet.root / "devices" / "cam-0", "digits")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _state(fleet: Fleet, device: str) -> dict[str, Any]:
    found: dict[str, Any] = next((d for d in fleet.client().get("/api/v1/devices")
                                  if d["id"] == device), {})  # {} until it registers
    return found


def _setup(fleet: Fleet, versions: dict[str, Path]) -> tuple[AgentService, str, str]:
    client = fleet.start_controller()
    service = fleet.add_agent("cam-0", versions["v1"])
    wait_until(lambda: (_state(fleet, "cam-0").get("active") or {}).get("version") == "1.0.0",
               30, what="cam-0 registered on 1.0.0")
    client.post("/api/v1/devices/group", {"devices": ["cam-0"], "group": "cams"})
    for name in ("v1", "v2"):  # a delta needs the base's bytes on the controller too
        client.upload("/api/v1/models", versions[name].read_bytes())
    return (service, read_bundle(versions["v1"], fleet.keys.trusted).sha256,
            read_bundle(versions["v2"], fleet.keys.trusted).sha256)


def _roll_out(fleet: Fleet) -> None:
    rollout = fleet.client().post("/api/v1/rollouts", {
        "model": "digits:1.0.1", "selectors": ["group:cams"], "device_timeout_s": 60,
        "soak_s": 0.5})
    done = wait_until(lambda: (r := fleet.client().get(f"/api/v1/rollouts/{rollout['id']}"))
                      ["state"] in ("SUCCEEDED", "ABORTED") and r, 90, what="rollout end")
    assert done["state"] == "SUCCEEDED", done["reason"]
    wait_until(lambda: _state(fleet, "cam-0")["update_state"] == "COMMITTED", 30)
    assert _state(fleet, "cam-0")["active"]["version"] == "1.0.1"


def test_a_rollout_sends_a_delta_and_the_device_rebuilds_the_bundle(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    service, v1, v2 = _setup(fleet, versions)
    _roll_out(fleet)
    assert service.updates is not None
    effects = service.updates.effects
    assert (effects.deltas.used, effects.deltas.fallbacks) == (1, 0), \
        effects.deltas.last_fallback
    size = versions["v2"].stat().st_size
    assert 0 < effects.stats.received < size // 10, "the delta, not the bundle, came"
    assert fleet.controller is not None and fleet.api is not None
    delta = fleet.controller.deltas.folder / f"{v1}-{v2}.zst"
    request = urllib.request.Request(f"{fleet.api.url}/deltas/{v1}-{v2}",
                                     headers={"Range": "bytes=10-"})
    with urllib.request.urlopen(request, timeout=10) as response:  # the bundles' Range code
        assert response.status == 206
        assert response.read() == delta.read_bytes()[10:]
    assert effects.deltas.delta_bytes == delta.stat().st_size
    expected = {"bundle": 0, "delta": 2 * delta.stat().st_size - 10}  # the device's, ours
    wait_until(lambda: _served(fleet) == expected, 30,  # counted once the response is sent
               what=f"bytes served {expected}, seen {_served(fleet)}")


def _served(fleet: Fleet) -> dict[str, float]:
    return {s.labels["kind"]: s.value for family in text_string_to_metric_families(
        metrics_text(fleet)) for s in family.samples if s.name == "edgefleet_bytes_served_total"}


def _corrupt(fleet: Fleet, versions: dict[str, Path], v1: str, v2: str) -> None:
    """The delta is built and offered, then its bytes change on the controller's disk."""
    assert fleet.controller is not None
    record = fleet.controller.deltas.record(v1, v2)
    assert record is not None and record.usable
    path = fleet.controller.deltas.folder / f"{v1}-{v2}.zst"
    data = path.read_bytes()
    path.write_bytes(data[:20] + bytes(b ^ 0x5A for b in data[20:60]) + data[60:])


def _wrong_base(fleet: Fleet, versions: dict[str, Path], v1: str, v2: str) -> None:
    """The controller's record says the delta applies to v1; it was built from another
    bundle (its sha256 and size are the record's, so only applying it can tell)."""
    assert fleet.controller is not None
    folder = fleet.controller.deltas.folder
    folder.mkdir(parents=True, exist_ok=True)
    new = versions["v2"].read_bytes()
    delta = build_delta(versions["other"].read_bytes(), new)
    (folder / f"{v1}-{v2}.zst").write_bytes(delta)
    (folder / f"{v1}-{v2}.json").write_text(json.dumps({
        "base_file": _sha(versions["v1"].read_bytes()), "result_file": _sha(new),
        "full_size": len(new), "sha256": _sha(delta), "size": len(delta)}))


def _altered_base(fleet: Fleet, versions: dict[str, Path], v1: str, v2: str) -> None:
    """The device's own copy of v1 changed on its disk after it was installed."""
    base = SlotStore(_model_dir(fleet)).active_bundle()
    assert base is not None
    base.write_bytes(base.read_bytes() + b"\0" * 1024)


def _poisoned_record(fleet: Fleet, versions: dict[str, Path], v1: str, v2: str) -> None:
    """The controller trusts a record whose delta rebuilds another file of v2's size (a
    byte changed): every check of the delta passes, the bundle's verification does not."""
    from edgefleet.fleet.deltas import DeltaRecord

    assert fleet.controller is not None
    shelf = fleet.controller.deltas
    shelf.folder.mkdir(parents=True, exist_ok=True)
    poisoned = bytearray(versions["v2"].read_bytes())
    poisoned[len(poisoned) // 2] ^= 0xFF
    delta = build_delta(versions["v1"].read_bytes(), bytes(poisoned))
    (shelf.folder / f"{v1}-{v2}.zst").write_bytes(delta)
    shelf._records[(v1, v2)] = DeltaRecord(  # past the controller's own check of the record
        base_file=_sha(versions["v1"].read_bytes()), result_file=_sha(bytes(poisoned)),
        full_size=len(poisoned), sha256=_sha(delta), size=len(delta))


def test_a_poisoned_delta_record_on_disk_is_built_again_by_the_controller(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    service, v1, v2 = _setup(fleet, versions)
    _poisoned_record(fleet, versions, v1, v2)
    assert fleet.controller is not None
    shelf = fleet.controller.deltas
    record = shelf._records.pop((v1, v2))  # as a restarted controller finds it on disk
    (shelf.folder / f"{v1}-{v2}.json").write_text(json.dumps(dataclasses.asdict(record)))
    _roll_out(fleet)
    assert service.updates is not None
    effects = service.updates.effects
    assert (effects.deltas.used, effects.deltas.fallbacks) == (1, 0), \
        effects.deltas.last_fallback


@pytest.mark.parametrize("spoil", [_corrupt, _wrong_base, _altered_base, _poisoned_record],
                         ids=["corrupted delta", "delta for the wrong base", "altered base",
                              "poisoned record"])
def test_a_delta_that_cannot_be_used_ends_in_the_full_download_and_the_right_model(
        spoil: Any, fleet: Fleet, versions: dict[str, Path]) -> None:
    service, v1, v2 = _setup(fleet, versions)
    spoil(fleet, versions, v1, v2)
    _roll_out(fleet)
    assert service.updates is not None
    effects = service.updates.effects
    assert (effects.deltas.used, effects.deltas.fallbacks) == (0, 1)
    assert effects.stats.received >= versions["v2"].stat().st_size, "the full bundle came"
    model = service.agent.model
    assert model is not None and model.version == "1.0.1"
    assert read_bundle(SlotStore(_model_dir(fleet)).active_bundle() or Path(),
                       fleet.keys.trusted).sha256 == v2
