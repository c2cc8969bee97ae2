"""The request path's shortcuts answer exactly what the general path does.

``run_array`` (the runtimes' bound fast path), the drift sampler's deadline form of
its token bucket, the latency list a caller may keep appending to, and the HTTP
server's per-model cache of binary request headers.
"""

from __future__ import annotations

import gc
import http.client
import json
import math
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.drift import (
    _MAX_TOKENS_NS,
    INFERENCE_BUDGET,
    MAX_RATE,
    SPACING,
    WALL_BUDGET,
    DriftSampler,
)
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.runtime import load_runtime
from edgefleet.agent.runtime.base import TensorInfo
from edgefleet.agent.runtime.errors import InferenceError
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.serving.kserve import (
    CACHE_SIZE,
    ModelView,
    RequestError,
    decode_infer,
    encode_infer,
)
from edgefleet.agent.stats import VersionStats
from tests.conftest import Keys, make_bundle
from tests.models import TrainedModels

FORMATS = ["tflite", "onnx"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_array_answers_what_run_does_at_every_batch_size(digits_models: TrainedModels,
                                                             fmt: str) -> None:
    runtime = load_runtime(getattr(digits_models, fmt).read_bytes(), fmt)
    name, x = runtime.inputs[0].name, digits_models.digits.x_test
    for rows in (1, 5, 1, 3):  # the batch changes: the interpreter is resized under it
        fast, general = runtime.run_array(x[:rows]), runtime.run({name: x[:rows]})
        assert fast.keys() == general.keys()
        for key in fast:
            np.testing.assert_array_equal(fast[key], general[key])


@pytest.mark.parametrize("fmt", FORMATS)
def test_closing_a_runtime_lets_its_engine_go_and_refuses_requests(
        digits_models: TrainedModels, fmt: str) -> None:
    runtime = load_runtime(getattr(digits_models, fmt).read_bytes(), fmt)
    engine = weakref.ref(runtime._interp if fmt == "tflite" else runtime._session)  # type: ignore[attr-defined]
    x = digits_models.digits.x_test[:1]
    runtime.run_array(x)
    runtime.close()
    gc.collect()
    assert engine() is None  # the bound fast path held no reference to it
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do, never an answer
        runtime.run_array(x)


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_answers_an_array_and_a_mapping_alike_and_counts_both(
        digits_bundles: dict[str, Path], digits_models: TrainedModels, signing_keys: Keys,
        fmt: str) -> None:
    agent = Agent(signing_keys.trusted)
    model = agent.load(digits_bundles[fmt])
    name, x = model.runtime.inputs[0].name, digits_models.digits.x_test[:4]
    by_array, by_name = agent.predict(x), agent.predict({name: x})
    for key in by_array:
        np.testing.assert_array_equal(by_array[key], by_name[key])
    with pytest.raises(InferenceError, match=r"unexpected input 'nope'"):
        agent.predict({"nope": x})
    with pytest.raises(InferenceError, match=r"dtype int32, model expects float32"):
        agent.predict({name: x.astype(np.int32)})
    with pytest.raises(InferenceError, match=r"dtype float64, model expects float32"):
        agent.predict(x.astype(np.float64))  # the array path: the engine's own call refuses
    with pytest.raises(InferenceError, match=r"shape"):
        agent.predict(x[:, :4])
    values = agent.telemetry_values()
    assert values["inferences"] == 2 and values["errors"] == 4
    assert values["drift"]["requests"] == 2


def test_a_kept_latency_append_still_records_after_a_drain() -> None:
    stats = VersionStats()
    record = stats.samples.append  # what the agent binds once per loaded model
    record(2_000_000)
    assert stats.drain().inferences == 1
    record(3_000_000)
    record(5_000_000)
    window = stats.drain()
    assert window.inferences == 2 and window.p50_ms == 4.0
    assert stats.total_inferences == 3


class _CpuClock:
    """CPU nanoseconds that move only when told. A picked request reads it twice around its
    copy, then the worker twice around the summary (``drain`` waits for the summary, so
    the reads never interleave): the copy "costs" ``copy`` and the summary ``summary``."""

    def __init__(self) -> None:
        self.copy = self.summary = 0
        self._reads, self._now = 0, 0

    def __call__(self) -> int:
        self._reads += 1
        if self._reads % 2:  # a measurement begins
            return self._now
        self._now += self.copy if self._reads % 4 == 2 else self.summary
        return self._now


def _bucket_decisions(steps: list[tuple[int, int, int]], start: int) -> list[bool]:
    """The token bucket of docs/monitoring.md, as first written: per request, earn 0.5 % of
    the inference and 0.5 % of the wall time since the last one; summarise when the
    bucket holds the last summary's cost and enough requests came since the last summary:
    SPACING, or as many as came in 1/MAX_RATE s at the rate between the last two picks if
    that is more; a summary spends its cost, capped at 50 ms."""
    tokens, cost, last, decisions = float(_MAX_TOKENS_NS), 0.0, start, []
    since, wanted, picked = SPACING, SPACING, None
    for started, ended, spent in steps:
        tokens += (ended - started) * INFERENCE_BUDGET + (ended - last) * WALL_BUDGET
        last = ended
        since += 1
        decisions.append(tokens >= cost and since >= wanted)
        if decisions[-1]:
            rate = since / ((ended - picked) / 1e9) if picked is not None else 0.0
            wanted = max(SPACING, math.ceil(rate / MAX_RATE - 1e-9))
            since, picked = 0, ended
            cost = float(spent)
            tokens = min(tokens - spent, _MAX_TOKENS_NS)
    return decisions


def test_the_drift_deadline_decides_like_the_token_bucket(
        digits_bundles: dict[str, Path], digits_models: TrainedModels,
        signing_keys: Keys) -> None:
    manifest = read_bundle(digits_bundles["tflite"], signing_keys.trusted).manifest
    runtime = load_runtime(digits_models.tflite.read_bytes(), "tflite")
    x = digits_models.digits.x_test[:1]
    outputs = runtime.run_array(x)
    rng = np.random.default_rng(7)
    start = now = 1_000_000_000_000
    steps = []
    for _ in range(3000):  # bursts of a fast model, pauses, and slow requests
        gap = int(rng.choice([0, 2_000, 50_000, 20_000_000]))
        took = int(rng.choice([8_000, 10_000, 900_000]))
        started = now + gap
        now = started + took
        steps.append((started, now, int(rng.integers(20_000, 200_000))))
    cpu = _CpuClock()
    sampler, decided = DriftSampler(manifest, lambda: start, cpu), []
    for started, ended, spent in steps:  # a pick costs its copy plus the worker's summary
        cpu.copy = spent // 8
        cpu.summary = spent - cpu.copy
        sampler.offer(x, outputs, started, ended)
        window = sampler.drain()  # waits for the worker's summary and charge
        decided.append(window is not None and window["samples"] == 1)
    expected = _bucket_decisions(steps, start)
    assert decided == expected
    assert 30 < sum(decided) < len(decided)  # the test covers both answers
    assert sampler.dropped == 0


@pytest.fixture
def served(digits_bundles: dict[str, Path], signing_keys: Keys) -> Iterator[
        tuple[Agent, InferenceServer]]:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["tflite"])
    server = InferenceServer(agent).start()
    yield agent, server
    server.stop()


def _binary_request(name: str, x: np.ndarray, **extra: object) -> tuple[bytes, dict[str, str]]:
    raw = x.tobytes()
    header = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "parameters": {"binary_data_output": True}, **extra}).encode()
    return header + raw, {"Content-Type": "application/octet-stream",
                          "Inference-Header-Content-Length": str(len(header))}


def _post(conn: http.client.HTTPConnection, body: bytes,
          headers: dict[str, str]) -> tuple[int, dict[str, object], bytes]:
    conn.request("POST", "/v2/models/digits/infer", body, headers)
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        return response.status, json.loads(payload), b""
    length = int(response.getheader("Inference-Header-Content-Length") or len(payload))
    return response.status, json.loads(payload[:length]), payload[length:]


def test_repeated_binary_requests_are_answered_from_their_own_data(
        served: tuple[Agent, InferenceServer], digits_models: TrainedModels) -> None:
    agent, server = served
    name = agent.model.runtime.inputs[0].name  # type: ignore[union-attr]
    x = digits_models.digits.x_test
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    for i in range(6):  # one header, six bodies
        body, headers = _binary_request(name, x[i:i + 1])
        status, doc, raw = _post(conn, body, headers)
        assert status == 200 and doc["model_version"] == "1.0.0"
        expected = next(iter(agent.predict(x[i:i + 1]).values()))
        np.testing.assert_array_equal(np.frombuffer(raw, np.float32).reshape(1, 10), expected)
    body, headers = _binary_request(name, x[:1])
    status, doc, _ = _post(conn, body[:-4], headers)  # the same header, 4 bytes short
    assert status == 400 and "(252 left in the body)" in str(doc["error"])
    for request_id in ("a", "b"):
        body, headers = _binary_request(name, x[:1], id=request_id)
        assert _post(conn, body, headers)[1]["id"] == request_id
    conn.close()


def test_a_new_model_version_is_named_by_the_next_repeated_request(
        served: tuple[Agent, InferenceServer], digits_models: TrainedModels,
        signing_keys: Keys, tmp_path: Path) -> None:
    agent, server = served
    name = agent.model.runtime.inputs[0].name  # type: ignore[union-attr]
    body, headers = _binary_request(name, digits_models.digits.x_test[:1])
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    assert _post(conn, body, headers)[1]["model_version"] == "1.0.0"
    agent.load(make_bundle(digits_models.tflite, tmp_path / "v2.efb", signing_keys,
                           version="2.0.0"))
    assert _post(conn, body, headers)[1]["model_version"] == "2.0.0"
    conn.close()


def test_header_cache_is_bounded_and_never_changes_an_answer() -> None:
    view = ModelView("m", "1", "tflite_litert", [TensorInfo("x", (-1, 3), "float32")],
                     [TensorInfo("y", (-1, 3), "float32")])
    for rows in range(1, CACHE_SIZE + 10):
        x = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
        body, headers = _binary_request("x", x, id=f"r{rows}")
        length = int(headers["Inference-Header-Content-Length"])
        for _ in range(2):  # parsed, then from the cache
            request = decode_infer(body, length, view)
            np.testing.assert_array_equal(request.inputs["x"], x)
            payload, json_length = encode_infer(view, request, {"y": x * 2})
            assert json_length is not None
            doc = json.loads(payload[:json_length])
            assert doc["id"] == f"r{rows}" and doc["outputs"][0]["shape"] == [rows, 3]
            np.testing.assert_array_equal(
                np.frombuffer(payload[json_length:], np.float32).reshape(rows, 3), x * 2)
        assert len(view.plans) <= CACHE_SIZE
    body, headers = _binary_request("x", np.zeros((1, 3), np.float32))
    length = int(headers["Inference-Header-Content-Length"])
    decode_infer(body, length, view)
    with pytest.raises(RequestError, match="needs 12 bytes"):  # a cached header, a short body
        decode_infer(body[:-1], length, view)
