"""The controller with real agents on a real Mosquitto: registry, pushes, rollouts, gates,
rollback, compatibility, audit. Models are the digits CNN; a second one, trained on
shifted labels, is the bad version the agreement gate must stop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgefleet.fleet.errors import AuthError, ConflictError, NotFoundError
from tests import tamper
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, wait_until
from tests.models import TrainedModels, train_digits_cnn


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fleet-bundles")
    shifted = train_digits_cnn(root / "shifted", epochs=8, label_shift=3)
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0"),
            "bad": make_bundle(shifted.tflite, root / "v3.efb", signing_keys, "3.0.0",
                               rows=4)}


def _devices(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in fleet.client().get("/api/v1/devices")}


def _running(fleet: Fleet, version: str, ids: list[str]) -> bool:
    devices = _devices(fleet)
    return all(devices.get(i, {}).get("active") and devices[i]["active"]["version"] == version
               and devices[i]["update_state"] in ("COMMITTED", "IDLE", "ROLLED_BACK")
               for i in ids)


def _rollout(fleet: Fleet, rollout_id: str, *states: str) -> dict[str, Any] | None:
    data: dict[str, Any] = fleet.client().get(f"/api/v1/rollouts/{rollout_id}")
    return data if data["state"] in states else None


def _create(fleet: Fleet, model: str, **options: Any) -> dict[str, Any]:
    body = {"model": model, "selectors": ["group:cams"], "waves": ["1", "100%"],
            "device_timeout_s": 60, "soak_s": 0.5, **options}
    data: dict[str, Any] = fleet.client().post("/api/v1/rollouts", body)
    return data


def _setup(fleet: Fleet, versions: dict[str, Path], count: int = 3) -> list[str]:
    client = fleet.start_controller()
    ids = [f"cam-{i}" for i in range(count)]
    for device in ids:
        fleet.add_agent(device, versions["v1"])
    wait_until(lambda: _running(fleet, "1.0.0", ids), 30, what="devices registered on v1")
    client.post("/api/v1/devices/group", {"devices": ids, "group": "cams"})
    for name in ("v2", "bad"):
        client.upload("/api/v1/models", versions[name].read_bytes())
    return ids


def test_devices_register_themselves_with_what_they_run(fleet: Fleet,
                                                       versions: dict[str, Path]) -> None:
    fleet.start_controller()
    fleet.add_agent("cam-0", versions["v1"], profile="raspberry-pi-4", traffic=False)
    # its status can come before its reported state: wait for what the device reports
    device = wait_until(lambda: (d := _devices(fleet).get("cam-0")) and d.get("active") and d,
                        30, what="registration")
    assert device["online"] is True and device["profile"] == "raspberry-pi-4"
    assert device["active"]["version"] == "1.0.0" and "litert" in device["runtimes"]
    fleet.agents.pop("cam-0").stop()
    wait_until(lambda: not _devices(fleet)["cam-0"]["online"], 15, what="offline status")
    store = fleet.store
    assert store is not None
    stored = wait_until(lambda: (d := store.device("cam-0")) and not d.online and d, 10,
                        what="the registry written to the store")
    assert stored.active.version == "1.0.0"


def test_push_verifies_the_bundle_and_refuses_conflicts(
        fleet: Fleet, versions: dict[str, Path], digits_models: TrainedModels,
        tmp_path: Path) -> None:
    client = fleet.start_controller()
    first = client.upload("/api/v1/models", versions["v2"].read_bytes())
    again = client.upload("/api/v1/models", versions["v2"].read_bytes())
    assert first["added"] is True and again["added"] is False
    model = tamper.members(versions["v1"].read_bytes())["model.tflite"]
    corrupt = tamper.with_member(versions["v1"], "model.tflite", model[:-1] + b"x")
    with pytest.raises(Exception, match="sha256"):
        client.upload("/api/v1/models", corrupt)
    other = make_bundle(digits_models.tflite, tmp_path / "other.efb", fleet.keys, "2.0.0",
                        rows=3)
    with pytest.raises(ConflictError, match="2.0.0"):
        client.upload("/api/v1/models", other.read_bytes())
    with pytest.raises(AuthError, match="not known"):
        fleet.client("wrong-token-123").get("/api/v1/models")
    with pytest.raises(NotFoundError, match="digits:9.9.9"):
        client.post("/api/v1/rollouts", {"model": "digits:9.9.9", "selectors": ["group:x"]})
    history = client.get("/api/v1/history")
    assert [(e["action"], e["outcome"]) for e in history][:3] == [
        ("model.push", "refused"), ("model.push", "refused"), ("model.push", "ok")]
    assert history[0]["actor"] == "alice"


def test_a_rollout_goes_canary_first_then_everyone_and_commits(fleet: Fleet,
                                                              versions: dict[str, Path]) -> None:
    ids = _setup(fleet, versions)
    rollout = _create(fleet, "digits:2.0.0")
    assert rollout["state"] == "RUNNING"
    assert [d["state"] for d in rollout["devices"]].count("TARGETED") == 1
    done = wait_until(lambda: _rollout(fleet, rollout["id"], "SUCCEEDED", "ABORTED"), 90,
                      what="rollout end")
    assert done["state"] == "SUCCEEDED", done["reason"]
    assert {d["state"] for d in done["devices"]} == {"SUCCEEDED"}
    wait_until(lambda: _running(fleet, "2.0.0", ids), 30, what="v2 committed everywhere")
    actions = [e["action"] for e in fleet.client().get(f"/api/v1/history?target={rollout['id']}")]
    assert "rollout.create" in actions and "rollout.progress" in actions


def test_the_agreement_gate_stops_a_bad_version_and_rolls_the_canary_back(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    ids = _setup(fleet, versions)
    rollout = _create(fleet, "digits:3.0.0", soak_s=30, gates={
        "min_agreement_pct": 90, "min_samples": 20, "max_failures_pct": 0,
        "min_success_pct": 100})
    ended = wait_until(lambda: _rollout(fleet, rollout["id"], "ABORTED", "SUCCEEDED"), 90,
                       what="the gate")
    assert ended["state"] == "ABORTED" and "agreement" in ended["reason"]
    canary = next(d for d in ended["devices"] if d["wave"] == 0)
    wait_until(lambda: _rollout(fleet, rollout["id"], "ABORTED")["devices"][0]["state"]  # type: ignore[index]
               == "ROLLED_BACK", 60, what="canary rolled back")
    assert canary["state"] in ("ROLLING_BACK", "ROLLED_BACK")
    assert {d["state"] for d in ended["devices"][1:]} == {"CANCELLED"}
    wait_until(lambda: _running(fleet, "1.0.0", ids), 30, what="everyone on v1")


def test_one_command_rollback_returns_devices_to_their_previous_bundle(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    ids = _setup(fleet, versions, count=2)
    rollout = _create(fleet, "digits:2.0.0", waves=["100%"])
    wait_until(lambda: _rollout(fleet, rollout["id"], "SUCCEEDED"), 90, what="v2 everywhere")
    back = fleet.client().post(f"/api/v1/rollouts/{rollout['id']}/rollback")
    assert back["state"] == "ROLLED_BACK"
    wait_until(lambda: _running(fleet, "1.0.0", ids), 60, what="back on v1")
    final = wait_until(lambda: _rollout(fleet, rollout["id"], "ROLLED_BACK"), 10)
    wait_until(lambda: {d["state"] for d in _rollout(fleet, rollout["id"], "ROLLED_BACK")
                        ["devices"]} == {"ROLLED_BACK"}, 30,  # type: ignore[index]
               what="devices marked rolled back")
    assert final["reason"] == "rolled back by an operator"
    with pytest.raises(ConflictError, match="ROLLED_BACK"):
        fleet.client().post(f"/api/v1/rollouts/{rollout['id']}/pause")


def test_devices_whose_profile_cannot_load_the_bundle_are_skipped_with_the_reason(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    fleet.start_controller()
    fleet.add_agent("pi-0", versions["v1"], traffic=False)
    fleet.add_agent("coral-0", versions["v1"], profile="coral-edgetpu", traffic=False)
    wait_until(lambda: _running(fleet, "1.0.0", ["pi-0", "coral-0"]), 30)
    client = fleet.client()
    client.post("/api/v1/devices/group", {"devices": ["pi-0", "coral-0"], "group": "cams"})
    client.upload("/api/v1/models", versions["v2"].read_bytes())
    rollout = _create(fleet, "digits:2.0.0", waves=["100%"])
    done = wait_until(lambda: _rollout(fleet, rollout["id"], "SUCCEEDED", "ABORTED"), 90)
    by_id = {d["device"]: d for d in done["devices"]}
    assert done["state"] == "SUCCEEDED"
    assert by_id["coral-0"]["state"] == "INCOMPATIBLE"
    assert "coral-edgetpu" in by_id["coral-0"]["reason"]
    assert by_id["pi-0"]["state"] == "SUCCEEDED"
    assert _devices(fleet)["coral-0"]["active"]["version"] == "1.0.0"
