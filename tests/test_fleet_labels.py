"""What selectors read: what devices report of themselves (architecture, labels), labels
operators set (kept in the store, SQLite and PostgreSQL), saved selectors, and a
scheduled, attribute-selected rollout's spec through the store."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError

from edgefleet.agent.protocol.payloads import BundleRef, ReportedState, decode
from edgefleet.cli.agent import _labels as _agent_labels
from edgefleet.cli.logs import LogFormat
from edgefleet.fleet.controller import FleetController
from edgefleet.fleet.domain import Device
from edgefleet.fleet.errors import ConflictError, NotFoundError
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout.schedule import Schedule, parse_window
from edgefleet.fleet.rollout.selector import parse_selector
from edgefleet.fleet.rollout.spec import RolloutSpec
from edgefleet.fleet.rollout.state import Rollout, RolloutState
from edgefleet.fleet.simulate.options import SimOptions, SimulationError
from edgefleet.fleet.store import Store
from tests.conftest import Keys
from tests.test_scale_out import _config

NEW = BundleRef(name="digits", version="1.0.0", sha256="a" * 64)
Opener = Callable[[], Store]


@pytest.fixture
def store(reopen: Opener) -> Store:
    return reopen()


def _reported(**fields: object) -> bytes:
    return json.dumps({"schema_version": 1, "fleet": "f", "device": "cam-1",
                       "agent_version": "0.1.0", **fields}).encode()


def test_a_device_reports_its_architecture_and_labels_and_the_registry_keeps_them() -> None:
    registry = DeviceRegistry("f")
    registry.reported(decode(ReportedState, _reported(
        arch="aarch64", labels={"site": "plant-a"}, profile="raspberry-pi-4")), 1_000)
    device = registry.get("cam-1")
    assert device is not None and device.arch == "aarch64"
    assert device.all_labels == {"site": "plant-a"}
    assert parse_selector("arch=aarch64 & label:site=plant-a").matches(device)


def test_an_agent_that_reports_neither_is_read_as_before() -> None:
    state = decode(ReportedState, _reported())
    assert state.arch is None and state.labels is None
    registry = DeviceRegistry("f")
    registry.reported(state, 1_000)
    device = registry.get("cam-1")
    assert device is not None and device.all_labels == {} and device.arch is None


@pytest.mark.parametrize("labels", [{"bad key": "x"}, {"k": ""}, {"k": "a\nb"},
                                    {"k": "x" * 65}, {f"k{i}": "v" for i in range(33)}])
def test_reported_labels_out_of_bounds_are_refused(labels: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        ReportedState(fleet="f", device="d", agent_version="0", labels=labels)


def test_operator_labels_are_stored_read_back_and_win_over_reported_ones(
        store: Store, reopen: Opener) -> None:
    store.upsert_devices([Device(id="cam-1", fleet="f", reported_labels={"site": "lab"}),
                          Device(id="cam-2", fleet="f")])
    changed = store.set_labels("cam-1", {"site": "plant-a", "line": "3"})
    assert changed.labels == {"site": "plant-a", "line": "3"}
    store.set_labels("cam-1", {"room": "7"}, remove=["line", "absent"])
    again = reopen()
    assert again.device("cam-1") is not None
    assert {d.id: d.labels for d in again.devices()} == {"cam-1": {"site": "plant-a",
                                                                   "room": "7"}, "cam-2": {}}
    device = Device(id="cam-1", fleet="f", reported_labels={"site": "lab", "os": "x"},
                    labels={"site": "plant-a"})
    assert device.all_labels == {"site": "plant-a", "os": "x"}


def test_a_device_s_own_report_rewriting_its_row_keeps_operator_labels(store: Store) -> None:
    store.upsert_devices([Device(id="cam-1", fleet="f")])
    store.set_labels("cam-1", {"site": "plant-a"})
    store.upsert_devices([Device(id="cam-1", fleet="f", online=True, profile="rpi4")])
    device = store.device("cam-1")
    assert device is not None and device.labels == {"site": "plant-a"} and device.online


def test_labelling_an_unknown_device_is_refused(store: Store) -> None:
    with pytest.raises(NotFoundError, match="no device 'ghost'"):
        store.set_labels("ghost", {"site": "x"})


def test_a_label_change_reaches_other_controllers_through_the_label_sequence(
        store: Store, reopen: Opener) -> None:
    store.upsert_devices([Device(id="cam-1", fleet="f"), Device(id="cam-2", fleet="f")])
    seq, _ = store.labels_since(0)
    other = reopen()
    other.set_labels("cam-2", {"site": "plant-b"})
    later, changes = store.labels_since(seq)
    assert later > seq and [c[0] for c in changes] == ["cam-2"]
    assert store.labels_of(["cam-2", "cam-1"]) == {"cam-2": {"site": "plant-b"}}
    registry = DeviceRegistry("f", store.devices())
    registry.relabel("cam-1", None, frozenset(), {"site": "lab"})
    device = registry.get("cam-1")
    assert device is not None and device.labels == {"site": "lab"}


def test_saved_selectors_are_created_once_listed_and_deleted(store: Store) -> None:
    store.save_selector("pis", "profile=raspberry-pi-4", "alice", 5)
    with pytest.raises(ConflictError, match="already exists"):
        store.save_selector("pis", "arch=aarch64", "bob", 6)
    store.save_selector("a-group", "label:site=plant-a", "bob", 7)
    assert [(s.name, s.selector, s.created_by) for s in store.saved_selectors()] == [
        ("a-group", "label:site=plant-a", "bob"), ("pis", "profile=raspberry-pi-4", "alice")]
    assert store.delete_selector("pis") and not store.delete_selector("pis")
    assert [s.name for s in store.saved_selectors()] == ["a-group"]


def test_a_scheduled_rollout_by_attributes_round_trips_through_the_store(
        store: Store, reopen: Opener) -> None:
    spec = RolloutSpec(model=NEW, url="http://x/b.efb", size=10,
                       selectors=(parse_selector("profile=raspberry-pi-4 & "
                                                 "(label:site=plant-a | runtime.litert>=1.2)"),),
                       schedule=Schedule(1_800_000_000_000, (
                           parse_window("Mon-Fri 22:00-04:00 Europe/Berlin"),
                           parse_window("Sat 10:00-12:00"))))
    rollout = Rollout("r1", spec, RolloutState.WAITING, created_ms=1, updated_ms=2)
    store.save_rollout(rollout)
    loaded = reopen().rollout("r1")
    assert loaded is not None and loaded.spec == spec and loaded.state == RolloutState.WAITING


def test_a_label_set_through_a_follower_reaches_the_leaders_registry(
        reopen: Opener, tmp_path: Path, signing_keys: Keys) -> None:
    reopen().upsert_devices([Device(id="cam-0", fleet="plant", profile="rpi4")])
    leader = FleetController(_config(tmp_path, signing_keys, "a", lease_s=5), reopen())
    follower = FleetController(_config(tmp_path, signing_keys, "b", lease_s=5), reopen())
    leader.step()
    follower.step()
    assert follower.controller_status()["role"] == "follower"
    follower.label("cam-0", {"site": "plant-a"}, [], "bob")
    leader.step()  # the leader reads the label sequence at each step
    device = leader.registry.get("cam-0")
    assert device is not None and device.labels == {"site": "plant-a"}
    assert device.profile == "rpi4"  # its reported state stays as the leader knows it


def test_a_simulated_fleet_refuses_labels_its_devices_could_not_report() -> None:
    assert SimOptions(labels={"site": "plant-a"}).labels == {"site": "plant-a"}
    with pytest.raises(SimulationError, match="cannot be reported"):
        SimOptions(labels={"bad key": "x"})


def test_agent_run_labels_are_checked_as_the_reported_state_will_be(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert _agent_labels(["site=plant-a", "line=3"], LogFormat.text) == {"site": "plant-a",
                                                                          "line": "3"}
    for bad in (["site"], ["bad key=x"], ["k="]):
        with pytest.raises(typer.Exit):
            _agent_labels(bad, LogFormat.text)
    assert "--label" in capsys.readouterr().err
