"""Drift statistics: the converter's reference, the agent's windows, PSI between them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.drift import (
    DEFAULT_PSI_THRESHOLD,
    DriftWindow,
    compare,
    psi,
    reference_from,
)
from edgefleet.agent.runtime import load_runtime
from tests.conftest import Keys, make_bundle
from tests.models import TrainedModels, load_digits


def test_psi_is_zero_for_the_same_distribution_and_grows_with_the_shift() -> None:
    expected = [0.25, 0.25, 0.25, 0.25]
    assert psi(expected, [25, 25, 25, 25]) == 0.0
    small, large = psi(expected, [30, 25, 25, 20]), psi(expected, [70, 10, 10, 10])
    assert small is not None and large is not None
    assert 0 < small < DEFAULT_PSI_THRESHOLD < large
    assert psi(expected, [0, 0, 0, 100]) is not None  # an empty bin stays finite
    assert psi(expected, [1, 2, 3]) is None  # other bins: no comparison
    assert psi(expected, [0, 0, 0, 0]) is None  # nothing observed


def _reference_and_runtime(models: TrainedModels) -> tuple[object, object]:
    runtime = load_runtime(models.tflite.read_bytes(), "tflite")
    name = runtime.inputs[0].name
    x = load_digits().x_test[:300]
    reference = reference_from({name: x}, runtime.run({name: x}), classifier=True,
                               source="eval")
    return reference, runtime


def test_held_out_digits_stay_below_the_threshold_and_shifted_ones_cross_it(
        digits_models: TrainedModels) -> None:
    reference, runtime = _reference_and_runtime(digits_models)
    assert reference.samples == 300  # type: ignore[attr-defined]
    name = runtime.inputs[0].name  # type: ignore[attr-defined]
    held_out = load_digits().x_test[300:]
    shifted = np.clip(held_out * 0.4 + 0.55, 0, 1).astype(np.float32)  # washed-out pictures

    def window_of(x: np.ndarray) -> dict[str, object]:
        window = DriftWindow(reference, classifier=True)  # type: ignore[arg-type]
        for row in range(len(x)):  # one request at a time, as a device sees them
            feeds = {name: x[row:row + 1]}
            window.add(feeds, runtime.run(feeds))  # type: ignore[attr-defined]
        drained = window.drain()
        assert drained is not None
        return drained

    calm = compare(reference, window_of(held_out))  # type: ignore[arg-type]
    drifted = compare(reference, window_of(shifted))  # type: ignore[arg-type]
    assert set(calm) == {f"input:{name}", f"output:{next(iter(reference.outputs))}:classes",  # type: ignore[attr-defined]
                         f"output:{next(iter(reference.outputs))}:confidence"}  # type: ignore[attr-defined]
    assert max(calm.values()) < DEFAULT_PSI_THRESHOLD, calm
    assert drifted[f"input:{name}"] > DEFAULT_PSI_THRESHOLD, drifted


def test_a_window_counts_every_sample_and_is_empty_after_draining(
        digits_models: TrainedModels) -> None:
    reference, runtime = _reference_and_runtime(digits_models)
    name = runtime.inputs[0].name  # type: ignore[attr-defined]
    x = load_digits().x_test[:40]
    window = DriftWindow(reference, classifier=True)  # type: ignore[arg-type]
    window.add({name: x}, runtime.run({name: x}))  # type: ignore[attr-defined]
    drained = window.drain()
    assert drained is not None and drained["samples"] == 40
    stats = drained["inputs"][name]
    assert sum(stats["hist"]) == 40 and stats["min"] >= 0 and stats["max"] <= 1
    assert stats["mean"] == pytest.approx(float(x.mean()), abs=1e-5)
    assert stats["std"] == pytest.approx(float(x.std()), abs=1e-4)
    (out,) = drained["outputs"].values()
    assert sum(out["classes"]) == 40 and sum(out["confidence_hist"]) == 40
    assert 0 < out["confidence_mean"] <= 1
    assert window.drain() is None


def test_malformed_windows_raise_value_errors(digits_models: TrainedModels) -> None:
    reference, _ = _reference_and_runtime(digits_models)
    name = next(iter(reference.inputs))  # type: ignore[attr-defined]
    bad: dict[str, Any]
    for bad in ({"inputs": []}, {"inputs": {name: 3}}, {"inputs": {name: {"hist": [1, -2]}}},
                {"inputs": {name: {"hist": ["x"]}}}, {"inputs": {name: {"hist": [float("nan")]}}}):
        with pytest.raises(ValueError):
            compare(reference, bad)  # type: ignore[arg-type]
    assert compare(reference, {}) == {}  # type: ignore[arg-type]


def test_a_bundle_carries_the_reference_and_the_agent_reports_windows(
        digits_models: TrainedModels, signing_keys: Keys, tmp_path: Path) -> None:
    x = load_digits().x_test
    runtime = load_runtime(digits_models.tflite.read_bytes(), "tflite")
    name = runtime.inputs[0].name
    bundle = make_bundle(digits_models.tflite, tmp_path / "d.efb", signing_keys,
                         reference_inputs={name: x[:300]}, reference_source="eval")
    monitoring = read_bundle(bundle, signing_keys.trusted).manifest.monitoring
    assert monitoring is not None and monitoring.source == "eval" and monitoring.samples == 300
    assert sum(monitoring.inputs[name].hist) == pytest.approx(1.0, abs=1e-4)

    agent = Agent(signing_keys.trusted)
    agent.load(bundle)
    for row in range(300, 340):
        agent.predict(x[row:row + 1])
    values = agent.telemetry_values()
    drift = values["drift"]
    assert drift["requests"] == 40 and 1 <= drift["samples"] <= 40
    assert sum(drift["inputs"][name]["hist"]) == drift["samples"]
    assert set(compare(monitoring, drift)) >= {f"input:{name}"}
    assert "drift" not in agent.telemetry_values()  # drained: a new window


def test_a_bundle_without_reference_data_still_carries_the_health_reference(
        digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    manifest = read_bundle(digits_bundles["onnx"], signing_keys.trusted).manifest
    assert manifest.monitoring is not None and manifest.monitoring.source == "health"
