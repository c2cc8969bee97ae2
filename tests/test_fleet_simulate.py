"""Simulated fleets on a real Mosquitto: the agent's payloads, the real update flow, faults."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.payloads import (
    DesiredState,
    ReportedState,
    decode,
    decode_status,
    decode_telemetry,
    encode,
)
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.agent.update.device import UpdateSettings
from edgefleet.cli.fleet.simulate import simulate
from edgefleet.fleet.mosquitto import MosquittoBroker
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from edgefleet.fleet.simulate.options import assign_traits
from edgefleet.fleet.simulate.pool import WorkPool
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.http_files import FileServer
from tests.models import TrainedModels

UPDATE_STATES = ["DOWNLOADING", "VERIFYING", "STAGED", "HEALTH_CHECK", "SWITCHING", "PROBATION"]
FAST = dict(telemetry_interval_s=0.2, request_rate=200.0, connect_rate=1000.0)
StartFleet = Callable[..., SimulatedFleet]


@pytest.fixture(scope="module")
def served(digits_models: TrainedModels, digits_bundles: dict[str, Path], signing_keys: Keys,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FileServer, Path]]:
    """v1 (the digits tflite bundle) and v2 (the same model as 2.0.0), served over HTTP."""
    root = tmp_path_factory.mktemp("www")
    shutil.copy(digits_bundles["tflite"], root / "v1.efb")
    make_bundle(digits_models.tflite, root / "v2.efb", signing_keys, "2.0.0", rows=32)
    server = FileServer(root)
    yield server, root
    server.stop()


@pytest.fixture()
def start_fleet(mosquitto: MosquittoBroker, fleet_name: str, signing_keys: Keys,
                served: tuple[FileServer, Path]) -> Iterator[StartFleet]:
    """Start a simulated fleet on v1 (or empty); every fleet is stopped after the test."""
    started: list[SimulatedFleet] = []

    def start(count: int, initial: bool = True, **options: Any) -> SimulatedFleet:
        sim = SimulatedFleet(mosquitto.url, fleet_name, count, signing_keys.trusted,
                             SimOptions(**{**FAST, **options}),
                             served[1] / "v1.efb" if initial else None)
        started.append(sim.start())
        assert sim.wait_until(lambda d: all(v.online for v in d.values()), 10)
        return sim

    yield start
    for sim in started:
        sim.stop()


@pytest.fixture()
def sub(mosquitto: MosquittoBroker, fleet_name: str) -> Iterator[Subscriber]:
    subscriber = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])
    yield subscriber
    subscriber.close()


def _desired(served: tuple[FileServer, Path], keys: Keys, **extra: Any) -> DesiredState:
    server, root = served
    bundle = read_bundle(root / "v2.efb", keys.trusted)
    return DesiredState(name=bundle.manifest.name, version=bundle.manifest.version,
                        sha256=bundle.sha256, url=server.url("v2.efb"),
                        size=(root / "v2.efb").stat().st_size, **extra)


def _send(sub: Subscriber, fleet: str, devices: list[str], desired: DesiredState) -> None:
    for device in devices:
        sub.publish(device_topic(fleet, device, Leaf.DESIRED), encode(desired), retain=True)


def _reported(sub: Subscriber, device: str) -> ReportedState:
    found = sub.on(f"/{device}/state/reported")
    assert found, f"{device} published no reported state"
    return decode(ReportedState, found[-1].payload)


def _update_states(sub: Subscriber, device: str) -> list[str]:
    events = [m.json() for m in sub.on(f"/{device}/events")]
    return [e["state"] for e in events if e["kind"] == "update"]


def _telemetry(sub: Subscriber, device: str) -> list[dict[str, Any]]:
    return [point.values for m in sub.on(f"/{device}/telemetry")
            for point in decode_telemetry(m.payload)]


def _in_state(sim: SimulatedFleet, devices: list[str], state: str, version: str,
              timeout: float = 15) -> None:
    def reached(views: Any) -> bool:
        return all(views[d].update_state == state and views[d].active_version == version
                   for d in devices)

    assert sim.wait_until(reached, timeout), [sim.devices[d] for d in devices]


def test_devices_come_online_with_retained_status_reported_state_and_agent_telemetry(
        start_fleet: StartFleet, mosquitto: MosquittoBroker, fleet_name: str) -> None:
    sim = start_fleet(20)
    ids = list(sim.devices)
    assert ids[0] == "sim-00001" and len(ids) == 20
    late = Subscriber(mosquitto.url, [fleet_filter(fleet_name)])  # sees only retained + new
    assert late.wait_for(lambda m: len({x.topic for x in m if x.topic.endswith("telemetry")})
                         == 20, 10)
    late.close()
    for device in ids:
        status = [m for m in late.on(f"/{device}/status") if m.retain]
        assert [decode_status(m.payload) for m in status] == ["online"]
        reported = [m for m in late.on(f"/{device}/state/reported") if m.retain]
        state = decode(ReportedState, reported[-1].payload)
        assert (state.device, state.slot, state.update.state) == (device, "a", "COMMITTED")
        assert state.active is not None and state.active.version == "1.0.0"
        assert state.profile == "generic-x86_64" and state.serving and state.runtimes
    values = _telemetry(late, ids[0])[-1]
    assert values["schema_version"] == 1 and values["model_version"] == "1.0.0"
    window = values["versions"]["1.0.0"]
    assert set(window) == {"inferences", "errors", "latency_p50_ms", "latency_p95_ms",
                           "latency_p99_ms", "throughput_rps"}
    assert {k: values[k] for k in window} == window
    assert values["inferences_total"] >= window["inferences"] > 0
    assert {"seq", "errors_total", "cpu_percent", "rss_bytes", "spool_dropped"} <= set(values)


def test_an_update_runs_the_real_states_and_parks_in_probation_until_the_fleet_commits(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(4)
    served[0].faults.requests.clear()
    desired = _desired(served, signing_keys)
    _send(sub, fleet_name, ["sim-00001", "sim-00002"], desired)
    _in_state(sim, ["sim-00001", "sim-00002"], "PROBATION", "2.0.0")
    assert len(served[0].faults.requests) == 2, "each device downloads the bundle itself"
    assert sub.wait_for(lambda _: _update_states(sub, "sim-00001") == UPDATE_STATES), \
        _update_states(sub, "sim-00001")
    events = [m.json() for m in sub.on("/sim-00001/events")]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    _send(sub, fleet_name, ["sim-00001"], desired.model_copy(update={"action": "commit"}))
    _in_state(sim, ["sim-00001"], "COMMITTED", "2.0.0")
    assert sim.devices["sim-00002"].update_state == "PROBATION", "parked until told"
    assert sub.wait_for(lambda _: _reported(sub, "sim-00001").update.state == "COMMITTED")
    reported = _reported(sub, "sim-00001")
    assert reported.active is not None and reported.active.version == "2.0.0"
    assert reported.previous is not None and reported.previous.version == "1.0.0"
    assert sim.devices["sim-00003"].active_version == "1.0.0"


def test_a_rollback_in_probation_returns_to_v1(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(2)
    desired = _desired(served, signing_keys)
    _send(sub, fleet_name, ["sim-00002"], desired)
    _in_state(sim, ["sim-00002"], "PROBATION", "2.0.0")
    _send(sub, fleet_name, ["sim-00002"], desired.model_copy(update={"action": "rollback"}))
    _in_state(sim, ["sim-00002"], "ROLLED_BACK", "1.0.0")
    assert sub.wait_for(lambda _: _reported(sub, "sim-00002").update.state == "ROLLED_BACK")
    reported = _reported(sub, "sim-00002")
    assert reported.active is not None and reported.active.version == "1.0.0"


def test_a_rollback_of_a_committed_update_returns_to_the_previous_bundle(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(1, settings=UpdateSettings(probation_s=0.1))
    desired = _desired(served, signing_keys, auto_commit=True)
    _send(sub, fleet_name, ["sim-00001"], desired)
    _in_state(sim, ["sim-00001"], "COMMITTED", "2.0.0")
    _send(sub, fleet_name, ["sim-00001"], desired.model_copy(update={"action": "rollback"}))
    _in_state(sim, ["sim-00001"], "ROLLED_BACK", "1.0.0")


def test_devices_that_start_empty_install_the_desired_bundle(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(2, initial=False, settings=UpdateSettings(probation_s=0.1))
    assert {v.update_state for v in sim.devices.values()} == {"IDLE"}
    _send(sub, fleet_name, ["sim-00001"], _desired(served, signing_keys, auto_commit=True))
    _in_state(sim, ["sim-00001"], "COMMITTED", "2.0.0")
    assert sim.devices["sim-00002"].active_version is None


def test_devices_whose_health_check_fails_end_failed_on_the_old_model(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(4, fail_health=0.5)
    failing = [d for d, v in sim.devices.items() if "fail_health" in v.faults]
    healthy = [d for d in sim.devices if d not in failing]
    assert len(failing) == 2
    _send(sub, fleet_name, list(sim.devices), _desired(served, signing_keys))
    _in_state(sim, failing, "FAILED", "1.0.0")
    _in_state(sim, healthy, "PROBATION", "2.0.0")
    assert sub.wait_for(lambda _: "fail_health" in _reported(sub, failing[0]).update.detail)


def _probation_telemetry(sim: SimulatedFleet, sub: Subscriber, fleet_name: str,
                         desired: DesiredState) -> dict[str, dict[str, Any]]:
    """Install v2 everywhere, wait for probation, return each device's latest point."""
    _send(sub, fleet_name, list(sim.devices), desired)
    _in_state(sim, list(sim.devices), "PROBATION", "2.0.0")

    def sampled(_: object) -> bool:
        last = {d: (_telemetry(sub, d) or [{}])[-1] for d in sim.devices}
        return all((v.get("agreement") or {}).get("samples", 0) >= 20 for v in last.values())

    assert sub.wait_for(sampled, 15), {d: len(_telemetry(sub, d)) for d in sim.devices}
    return {d: _telemetry(sub, d)[-1] for d in sim.devices}


def test_disagreeing_devices_report_a_lower_agreement(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(6, disagree=0.5)
    points = _probation_telemetry(sim, sub, fleet_name, _desired(served, signing_keys))
    bad = {d for d, v in sim.devices.items() if "disagree" in v.faults}
    assert len(bad) == 3
    for device, values in points.items():
        agreement = values["agreement"]
        assert agreement == values["versions"]["2.0.0"]["agreement"]
        assert agreement["against"] == "1.0.0"
        assert (agreement["top1"] < 0.9) if device in bad else (agreement["top1"] == 1.0)


def test_slow_devices_report_a_higher_p95_on_the_new_version(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(6, slow=0.5, slow_factor=20.0, speed_spread=0.05)
    points = _probation_telemetry(sim, sub, fleet_name, _desired(served, signing_keys))
    slow = {d for d, v in sim.devices.items() if "slow" in v.faults}
    p95 = {d: v["versions"]["2.0.0"]["latency_p95_ms"] for d, v in points.items()}
    assert len(slow) == 3
    assert min(p95[d] for d in slow) > max(p95[d] for d in p95 if d not in slow)


def test_an_offline_device_sends_its_will_returns_and_applies_what_it_missed(
        start_fleet: StartFleet, sub: Subscriber, fleet_name: str,
        served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    sim = start_fleet(4, offline=0.25, offline_after_s=0.3, offline_for_s=1.5,
                      settings=UpdateSettings(probation_s=0.1))
    (device,) = [d for d, v in sim.devices.items() if "offline" in v.faults]
    assert sub.wait_for(lambda _: [m.payload for m in sub.on(f"/{device}/status")][-1:]
                        == [b"offline"], 10)
    assert not sim.devices[device].online
    received = len(sub.on(f"/{device}/telemetry"))
    _send(sub, fleet_name, [device], _desired(served, signing_keys, auto_commit=True))
    assert sim.devices[device].active_version == "1.0.0"
    _in_state(sim, [device], "COMMITTED", "2.0.0")
    statuses = [m.payload.decode() for m in sub.on(f"/{device}/status")]
    assert statuses[-3:] == ["online", "offline", "online"]
    assert sub.wait_for(lambda _: any(m.payload.startswith(b"[")  # the spool, replayed
                                      for m in sub.on(f"/{device}/telemetry")[received:]))
    seqs = [v["seq"] for v in _telemetry(sub, device)]
    assert sorted(set(seqs)) == list(range(1, max(seqs) + 1)), "the spool was replayed"


def test_faulty_devices_are_chosen_deterministically_and_apart() -> None:
    ids = [f"d{i}" for i in range(100)]
    options = SimOptions(seed=7, fail_health=0.1, slow=0.2, disagree=0.3)
    traits = assign_traits(options, ids)
    assert traits == assign_traits(options, ids)
    counts = {f: sum(f in t.faults for t in traits.values()) for f in ("fail_health", "slow",
                                                                      "disagree", "offline")}
    assert counts == {"fail_health": 10, "slow": 20, "disagree": 30, "offline": 0}
    assert all(len(t.faults) <= 1 for t in traits.values())


def test_the_cli_prints_json_lines_until_the_duration_ends(
        mosquitto: MosquittoBroker, served: tuple[FileServer, Path], signing_keys: Keys) -> None:
    app = typer.Typer()
    app.command()(simulate)
    app.command("other")(lambda: None)  # keeps 'simulate' a sub-command, as when mounted
    result = CliRunner().invoke(app, [
        "simulate", "--broker", mosquitto.url, "--fleet", "cli", "--devices", "3",
        "--bundle", str(served[1] / "v1.efb"), "--trusted-key", str(signing_keys.public),
        "--telemetry-interval", "0.2", "--duration", "1.2", "--every", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.splitlines()]
    assert lines[-1]["online"] == 3
    assert lines[-1]["groups"] == [{"state": "COMMITTED", "version": "1.0.0", "devices": 3}]


def test_the_update_pool_survives_a_failing_step_and_drops_queued_steps_at_shutdown() -> None:
    pool = WorkPool(2, "test-pool")
    ran: list[int] = []
    release, running = threading.Event(), threading.Event()

    def fail() -> None:
        raise RuntimeError("a broken step")

    def block() -> None:
        running.set()
        release.wait(10)
        ran.append(0)

    for _ in range(2):
        pool.submit(fail)  # each worker survives its failure
    for i in range(1, 6):
        pool.submit(lambda i=i: ran.append(i))  # type: ignore[misc]
    deadline = time.monotonic() + 10
    while len(ran) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(ran) == [1, 2, 3, 4, 5]
    pool.submit(block)
    assert running.wait(10)
    pool.submit(lambda: ran.append(99))  # may be taken by the idle worker, or dropped
    threading.Timer(0.2, release.set).start()
    pool.shutdown()  # waits for the running step
    assert 0 in ran
    pool.submit(lambda: ran.append(100))  # after shutdown: dropped
    time.sleep(0.05)
    assert 100 not in ran
    with pytest.raises(ValueError, match="at least one worker"):
        WorkPool(0, "none")
