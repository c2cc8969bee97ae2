"""Probation gates: agreement with the previous model off the request path, error rate."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.update.device import DeviceEffects, UpdateSettings
from edgefleet.agent.update.states import Event, Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget
from tests.conftest import Keys, make_bundle
from tests.models import TrainedModels, train_digits_cnn


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory, signing_keys: Keys) -> Path:
    """A digits model trained to answer (digit + 1) % 10: it disagrees with v1 on purpose."""
    out = tmp_path_factory.mktemp("shifted")
    models = train_digits_cnn(out, epochs=8, label_shift=1)
    return make_bundle(models.tflite, out / "v2-bad.efb", signing_keys, "2.0.0")


def _wait(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.02)


def _agent_on(v1: Path, v2: Path, keys: Keys) -> Agent:
    agent = Agent(keys.trusted)
    previous = agent.load(v1)
    agent.load(v2)
    agent.start_shadow(previous, sample_every=2)
    return agent


def test_agreement_with_the_same_model_is_total(digits_bundles: dict[str, Path],
                                               digits_models: TrainedModels,
                                               signing_keys: Keys, tmp_path: Path) -> None:
    v2 = make_bundle(digits_models.tflite, tmp_path / "v2.efb", signing_keys, "2.0.0")
    agent = _agent_on(digits_bundles["tflite"], v2, signing_keys)
    for x in digits_models.digits.x_test[:100]:
        agent.predict(x[None])
    _wait(lambda: (agent.agreement or {}).get("samples", 0) >= 40)
    agreement = agent.agreement
    assert agreement is not None and agreement["against"] == "1.0.0"
    assert agreement["top1"] == 1.0 and agreement["cosine"] > 0.9999
    assert agent.telemetry_values()["versions"]["2.0.0"]["agreement"]["samples"] >= 40


def test_agreement_is_measured_across_formats_whose_inputs_are_named_differently(
        digits_bundles: dict[str, Path], digits_models: TrainedModels, signing_keys: Keys,
        tmp_path: Path) -> None:
    v2 = make_bundle(digits_models.onnx, tmp_path / "v2.efb", signing_keys, "2.0.0")
    agent = _agent_on(digits_bundles["tflite"], v2, signing_keys)
    assert agent.model is not None
    assert agent.model.runtime.inputs[0].name == "image"  # the .tflite calls it otherwise
    for x in digits_models.digits.x_test[:100]:
        agent.predict(x[None])
    _wait(lambda: (agent.agreement or {}).get("samples", 0) >= 40)
    agreement = agent.agreement
    assert agreement is not None and agreement["samples"] >= 40
    assert agreement["top1"] == 1.0


def test_a_disagreeing_model_fails_the_agreement_gate(
        digits_bundles: dict[str, Path], digits_models: TrainedModels, shifted: Path,
        signing_keys: Keys, tmp_path: Path) -> None:
    agent = _agent_on(digits_bundles["tflite"], shifted, signing_keys)
    for x in digits_models.digits.x_test[:100]:
        agent.predict(x[None])
    _wait(lambda: (agent.agreement or {}).get("samples", 0) >= 40)
    agreement = agent.agreement
    assert agreement is not None and agreement["top1"] < 0.5
    settings = UpdateSettings(probation_s=30, min_agreement=0.9, min_agreement_samples=20)
    effects = DeviceEffects(tmp_path, agent, settings)
    journal = Journal(state=UpdateState.PROBATION, target=UpdateTarget(version="2.0.0"))
    started = time.monotonic()
    assert effects.probation(journal) == Event.FAILURE
    assert time.monotonic() - started < 5, "the gate fires without waiting out the window"


def test_a_model_that_errors_fails_the_error_rate_gate(digits_bundles: dict[str, Path],
                                                       signing_keys: Keys,
                                                       tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["onnx"])
    for _ in range(30):
        with pytest.raises(Exception):  # noqa: B017 - any refusal counts as an error
            agent.predict(np.zeros((1, 8, 8, 1), np.float64))
    settings = UpdateSettings(probation_s=30, max_error_rate=0.05, min_requests=20)
    effects = DeviceEffects(tmp_path, agent, settings)
    journal = Journal(state=UpdateState.PROBATION, target=UpdateTarget(version="1.0.0"))
    assert effects.probation(journal) == Event.FAILURE


def test_a_quiet_probation_commits_at_the_end_of_an_auto_commit_window(
        digits_bundles: dict[str, Path], signing_keys: Keys, tmp_path: Path) -> None:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["onnx"])
    effects = DeviceEffects(tmp_path, agent, UpdateSettings(probation_s=0.3))
    journal = Journal(state=UpdateState.PROBATION, target=UpdateTarget(version="1.0.0",
                                                                auto_commit=True))
    started = time.monotonic()
    assert effects.probation(journal) == Event.COMMIT
    assert time.monotonic() - started >= 0.3


def test_nan_outputs_agree_with_nothing_and_the_telemetry_stays_in_the_fleets_schema(
        digits_bundles: dict[str, Path], digits_models: TrainedModels, signing_keys: Keys,
        tmp_path: Path) -> None:
    import json

    from edgefleet.agent.protocol.schema import finite
    from edgefleet.agent.protocol.telemetry_schema import check_points

    v2 = make_bundle(digits_models.tflite, tmp_path / "v2.efb", signing_keys, "2.0.0")
    agent = _agent_on(digits_bundles["tflite"], v2, signing_keys)
    poisoned = np.full_like(digits_models.digits.x_test[:1], np.nan)
    assert not np.isfinite(next(iter(agent.predict(poisoned).values()))).all()
    for _ in range(40):
        agent.predict(poisoned)
    _wait(lambda: (agent.agreement or {}).get("samples", 0) >= 10)
    agreement = agent.agreement
    assert agreement is not None and agreement["top1"] == 0.0 and agreement["cosine"] == 0.0
    point = {"ts": 1, "values": finite({**agent.telemetry_values(), "schema_version": 1,
                                         "seq": 1, "temperature_c": float("nan")})}
    raw = json.dumps(point, allow_nan=False)
    assert check_points(json.loads(raw))  # the fleet takes it: no figure is NaN



@pytest.mark.parametrize(("word_for", "settled_by"), [("b" * 64, Event.ROLLBACK),
                                                      ("a" * 64, Event.COMMIT)])
def test_a_word_from_the_fleet_that_arrives_before_the_wait_starts_is_kept(
        word_for: str, settled_by: Event, tmp_path: Path, signing_keys: Keys) -> None:
    """The journal is reported PROBATION before the probation wait begins: a rollback
    that arrives in between settles it (it was wiped, and auto-commit won); a word for
    another bundle does not (auto-commit does)."""
    effects = DeviceEffects(tmp_path, Agent(signing_keys.trusted),
                            UpdateSettings(probation_s=0.0, auto_commit=True))
    journal = Journal(target=UpdateTarget(name="m", version="2.0.0", sha256="b" * 64)).enter(
        UpdateState.PROBATION, 0)
    effects.decide(Event.ROLLBACK, word_for)
    assert effects.probation(journal) == settled_by
    assert effects.probation(journal) == Event.COMMIT  # a word is taken once
