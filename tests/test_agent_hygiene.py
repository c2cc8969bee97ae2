"""What the request path leaves behind: bounded memory, copies of reused buffers, closed
runtimes that say so, and drift summaries made on one background thread per agent."""

from __future__ import annotations

import gc
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core import Agent, NotReadyError
from edgefleet.agent.drift import WORKER_NAME, DriftSampler, DriftWorker
from edgefleet.agent.loader import load_bundle
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.runtime.errors import InferenceError, ModelClosedError
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.stats import CAP, RESERVOIR, VersionStats
from tests.conftest import Keys
from tests.models import TrainedModels

FORMATS = ["tflite", "onnx"]


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _drift_workers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == WORKER_NAME}


# --- 1. latency samples stay bounded -------------------------------------------------------


def test_latencies_stay_bounded_without_telemetry_and_counts_stay_exact(
        digits_bundles: dict[str, Path], digits_models: TrainedModels,
        signing_keys: Keys) -> None:
    agent = Agent(signing_keys.trusted)  # no broker, no telemetry loop: nothing drains
    model = agent.load(digits_bundles["tflite"])
    stats, x = agent.stats_of(model.version), digits_models.digits.x_test[:1]
    n, clock, outer = 250_000, time.perf_counter_ns, np.empty(250_000, np.int64)
    peak = 0
    for i in range(n):
        began = clock()
        agent.predict(x)
        outer[i] = clock() - began
        if i % 5000 == 0:
            peak = max(peak, len(stats.samples))
    assert peak <= CAP + 25_000  # the worker folds the list once CAP latencies wait
    assert stats.total_inferences + len(stats.samples) == n  # folded ones are counted
    values = agent.telemetry_values()
    assert values["inferences"] == n and values["inferences_total"] == n
    p50, p95, p99 = (values[f"latency_{p}_ms"] for p in ("p50", "p95", "p99"))
    # each inner latency lies inside the test's own timing of the same call
    assert 0 < p50 <= p95 <= p99
    assert 0.3 * np.median(outer) / 1e6 < p50 <= np.median(outer) / 1e6
    agent.close()


def test_a_folded_window_publishes_uniform_sample_percentiles() -> None:
    stats, rng = VersionStats(), np.random.default_rng(3)
    stats._rng = np.random.default_rng(11)  # the reservoir's draws: the same in every run
    record = stats.samples.append  # what the agent binds once per loaded model
    latencies = rng.lognormal(np.log(2e6), 0.6, 250_000).astype(np.int64)
    for i, value in enumerate(latencies.tolist()):
        record(value)
        if i % 1000 == 0:
            stats.trim()  # as the agent's worker does between requests
            assert len(stats.samples) < CAP + 1000
    window = stats.drain()
    assert window.inferences == len(latencies) and stats.total_inferences == len(latencies)
    exact = np.percentile(latencies / 1e6, [50, 95, 99])
    assert window.p50_ms == pytest.approx(exact[0], rel=0.02)
    assert window.p95_ms == pytest.approx(exact[1], rel=0.02)
    assert window.p99_ms == pytest.approx(exact[2], rel=0.04)
    for value in (1_000_000, 3_000_000):  # the next window is small: exact again
        record(value)
    stats.trim()
    again = stats.drain()
    assert again.inferences == 2 and again.p50_ms == 2.0
    assert stats.total_inferences == len(latencies) + 2


def test_the_reservoir_keeps_its_size_and_only_values_it_was_given() -> None:
    stats = VersionStats()
    given = np.arange(3 * CAP, dtype=np.int64)
    for start in range(0, len(given), CAP):
        stats.samples.extend(given[start:start + CAP].tolist())
        stats.trim()
    assert not stats.samples and len(stats._kept) == RESERVOIR
    assert len(np.unique(stats._kept)) == RESERVOIR and np.isin(stats._kept, given).all()
    # a uniform sample: each third of the window holds about a third of it
    thirds = np.histogram(stats._kept, bins=3, range=(0, 3 * CAP))[0]
    assert np.all(np.abs(thirds - RESERVOIR / 3) < RESERVOIR * 0.03)


# --- 2. the shadow compares what the request carried ---------------------------------------


def test_the_shadow_compares_the_input_the_request_carried_not_the_reused_buffer(
        digits_bundles: dict[str, Path], digits_models: TrainedModels,
        signing_keys: Keys) -> None:
    agent = Agent(signing_keys.trusted)
    previous = load_bundle(digits_bundles["tflite"], signing_keys.trusted)
    model = agent.load(digits_bundles["tflite"])  # the same model: agreement must be total
    agent.start_shadow(previous, sample_every=1)
    x = digits_models.digits.x_test[:80]
    classes = np.array([next(iter(model.runtime.run_array(x[i:i + 1]).values())).argmax()
                        for i in range(len(x))])
    buffer = np.empty_like(x[:1])  # one camera buffer, refilled for every frame
    for i in range(40):
        other = int(np.flatnonzero(classes != classes[i])[0])
        buffer[...] = x[i]
        agent.predict(buffer)
        buffer[...] = x[other]  # the next frame lands at once, before the shadow runs
    assert _wait(lambda: (agent.agreement or {}).get("samples", 0)
                 + (agent.agreement or {}).get("dropped", 0) >= 40)
    agreement = agent.agreement
    assert agreement is not None and agreement["samples"] >= 30
    assert agreement["top1"] == 1.0 and agreement["cosine"] > 0.9999
    agent.close()


# --- 3. a closed runtime says so -----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_closed_runtime_refuses_with_a_project_error_on_every_path(
        digits_bundles: dict[str, Path], digits_models: TrainedModels, signing_keys: Keys,
        fmt: str) -> None:
    agent = Agent(signing_keys.trusted)
    model = agent.load(digits_bundles[fmt])
    runtime, x = model.runtime, digits_models.digits.x_test[:3]
    name = runtime.inputs[0].name
    agent.predict(x[:1])
    runtime.close()
    calls: dict[str, Callable[[], object]] = {
        "run_array": lambda: runtime.run_array(x[:1]),
        "run_array, another batch": lambda: runtime.run_array(x),
        "run": lambda: runtime.run({name: x[:1]}),
        "run, another batch": lambda: runtime.run({name: x}),
        "Agent.predict": lambda: agent.predict(x[:1])}
    for what, call in calls.items():
        with pytest.raises(ModelClosedError, match="was closed") as caught:
            call()
        assert isinstance(caught.value, InferenceError), what
        assert "load the bundle again" in caught.value.hint, what
    assert agent.stats_of(model.version).pending_errors == 1  # the agent counted its refusal
    server = InferenceServer(agent).start()
    try:  # over HTTP a closed model is "not now, retry", not a bad request
        body = json.dumps({"inputs": [{"name": name, "shape": [1, *x.shape[1:]],
                                       "datatype": "FP32",
                                       "data": x[:1].reshape(-1).tolist()}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/v2/models/{model.name}/infer", body,
            {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
        assert "was closed" in json.loads(refused.value.read())["error"]
    finally:
        server.stop()
    agent.close()


# --- 4. drift summaries off the request path -----------------------------------------------


def test_drift_summarises_what_the_request_carried_after_the_caller_reuses_its_buffer(
        digits_bundles: dict[str, Path], digits_models: TrainedModels,
        signing_keys: Keys) -> None:
    agent = Agent(signing_keys.trusted)
    model = agent.load(digits_bundles["tflite"])
    buffer = digits_models.digits.x_test[:1].copy()  # values in [0, 1]
    outputs = agent.predict(buffer)  # the first request is always summarised (full bucket)
    buffer[...] = 100.0
    for array in outputs.values():
        array[...] = -1.0  # the caller owns the answer too
    drift = agent.telemetry_values()["drift"]
    summary = drift["inputs"][model.runtime.inputs[0].name]
    assert drift["samples"] == 1 and summary["max"] <= 1.0
    output = next(iter(drift["outputs"].values()))
    assert output["confidence_mean"] > 0.1  # the softmax of the answer, not of -1s
    agent.close()


def test_a_pick_that_finds_the_worker_busy_is_dropped_without_waiting(
        digits_bundles: dict[str, Path], digits_models: TrainedModels,
        signing_keys: Keys) -> None:
    manifest = read_bundle(digits_bundles["tflite"], signing_keys.trusted).manifest
    x = digits_models.digits.x_test[:1]
    outputs = {"out": np.full((1, 10), 0.1, np.float32)}
    worker, gate = DriftWorker(size=1).start(), threading.Event()
    assert worker.submit(lambda: gate.wait())  # the thread takes it and blocks
    assert _wait(lambda: worker.submit(lambda: None))  # and now the queue is full
    sampler = DriftSampler(manifest, worker=worker)
    began = time.perf_counter_ns()
    sampler.offer(x, outputs, began, began + 1_000)
    assert time.perf_counter_ns() - began < 50_000_000 and sampler.dropped == 1
    assert sampler.drain() is None  # nothing was summarised, and drain did not wait for it
    gate.set()
    worker.stop()


def test_one_drift_worker_per_agent_across_swaps_and_none_after_close(
        digits_bundles: dict[str, Path], digits_models: TrainedModels,
        signing_keys: Keys) -> None:
    gc.collect()
    before = _drift_workers()
    agent = Agent(signing_keys.trusted)
    x = digits_models.digits.x_test[:1]
    for i in range(5):  # five bundles loaded in turn
        agent.load(digits_bundles[FORMATS[i % 2]])
        for _ in range(20):
            agent.predict(x)
    assert agent.telemetry_values()["drift"]["samples"] >= 1
    ours = _drift_workers() - before
    assert len(ours) == 1
    agent.close()
    assert not any(t.is_alive() for t in ours)
    with pytest.raises(NotReadyError):
        agent.predict(x)
    agent.load(digits_bundles["onnx"])  # a closed agent may serve again
    agent.predict(x)
    assert agent.telemetry_values()["drift"]["samples"] == 1
    agent.close()


def test_an_agent_dropped_without_close_ends_its_drift_worker(
        digits_bundles: dict[str, Path], digits_models: TrainedModels,
        signing_keys: Keys) -> None:
    gc.collect()
    before = _drift_workers()
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["tflite"])
    agent.predict(digits_models.digits.x_test[:1])
    (thread,) = _drift_workers() - before
    del agent
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()
