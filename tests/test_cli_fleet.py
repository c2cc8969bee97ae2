"""``edgefleet fleet ...`` as an operator types it, against a controller with real agents.

The controller and its API run in this process (``tests.fleet_harness``); the commands go
through typer's runner on the real ``edgefleet`` app, over HTTP, with the token in
``EDGEFLEET_TOKEN``. Where "does not hang" is the behaviour, the command is a real process
with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from edgefleet.cli import app
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port, wait_for_port
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import TOKEN, Fleet, wait_until
from tests.models import TrainedModels

CAMS = ["cam-0", "cam-1"]
BOB = "bob-secret-token"


@pytest.fixture(scope="module")
def versions(digits_models: TrainedModels, signing_keys: Keys,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-bundles")
    return {"v1": make_bundle(digits_models.tflite, root / "v1.efb", signing_keys, "1.0.0"),
            "v2": make_bundle(digits_models.onnx, root / "v2.efb", signing_keys, "2.0.0")}


@pytest.fixture()
def fleet(fleet: Fleet) -> Fleet:
    """The shared fleet (tests/conftest.py), its controller started."""
    fleet.start_controller()
    return fleet


@pytest.fixture()
def on_v1(fleet: Fleet, versions: dict[str, Path]) -> list[str]:
    """Two real agents on v1, registered with the controller; no group yet."""
    for device in CAMS:
        fleet.add_agent(device, versions["v1"], traffic=False)
    wait_until(lambda: _versions(fleet) == dict.fromkeys(CAMS, "1.0.0"), 30,
               what="devices registered on v1")
    return CAMS


@pytest.fixture()
def cams(fleet: Fleet, on_v1: list[str], versions: dict[str, Path]) -> list[str]:
    """The two agents in group ``cams``, and v2 pushed (set up through the API)."""
    fleet.client().post("/api/v1/devices/group", {"devices": on_v1, "group": "cams"})
    fleet.client().upload("/api/v1/models", versions["v2"].read_bytes())
    return on_v1


def edgefleet(fleet: Fleet | None, *args: str, token: str = TOKEN,
              url: str | None = None) -> Result:
    controller = url or (fleet.api.url if fleet is not None and fleet.api else "")
    return CliRunner().invoke(app, ["fleet", *args], env={
        "EDGEFLEET_CONTROLLER": controller, "EDGEFLEET_TOKEN": token})


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def said(text: str) -> str:
    """Rich wraps lines to the terminal; compare words, not line breaks."""
    return " ".join(text.split())


def _versions(fleet: Fleet) -> dict[str, str | None]:
    return {d["id"]: d["active"]["version"] if d["active"] else None
            for d in fleet.client().get("/api/v1/devices")}


def _settled_on(fleet: Fleet, version: str) -> bool:
    devices = as_json(edgefleet(fleet, "devices", "--json"))
    return len(devices) == len(CAMS) and all(
        d["active"]["version"] == version
        and d["update_state"] in ("COMMITTED", "IDLE", "ROLLED_BACK") for d in devices)


# --- serve ------------------------------------------------------------------------------

def test_serve_on_a_fresh_data_dir_creates_it_and_stops_cleanly_on_sigterm(
        mosquitto: MosquittoBroker, tmp_path: Path, signing_keys: Keys) -> None:
    data, port = tmp_path / "first-run" / "fleet-data", free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "fleet", "serve", "--fleet", "fresh",
         "--broker", mosquitto.url, "--data-dir", str(data), "--http", f"127.0.0.1:{port}",
         "--trusted-key", str(signing_keys.public), "--token", f"ops={TOKEN}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: process.poll() is not None or wait_for_port("127.0.0.1", port, 0.2),
                   30, what="the controller to listen")
        assert process.poll() is None, process.communicate()
        assert FleetClient(f"http://127.0.0.1:{port}", TOKEN).get("/api/v1/devices") == []
        assert (data / "fleet.db").is_file()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            err = process.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            process.kill()
            err = process.communicate()[1] + "\n(killed: SIGTERM did not stop it)"
    assert process.returncode == 0, err


# --- models and devices -----------------------------------------------------------------

def test_push_prints_a_table_then_json_that_says_the_bundle_was_already_there(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    first = edgefleet(fleet, "push", str(versions["v2"]))
    assert first.exit_code == 0, first.output
    assert "digits:2.0.0" in first.stdout and "new" in first.stdout
    again = as_json(edgefleet(fleet, "push", str(versions["v2"]), "--json"))
    assert again["added"] is False
    assert (again["model"]["name"], again["model"]["version"]) == ("digits", "2.0.0")


def test_models_json_lists_every_pushed_version_with_who_pushed_it(
        fleet: Fleet, versions: dict[str, Path]) -> None:
    for name in ("v1", "v2"):
        fleet.client().upload("/api/v1/models", versions[name].read_bytes())
    models = as_json(edgefleet(fleet, "models", "--json"))
    assert [(m["version"], m["format"], m["pushed_by"]) for m in models] == [
        ("1.0.0", "tflite", "alice"), ("2.0.0", "onnx", "alice")]


def test_devices_json_shows_each_device_online_with_what_it_runs(
        fleet: Fleet, on_v1: list[str]) -> None:
    devices = as_json(edgefleet(fleet, "devices", "--json"))
    assert [(d["id"], d["online"], d["active"]["version"], d["group"]) for d in devices] == [
        (device, True, "1.0.0", None) for device in on_v1]


def test_group_and_tag_change_what_devices_shows(fleet: Fleet, on_v1: list[str]) -> None:
    grouped = edgefleet(fleet, "group", "cams", *on_v1)
    assert grouped.exit_code == 0, grouped.output
    assert "cam-0" in grouped.stdout and "cams" in grouped.stdout
    tagged = as_json(edgefleet(fleet, "tag", "cam-1", "--add", "lab", "--add", "north",
                               "--json"))
    assert sorted(tagged["tags"]) == ["lab", "north"]
    devices = as_json(edgefleet(fleet, "devices", "--json"))
    assert {d["id"]: (d["group"], sorted(d["tags"])) for d in devices} == {
        "cam-0": ("cams", []), "cam-1": ("cams", ["lab", "north"])}


# --- rollouts ---------------------------------------------------------------------------

def test_a_rollout_created_from_the_cli_goes_canary_first_and_succeeds(
        fleet: Fleet, cams: list[str]) -> None:
    created = as_json(edgefleet(fleet, "rollout", "create", "--model", "digits:2.0.0",
                                "--to", "group:cams", "--canary", "1", "--soak", "0.5s",
                                "--json"))
    assert created["state"] == "RUNNING" and created["created_by"] == "alice"
    assert [d["state"] for d in created["devices"]] == ["TARGETED", "PENDING"]
    done = wait_until(lambda: (r := as_json(edgefleet(
        fleet, "rollout", "status", created["id"], "--json")))["state"] != "RUNNING" and r,
        60, every=0.3, what="the rollout to end")
    assert done["state"] == "SUCCEEDED", done["reason"]
    assert {d["device"]: d["state"] for d in done["devices"]} == dict.fromkeys(
        cams, "SUCCEEDED")
    listed = as_json(edgefleet(fleet, "rollout", "list", "--json"))
    assert [(r["id"], r["state"], r["total"]) for r in listed] == [
        (created["id"], "SUCCEEDED", 2)]


def test_rollback_of_a_group_returns_its_devices_to_v1(fleet: Fleet, cams: list[str]) -> None:
    rollout = fleet.client().post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["100%"], "soak_s": 0.5})
    wait_until(lambda: _settled_on(fleet, "2.0.0"), 60, what="v2 on both devices")
    back = as_json(edgefleet(fleet, "rollback", "--group", "cams", "--json"))
    assert [(r["id"], r["state"]) for r in back] == [(rollout["id"], "ROLLED_BACK")]
    wait_until(lambda: _settled_on(fleet, "1.0.0"), 60, what="both devices back on v1")


def test_watching_a_finished_rollout_returns_at_once(fleet: Fleet,
                                                     versions: dict[str, Path]) -> None:
    fleet.client().upload("/api/v1/models", versions["v2"].read_bytes())
    rollout = fleet.client().post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["group:nobody"], "waves": ["100%"]})
    assert rollout["state"] == "SUCCEEDED"  # nothing matches: nothing to do
    assert fleet.api is not None
    watch = subprocess.run(
        [sys.executable, "-m", "edgefleet", "fleet", "rollout", "status", rollout["id"],
         "--watch", "--interval", "0.2"], capture_output=True, text=True, timeout=30,
        check=False, env={**os.environ, "COLUMNS": "200",
                          "EDGEFLEET_CONTROLLER": fleet.api.url, "EDGEFLEET_TOKEN": TOKEN})
    assert watch.returncode == 0, watch.stderr
    assert f"rollout {rollout['id']}" in watch.stdout and "SUCCEEDED" in watch.stdout


# --- history ----------------------------------------------------------------------------

@pytest.fixture()
def bob(fleet: Fleet) -> Iterator[str]:
    """A second operator: another token, named bob, on the same controller."""
    assert fleet.controller is not None
    api = ApiServer(fleet.controller, {BOB: "bob"}).start()
    yield api.url
    api.stop()


def test_history_says_which_token_did_what(fleet: Fleet, on_v1: list[str], bob: str,
                                           versions: dict[str, Path]) -> None:
    assert edgefleet(fleet, "push", str(versions["v2"])).exit_code == 0
    assert edgefleet(None, "group", "cams", *on_v1, url=bob, token=BOB).exit_code == 0
    assert edgefleet(fleet, "tag", "cam-0", "--add", "lab").exit_code == 0
    rollout = as_json(edgefleet(None, "rollout", "create", "--model", "digits:2.0.0", "--to",
                                "group:cams", "--json", url=bob, token=BOB))
    history = as_json(edgefleet(fleet, "history", "--json"))
    assert [(e["actor"], e["action"], e["target"]) for e in history
            if e["action"] != "rollout.progress"] == [
        ("bob", "rollout.create", rollout["id"]), ("alice", "device.tags", "cam-0"),
        ("bob", "device.group", "cam-0,cam-1"), ("alice", "model.push", "digits:2.0.0")]


def test_history_of_one_target_takes_any_group_name(fleet: Fleet, on_v1: list[str]) -> None:
    assert edgefleet(fleet, "group", "north cams & co", "cam-0").exit_code == 0
    assert as_json(edgefleet(fleet, "rollback", "--group", "north cams & co", "--json")) == []
    history = as_json(edgefleet(fleet, "history", "--target", "group:north cams & co",
                                "--json"))
    assert [(e["actor"], e["action"]) for e in history] == [("alice", "fleet.rollback")]


# --- errors -----------------------------------------------------------------------------

def test_a_wrong_token_exits_2_naming_the_token_problem_and_the_fix(fleet: Fleet) -> None:
    result = edgefleet(fleet, "models", token="not-the-right-token")
    assert result.exit_code == 2
    assert "the token is not known to this controller" in said(result.stderr)
    assert "check --token / EDGEFLEET_TOKEN" in said(result.stderr)


def test_an_unreachable_controller_is_named_with_how_to_start_one() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = edgefleet(None, "devices", url=url)
    assert result.exit_code == 2
    assert f"cannot reach the controller at {url}" in said(result.stderr)
    assert "start it with 'edgefleet fleet serve'" in said(result.stderr)


@pytest.mark.parametrize("choice", [[], ["--rollout", "r1", "--group", "cams"]],
                         ids=["neither", "both"])
def test_rollback_needs_exactly_one_of_a_rollout_or_a_group(choice: list[str]) -> None:
    result = edgefleet(None, "rollback", *choice, url=f"http://127.0.0.1:{free_port()}")
    assert result.exit_code == 2
    assert "say what to roll back" in said(result.stderr)
    assert "pass --rollout ID or --group NAME" in said(result.stderr)
