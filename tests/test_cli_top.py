"""``edgefleet fleet top`` against a controller with two real agents on a real Mosquitto.

One fleet for the module: two devices on digits 1.0.0 in group "cams", and a rollout of
2.0.0 in waves 1,100% whose canary sits in probation (long soak), so every frame shows a
running rollout with one device in flight and one waiting.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from edgefleet.cli.fleet.top import top
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, Fleet, wait_until
from tests.models import TrainedModels

DEVICES = ["cam-0", "cam-1"]


@pytest.fixture(scope="module")
def fleet(digits_models: TrainedModels, signing_keys: Keys,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("top")
    broker = MosquittoBroker(workdir=root / "mosquitto").start()
    harness = Fleet(f"top{uuid.uuid4().hex[:8]}", broker.url, root, signing_keys)
    try:
        _running_rollout(harness, digits_models, signing_keys, root)
        yield harness
    finally:
        harness.stop()
        broker.stop()


def _running_rollout(fleet: Fleet, models: TrainedModels, keys: Keys, root: Path) -> None:
    v1 = make_bundle(models.tflite, root / "v1.efb", keys, "1.0.0")
    # the same model again: the probation agreement is measured (a tflite -> onnx switch
    # measures none: the previous runtime refuses the new model's input names)
    v2 = make_bundle(models.tflite, root / "v2.efb", keys, "2.0.0")
    client = fleet.start_controller()
    for device in DEVICES:
        fleet.add_agent(device, v1)
    wait_until(lambda: len([d for d in client.get("/api/v1/devices") if d["online"]]) == 2,
               30, what="two devices online")
    client.post("/api/v1/devices/group", {"devices": DEVICES, "group": "cams"})
    client.upload("/api/v1/models", v2.read_bytes())
    rollout = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["1", "100%"],
        "device_timeout_s": 300, "soak_s": 300})
    wait_until(lambda: any(d["update_state"] == "PROBATION" and d["id"] == _canary(fleet)
                           for d in client.get("/api/v1/devices")), 60,
               what=f"the canary of {rollout['id']} in probation")
    assert fleet.controller is not None
    telemetry = fleet.controller.telemetry
    wait_until(lambda: ((telemetry.latest.get(_canary(fleet)) or {}).get("agreement") or {})
               .get("samples"), 30, what="the canary's agreement in its telemetry")


def _canary(fleet: Fleet) -> str:
    rollout = fleet.client().get("/api/v1/rollouts")[0]
    detail = fleet.client().get(f"/api/v1/rollouts/{rollout['id']}")
    return str(next(d["device"] for d in detail["devices"] if d["wave"] == 0))


def _top(fleet: Fleet, *args: str, token: str = TOKEN) -> Result:
    app = typer.Typer()
    app.command()(top)
    assert fleet.api is not None
    return CliRunner().invoke(app, ["--controller", fleet.api.url, "--token", token, *args],
                              env={"COLUMNS": "200"})


def _frame(fleet: Fleet) -> dict[str, Any]:
    result = _top(fleet, "--once", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, "--once: one frame, one line"
    frame: dict[str, Any] = json.loads(lines[0])
    return frame


def test_json_frame_counts_devices_versions_and_each_waves_progress(fleet: Fleet) -> None:
    frame = _frame(fleet)
    assert frame["fleet"] == fleet.name
    assert frame["devices"] == {"total": 2, "online": 2, "offline": 0}
    versions = {v["version"]: v["devices"] for v in frame["versions"]}
    assert versions == {"digits:2.0.0": 1, "digits:1.0.0": 1}
    assert frame["update_states"].get("PROBATION") == 1
    [rollout] = frame["rollouts"]
    assert (rollout["model"], rollout["state"], rollout["wave"]) == ("digits:2.0.0", "RUNNING", 1)
    assert rollout["waves"] == [
        {"wave": 1, "up_to": "1", "devices": 1, "done": 0, "succeeded": 0, "failed": 0,
         "waiting": 1},
        {"wave": 2, "up_to": "100%", "devices": 1, "done": 0, "succeeded": 0, "failed": 0,
         "waiting": 1}]
    canary = _canary(fleet)
    assert [(d["device"], d["update"], d["model"]) for d in frame["attention"]] == [
        (canary, "PROBATION", "digits:2.0.0")]


def test_once_prints_one_frame_for_people(fleet: Fleet) -> None:
    result = _top(fleet, "--once")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"fleet {fleet.name}" in out and "2 devices: 2 online, 0 offline" in out
    assert "digits:1.0.0" in out and "digits:2.0.0" in out and "PROBATION 1" in out
    rollout = fleet.client().get("/api/v1/rollouts")[0]
    assert f"rollout {rollout['id']}: digits:2.0.0 -> group:cams  RUNNING" in out
    assert "▶ 1" in out and "100%" in out, "one row a wave, the current one marked"
    assert "devices offline or updating" in out and _canary(fleet) in out


def test_per_version_quality_comes_from_the_controllers_telemetry(fleet: Fleet) -> None:
    controller = fleet.controller
    assert controller is not None
    wait_until(lambda: (controller.telemetry.summary().get("digits:2.0.0") or {}).get("p50_ms"),
               10, what="a window of v2 traffic")
    versions = {v["version"]: v for v in _frame(fleet)["versions"]}
    v1, v2 = versions["digits:1.0.0"], versions["digits:2.0.0"]
    assert v1["p50_ms"] > 0 and v1["p95_ms"] >= v1["p50_ms"] and v1["error_rate"] == 0
    assert v2["p50_ms"] > 0 and v2["inferences"] > 0
    assert v2["agreement"] == 1.0, "2.0.0 is 1.0.0's model: it always agrees"
    assert v1["agreement"] is None, "agreement is measured for the version on probation"
    out = _top(fleet, "--once").stdout
    row = next(line for line in out.splitlines() if "digits:2.0.0" in line and "%" in line)
    assert row.rstrip(" │").endswith("0.0% │    100.0%"), "error rate, agreement"


def test_a_wrong_token_or_no_controller_is_an_error_that_says_what_to_do(
        fleet: Fleet) -> None:
    refused = _top(fleet, "--once", token="not-a-token-123")
    assert refused.exit_code == 2 and "not known" in refused.output
    app = typer.Typer()
    app.command()(top)
    gone = CliRunner().invoke(app, ["--controller", "http://127.0.0.1:9", "--once", "--json"])
    assert gone.exit_code == 2
    assert json.loads(gone.stdout)["error"] == "ApiError" and "cannot reach" in gone.stdout
