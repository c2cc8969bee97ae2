"""Drift alerts end to end: real agents fed shifted and unshifted digits, a real controller
on a real Mosquitto, the alert in the controller, the history, Prometheus and the dashboard."""

from __future__ import annotations

import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.runtime import load_runtime
from edgefleet.fleet import dashboard
from edgefleet.fleet.simulate import SimOptions, SimulatedFleet
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, log_in, wait_until
from tests.models import TrainedModels, load_digits
from tests.test_cli_fleet import as_json, edgefleet

CALM, SHIFTED = "cam-calm", "cam-shifted"


def _traffic(agent: Agent, x: np.ndarray, stop: threading.Event) -> None:
    rng = np.random.default_rng(len(x))
    while not stop.wait(0.003):
        agent.predict(x[rng.integers(len(x))][None])


@pytest.fixture()
def drifting(fleet: Fleet, digits_models: TrainedModels, signing_keys: Keys,
             tmp_path: Path) -> Iterator[Fleet]:
    """Two cameras on a bundle whose reference is 300 held-out digits: one keeps seeing
    digits like those, the other washed-out ones."""
    x = load_digits().x_test
    name = load_runtime(digits_models.tflite.read_bytes(), "tflite").inputs[0].name
    bundle = make_bundle(digits_models.tflite, tmp_path / "v1.efb", signing_keys,
                         reference_inputs={name: x[:300]}, reference_source="eval")
    client = fleet.start_controller()
    assert fleet.controller is not None
    dashboard.attach(fleet.controller)
    client.upload("/api/v1/models", bundle.read_bytes())
    assert edgefleet(fleet, "drift", "set", "digits", "--psi", "0.2").exit_code == 0
    stop = threading.Event()
    threads = []
    # digits the reference never saw, drawn at random: a camera seeing the same world
    unseen = load_digits().x_train
    washed_out = np.clip(unseen * 0.4 + 0.55, 0, 1).astype(np.float32)
    for device, inputs in ((CALM, unseen), (SHIFTED, washed_out)):
        service = fleet.add_agent(device, bundle, traffic=False)
        thread = threading.Thread(target=_traffic, args=(service.agent, inputs, stop),
                                  daemon=True)
        thread.start()
        threads.append(thread)
    try:
        yield fleet
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)


def _firing(fleet: Fleet) -> list[dict[str, Any]]:
    assert fleet.controller is not None
    return [a.as_dict() for a in fleet.controller.alerts()]


def test_shifted_inputs_raise_an_alert_and_unshifted_ones_none(drifting: Fleet) -> None:
    controller = drifting.controller
    assert controller is not None
    firing = wait_until(lambda: [a for a in _firing(drifting) if a["device"] == SHIFTED
                                 and a["feature"].startswith("input:")], 60,
                        what="an input drift alert on the shifted camera")
    assert firing[0]["model"] == "digits:1.0.0" and firing[0]["psi"] > 0.2
    # the calm camera's pooled windows are judged too, again and again, and never fire
    wait_until(lambda: len(rows := controller.drift.summary()) == 3
               and all(row["devices"] == 2 for row in rows), 60,
               what="both cameras judged on every feature")
    before = controller.drift.windows
    wait_until(lambda: controller.drift.windows >= before + 20, 60, what="more windows")
    assert not [a for a in _firing(drifting) if a["device"] == CALM]

    history = drifting.client().get("/api/v1/history?target=" + SHIFTED)
    raised = [e for e in history if e["action"] == "drift.raised"]
    assert raised and raised[0]["actor"] == "controller"

    assert drifting.api is not None
    with urllib.request.urlopen(f"{drifting.api.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    feature = firing[0]["feature"]
    assert (f'edgefleet_drift_alerts{{feature="{feature}",model="digits",version="1.0.0"}} 1.0'
            in text), text
    assert "edgefleet_drift_windows_total" in text


def test_the_dashboard_lists_the_alert(drifting: Fleet, browser: Any) -> None:
    wait_until(lambda: any(a["device"] == SHIFTED for a in _firing(drifting)), 60,
               what="a drift alert")
    assert drifting.api is not None
    log_in(browser, drifting.api.url)
    rows = wait_until(lambda: browser.execute_script(
        "return [...document.querySelectorAll('#drift tr.drift-alert')]"
        ".map(r => r.dataset.alertDevice)"), 30, what="drift rows on the page")
    assert SHIFTED in rows and CALM not in rows
    count = browser.execute_script("return document.getElementById('drift-count').textContent")
    assert "firing" in count


def test_the_cli_lists_alerts_and_sets_policies(drifting: Fleet) -> None:
    firing = wait_until(lambda: as_json(edgefleet(drifting, "alerts", "--json"))["alerts"], 60,
                        every=0.5, what="alerts through the CLI")
    assert {a["device"] for a in firing} == {SHIFTED}
    table = edgefleet(drifting, "alerts")
    assert table.exit_code == 0 and re.search(r"drift alerts firing: [1-9]", table.output)

    policies = as_json(edgefleet(drifting, "drift", "show", "--json"))
    assert policies["models"]["digits"] == {"psi": 0.2, "min_samples": 200, "clear_after": 2}
    changed = as_json(edgefleet(drifting, "drift", "set", "digits", "--clear-after", "3",
                                "--json"))
    assert changed == {"psi": 0.2, "min_samples": 200, "clear_after": 3}  # psi kept
    refused = edgefleet(drifting, "drift", "set", "digits", "--psi", "-1")
    assert refused.exit_code == 2 and "psi threshold must be above 0" in refused.output
    assert edgefleet(drifting, "drift", "set", "../x", "--psi", "1").exit_code == 2
    reset = as_json(edgefleet(drifting, "drift", "set", "digits", "--reset", "--json"))
    assert reset == {"psi": 0.2, "min_samples": 200, "clear_after": 2}
    assert as_json(edgefleet(drifting, "drift", "show", "--json"))["models"] == {}
    actions = [e["action"] for e in drifting.client().get("/api/v1/history?target=digits")]
    assert actions.count("drift.policy") == 3


def test_simulated_drifting_devices_raise_alerts_and_the_others_none(
        fleet: Fleet, digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    """``fleet simulate --drifting``: windows drawn from the bundle's reference, shifted for
    the drifting devices, judged by a real controller."""
    x = load_digits().x_test
    name = load_runtime(digits_models.tflite.read_bytes(), "tflite").inputs[0].name
    bundle = make_bundle(digits_models.tflite, tmp_path / "v1.efb", signing_keys,
                         reference_inputs={name: x[:300]}, reference_source="eval")
    client = fleet.start_controller()
    client.upload("/api/v1/models", bundle.read_bytes())
    options = SimOptions(telemetry_interval_s=0.2, request_rate=400, drifting=0.25,
                         connect_rate=1000)
    with SimulatedFleet(fleet.broker_url, fleet.name, 8, signing_keys.trusted, options,
                        bundle) as sim:
        drifting = {d for d, view in sim.devices.items() if "drifting" in view.faults}
        assert len(drifting) == 2
        controller = fleet.controller
        assert controller is not None
        wait_until(lambda: {a.device for a in controller.alerts()} >= drifting, 60,
                   what="alerts on the drifting devices")
        judged = controller.drift.windows
        wait_until(lambda: controller.drift.windows >= judged + 100, 60, what="more windows")
    alerted = {a.device for a in controller.alerts()}
    assert alerted == drifting, alerted
    features = {a.feature for a in controller.alerts()}
    assert any(f.startswith("input:") for f in features)
    assert any(f.endswith(":classes") for f in features)
