"""Every runtime runs the real digits CNN: signatures, accuracy, batches, threads."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.core import Agent, NotReadyError
from edgefleet.agent.runtime import (
    InferenceError,
    RuntimeLoadError,
    installed_runtimes,
    load_runtime,
)
from edgefleet.agent.runtime.select import tflite_op_level, version_tuple
from tests.conftest import Keys
from tests.models import TrainedModels


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(axis=1) == labels).mean())


@pytest.mark.parametrize(("fmt", "runtime_name"), [("tflite", "litert"),
                                                    ("onnx", "onnxruntime")])
def test_runtime_classifies_held_out_digits(digits_models: TrainedModels, fmt: str,
                                            runtime_name: str) -> None:
    runtime = load_runtime(getattr(digits_models, fmt).read_bytes(), fmt, threads=2)
    assert runtime.name == runtime_name and runtime.threads == 2
    [spec] = runtime.inputs
    assert spec.shape[1:] == (8, 8, 1) and spec.dtype == "float32" and not spec.quantized
    assert runtime.outputs[0].shape[-1] == 10
    x, y = digits_models.digits.x_test, digits_models.digits.y_test
    probs = next(iter(runtime.run({spec.name: x}).values()))
    assert probs.shape == (len(x), 10)
    assert _accuracy(probs, y) >= 0.95


def test_tflite_and_onnx_agree_on_every_digit(digits_models: TrainedModels) -> None:
    x = digits_models.digits.x_test
    outs = []
    for fmt in ("tflite", "onnx"):
        rt = load_runtime(getattr(digits_models, fmt).read_bytes(), fmt)
        outs.append(next(iter(rt.run({rt.inputs[0].name: x}).values())))
    assert np.array_equal(outs[0].argmax(1), outs[1].argmax(1))
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def test_batch_sizes_can_change_between_calls(digits_models: TrainedModels) -> None:
    rt = load_runtime(digits_models.tflite.read_bytes(), "tflite")
    name = rt.inputs[0].name
    x = digits_models.digits.x_test
    single = [next(iter(rt.run({name: x[i:i + 1]}).values()))[0] for i in range(5)]
    batch = next(iter(rt.run({name: x[:5]}).values()))
    np.testing.assert_allclose(batch, np.stack(single), atol=1e-6)


def test_installed_runtimes_are_reported() -> None:
    found = installed_runtimes()
    assert "litert" in found and "onnxruntime" in found
    assert version_tuple(found["onnxruntime"]) >= (1, 18)


def test_unknown_format_is_refused() -> None:
    with pytest.raises(RuntimeLoadError, match="unknown model format 'pt'"):
        load_runtime(b"x", "pt")


def test_garbage_tflite_names_every_runtime_tried() -> None:
    with pytest.raises(RuntimeLoadError, match="litert .* cannot load the model"):
        load_runtime(b"\x00" * 64, "tflite")


def test_too_old_runtime_is_refused_by_version(digits_models: TrainedModels) -> None:
    with pytest.raises(RuntimeLoadError, match=r"loads TFLite ops up to TF 2\.\d+\.0, the model "
                       r"needs TF >= 99\.0 \(ops above version 1: "):
        load_runtime(digits_models.tflite.read_bytes(), "tflite", required="litert",
                     min_version="99.0")


def test_onnx_runtime_older_than_required_is_refused(digits_models: TrainedModels) -> None:
    with pytest.raises(RuntimeLoadError, match=r"onnxruntime .* is too old: the model needs "
                       r"onnxruntime >= 9\.0"):
        load_runtime(digits_models.onnx.read_bytes(), "onnx", required="onnxruntime",
                     min_version="9.0")


@pytest.mark.parametrize(("runtime", "version", "level"), [
    ("litert", "1.2.0", "2.19.0"), ("litert", "2.3.0", "2.21.0"), ("litert", "9.0.0", "2.21.0"),
    ("litert", "0.9.0", "2.17.0"), ("tflite-runtime", "2.14.0", "2.14.0")])
def test_tflite_op_level_of_each_runtime(runtime: str, version: str, level: str) -> None:
    assert tflite_op_level(runtime, version) == level


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_agent_predict_is_accurate_and_counted(digits_bundles: dict[str, object],
                                               digits_models: TrainedModels,
                                               signing_keys: Keys, fmt: str) -> None:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles[fmt])  # type: ignore[arg-type]
    x, y = digits_models.digits.x_test, digits_models.digits.y_test
    probs = next(iter(agent.predict(x).values()))
    assert _accuracy(probs, y) >= 0.95
    for i in range(10):
        agent.predict(x[i:i + 1])
    values = agent.telemetry_values()
    assert values["model"] == "digits" and values["model_version"] == "1.0.0"
    assert values["inferences"] == 11 and values["errors"] == 0
    assert 0 < values["latency_p50_ms"] <= values["latency_p95_ms"] <= values["latency_p99_ms"]
    assert agent.telemetry_values()["inferences"] == 0  # the window was drained


def test_agent_names_a_wrong_input(digits_bundles: dict[str, object], signing_keys: Keys) -> None:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["onnx"])  # type: ignore[arg-type]
    with pytest.raises(InferenceError, match=r"dtype float64, model expects float32"):
        agent.predict(np.zeros((1, 8, 8, 1), dtype=np.float64))
    with pytest.raises(InferenceError, match=r"shape \[1, 8, 8\], model expects"):
        agent.predict(np.zeros((1, 8, 8), dtype=np.float32))
    assert agent.telemetry_values()["errors"] == 2


def test_agent_without_a_model_is_not_ready(signing_keys: Keys) -> None:
    agent = Agent(signing_keys.trusted)
    assert not agent.ready
    with pytest.raises(NotReadyError):
        agent.predict(np.zeros((1, 8, 8, 1), dtype=np.float32))
