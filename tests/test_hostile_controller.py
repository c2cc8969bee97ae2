"""Hostile input to the controller, as classes: rollout options, device messages, Range.

One controller per module (not started: its MQTT handler ``_message`` and its loop's
``step`` are called as paho and the loop thread call them) behind its real HTTP API on a
free port, holding the digits bundle. Each test generates its class with hypothesis
(``tests/hostile.py``: ``EDGEFLEET_HOSTILE_EXAMPLES``, 200 by default) and asserts: no
5xx and no traceback, the named error (field, reason), nothing stored or kept of what
was refused, other work carries on, and a stated memory cap.
"""

from __future__ import annotations

import copy
import http.client
import itertools
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.protocol.schema import NAME_PATTERN
from edgefleet.agent.protocol.telemetry_schema import TelemetrySchemaError, check_values
from edgefleet.cli import app
from edgefleet.cli.fleet.top import collect
from edgefleet.fleet.api import ApiServer
from edgefleet.fleet.client import FleetClient
from edgefleet.fleet.controller import ControllerConfig, FleetController
from edgefleet.fleet.ingest import REASONS, SLOTS, UPDATE_STATES
from edgefleet.fleet.rollout import executor
from edgefleet.fleet.rollout.executor import DeviceView, Observations
from edgefleet.fleet.rollout.spec import Gates, RolloutSpec, Selector, Wave
from edgefleet.fleet.rollout.state import Rollout, RolloutState
from edgefleet.fleet.rollout.validate import RolloutOptionError, check_options, rollout_spec
from edgefleet.fleet.store import Store, open_store
from tests.conftest import Keys
from tests.hostile import HOSTILE, MiB, peak_traced_bytes

TOKEN, FLEET = "hostile-token-123", "hostile"
MODEL = "digits:1.0.0"


class Served:
    """The module's controller, its API, and the bundle it serves."""

    def __init__(self, ctl: FleetController, api: ApiServer, bundle: bytes, ref: BundleRef):
        self.ctl, self.api, self.bundle, self.ref = ctl, api, bundle, ref
        self.client = FleetClient(api.url, TOKEN)
        self.ids = itertools.count()

    def device(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}"

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api.port, timeout=30)
        try:
            conn.request("POST", path, body, {"Authorization": f"Bearer {TOKEN}",
                                              "Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def get(self, path: str, headers: dict[str, str] | None = None
            ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.api.port, timeout=30)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}",
                                               **(headers or {})})
            response = conn.getresponse()
            return response.status, response.headers, response.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, digits_bundles: dict[str, Path],
           signing_keys: Keys) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hostile-controller")
    store: Store = open_store(f"sqlite:///{root / 'fleet.db'}")
    config = ControllerConfig(fleet=FLEET, broker_url="mqtt://127.0.0.1:1",
                              data_dir=root / "controller", public_url="http://127.0.0.1:1",
                              trusted=signing_keys.trusted)
    ctl = FleetController(config, store)
    data = digits_bundles["onnx"].read_bytes()
    model, _ = ctl.push(data, "alice")
    api = ApiServer(ctl, {TOKEN: "alice"}).start()
    yield Served(ctl, api, data, model.ref)
    api.stop()
    store.close()


def _strict_json(text: bytes | str) -> Any:
    """JSON as a browser reads it: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a view's JSON")
    return json.loads(text, parse_constant=refuse)


# --- point 9: rollout options -----------------------------------------------------------

NUMBER_FIELDS = ["rate_per_min", "exponential", "device_timeout_s", "soak_s",
                 "gates.max_failures_pct", "gates.min_success_pct", "gates.max_p95_ratio",
                 "gates.max_error_rate_pct", "gates.min_agreement_pct", "gates.min_samples"]
# not a finite number in any field's range: each is refused, naming the field
BAD_NUMBERS = st.sampled_from([math.nan, math.inf, -math.inf, -1, -0.5, 10**30, -(10**30),
                               1e300, True, False, "5", "nan", [1], {"n": 1}, [[[]]]])
BAD_SELECTORS = st.sampled_from(["device:" + "x" * 100_000, "device:", "device:a b",
                                 "group:" + "g" * 65, "tag:", "group:a\nb", "nope:x", "x",
                                 "device:../etc", 7, None, ["group:a"]]) | st.text(max_size=80)
BAD_WAVES = st.sampled_from(["nan%", "nan", "inf", "inf%", "-5%", "0", "0%", "101%", "1.5",
                             "1e2", "", "²", "٣%", "٣", "١٠%", " 50% ", "5\n", "50%\n",
                             "\t5", "10" * 10, 5, None, ["1%"]])


def _valid_options(device: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"selectors": st.just([f"device:{device}"])}, optional={
        "waves": st.lists(st.integers(1, 99).map("{}%".format), min_size=1, max_size=4),
        "rate_per_min": st.none() | st.floats(0.1, 1e6),
        "exponential": st.floats(1, 10),
        "device_timeout_s": st.floats(1, 86_400),
        "soak_s": st.floats(0, 86_400),
        "gates": st.fixed_dictionaries({}, optional={
            "max_failures_pct": st.floats(0, 100), "min_samples": st.integers(0, 10**6),
            "max_p95_ratio": st.none() | st.floats(0.01, 1000),
            "max_error_rate_pct": st.none() | st.floats(0, 100),
            "min_agreement_pct": st.none() | st.floats(0, 100)})})


@st.composite
def rollout_options(draw: st.DrawFn, device: str) -> tuple[dict[str, Any], str | None]:
    """(options, the field that must be named, or None for options that must pass)."""
    options = draw(_valid_options(device))
    how = draw(st.sampled_from(["valid", "number", "number", "selector", "wave", "many",
                                "unknown", "gates-type"]))
    if how == "number":
        field = draw(st.sampled_from(NUMBER_FIELDS))
        target = options.setdefault("gates", {}) if field.startswith("gates.") else options
        target[field.removeprefix("gates.")] = draw(BAD_NUMBERS)
        return options, field
    if how == "selector":
        options["selectors"] = [*options["selectors"], draw(BAD_SELECTORS)]
        return options, "selectors"
    if how == "wave":
        waves = list(options.get("waves") or ["100%"])
        waves.insert(draw(st.integers(0, len(waves))), draw(BAD_WAVES))
        options["waves"] = waves
        return options, "waves"
    if how == "many":
        field = draw(st.sampled_from(["selectors", "waves"]))
        options[field] = ([f"tag:t{i}" for i in range(1001)] if field == "selectors"
                          else [f"{i}" for i in range(1, 102)])
        return options, field
    if how == "unknown":
        options[draw(st.sampled_from(["soak", "rate", "gate", "x" * 200]))] = 1
        return options, "unknown"
    if how == "gates-type":
        options["gates"] = draw(st.sampled_from([[1], "strict", 5, True]))
        return options, "gates"
    return options, None


def test_rollout_options_outside_their_range_are_refused_naming_the_field_and_nothing_is_stored(
        served: Served) -> None:
    ctl = served.ctl

    @HOSTILE
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        options, field = data.draw(rollout_options(served.device("opt")))
        body = json.dumps({"model": MODEL, **options}, allow_nan=True).encode()
        stored, audit = len(ctl.rollouts()), len(ctl.history(10_000))
        result, peak = peak_traced_bytes(lambda: served.post("/api/v1/rollouts", body))
        assert not isinstance(result, BaseException), result
        status, answer = result
        assert peak < 16 * MiB + 4 * len(body), f"{peak} bytes to refuse {len(body)}"
        if field is None:
            assert status == 201, answer
            _assert_finite(answer["spec"])
            return
        assert status == 400, (options, answer)
        named = answer.get("field", "")
        assert named == field or (field == "unknown" and "is not a rollout option" in
                                  answer["error"]), (field, answer)
        assert len(answer["error"]) < 400, "the error repeats what it was sent"
        assert len(ctl.rollouts()) == stored and len(ctl.history(10_000)) == audit

    check()


def test_a_whole_float_is_a_count_and_only_ascii_digits_make_a_wave() -> None:
    checked = check_options({"selectors": ["group:g"], "waves": ["5", "50%"],
                             "gates": {"min_samples": 7.0}})
    assert checked.gates.min_samples == 7 and isinstance(checked.gates.min_samples, int)
    assert [str(w) for w in checked.waves] == ["5", "50%", "100%"]


@pytest.mark.parametrize("field", [*NUMBER_FIELDS, "model"])
def test_a_number_of_5000_digits_or_a_bad_model_is_refused_naming_its_field(
        served: Served, field: str) -> None:
    ctl = served.ctl
    options: dict[str, Any] = {"model": MODEL, "selectors": [f"device:{served.device('big')}"]}
    target = options.setdefault("gates", {}) if field.startswith("gates.") else options
    target[field.removeprefix("gates.")] = "HUGE"
    huge = ("-" if field == "soak_s" else "") + "9" * 5000
    body = json.dumps(options).replace('"HUGE"', huge).encode()
    stored = len(ctl.rollouts())
    status, answer = served.post("/api/v1/rollouts", body)
    assert status == 400 and answer["field"] == field, answer
    assert "Exceeds the limit" not in answer["error"], answer
    assert len(answer["error"]) < 400 and len(ctl.rollouts()) == stored
    if field == "model":
        assert answer["error"].startswith("rollout option model must be NAME:VERSION")


def _assert_finite(spec: dict[str, Any]) -> None:
    numbers = [spec["exponential"], spec["device_timeout_s"], spec["soak_s"],
               *(v for v in spec["gates"].values() if isinstance(v, int | float))]
    if spec["rate_per_min"] is not None:
        numbers.append(spec["rate_per_min"])
    assert all(math.isfinite(n) for n in numbers), spec


DAYS_30 = 30 * 24 * 3600


@pytest.mark.parametrize(("options", "field"), [
    ({"rate_per_min": 1_000_000}, None), ({"rate_per_min": 1_000_000.5}, "rate_per_min"),
    ({"exponential": 10}, None), ({"exponential": 10.01}, "exponential"),
    ({"soak_s": DAYS_30}, None), ({"soak_s": DAYS_30 + 1}, "soak_s"),
    ({"device_timeout_s": DAYS_30}, None), ({"device_timeout_s": 0}, "device_timeout_s"),
    ({"selectors": [f"tag:t{i}" for i in range(1000)]}, None),
    ({"selectors": [f"tag:t{i}" for i in range(1001)]}, "selectors"),
    ({"selectors": ["group:" + "g" * 64]}, None),
    ({"selectors": ["group:" + "g" * 65]}, "selectors"),
    ({"waves": [str(i) for i in range(1, 100)] + ["100%"]}, None),
    ({"waves": [str(i) for i in range(1, 101)]}, "waves"),
    ({"waves": ["10000000", "100%"]}, None), ({"waves": ["10000001"]}, "waves"),
    ({"gates": {"max_p95_ratio": 1000}}, None),
    ({"gates": {"max_p95_ratio": 1000.5}}, "gates.max_p95_ratio"),
    ({"gates": {"min_samples": 10**9}}, None), ({"gates": {"min_samples": 1.0}}, None),
    ({"gates": {"min_samples": 1.5}}, "gates.min_samples"),
    ({"gates": {"min_samples": 10**9 + 1}}, "gates.min_samples")])
def test_the_rollout_option_bounds_hold_exactly_at_their_value(
        options: dict[str, Any], field: str | None) -> None:
    options = {"selectors": ["group:g"], **options}
    if field is None:
        check_options(options)
        return
    with pytest.raises(RolloutOptionError) as refused:
        check_options(options)
    assert refused.value.field == field


FLAG_VALUES = st.sampled_from(["nan", "inf", "-inf", "-1", "1e400", "-5e-324"])


@pytest.mark.parametrize("flag", ["--rate", "--exponential", "--max-failures", "--min-success",
                                  "--max-p95-ratio", "--max-error-rate", "--min-agreement"])
def test_the_cli_refuses_a_bad_rollout_option_with_one_error_and_sends_nothing(
        served: Served, flag: str) -> None:
    runner = CliRunner()
    stored = len(served.ctl.rollouts())

    @HOSTILE
    @given(value=FLAG_VALUES)
    def check(value: str) -> None:
        result = runner.invoke(app, ["fleet", "rollout", "create", "--model", MODEL,
                                     "--to", "group:cams", flag, value,
                                     "--controller", served.api.url, "--token", TOKEN])
        assert result.exit_code == 2, result.output
        text = result.output  # stdout and stderr, as a terminal shows them
        assert "Traceback" not in text and text.count("error:") == 1, text
        assert flag in " ".join(text.split()), text
        assert len(served.ctl.rollouts()) == stored, "a refused rollout was sent"

    check()


def test_the_cli_refuses_a_selector_of_100000_characters(served: Served) -> None:
    result = CliRunner().invoke(app, ["fleet", "rollout", "create", "--model", MODEL, "--to",
                                      "device:" + "x" * 100_000, "--controller",
                                      served.api.url, "--token", TOKEN])
    assert result.exit_code == 2
    assert "--to" in result.output and len(result.output) < 2000


# --- point 9: one broken rollout never stops the others --------------------------------

def _report(served: Served, device: str, state: str, active: BundleRef | None,
            target: BundleRef | None) -> None:
    body: dict[str, Any] = {
        "schema_version": 1, "fleet": FLEET, "device": device, "agent_version": "0.1.0",
        "runtimes": {"onnxruntime": "1.32.0"}, "active": _ref(active),
        "update": {"schema_version": 1, "state": state, "target": _ref(target),
                   "since": served.ctl.clock()}}
    served.ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/state/reported",
                        json.dumps(body).encode())


def _ref(ref: BundleRef | None) -> dict[str, Any] | None:
    return None if ref is None else ref.model_dump()


# what an earlier edgefleet stored: the non-finite values its checks let through (NaN
# compares false with every bound; Infinity passed the lower ones)
BROKEN = st.sampled_from([("rate", math.nan), ("rate", math.inf), ("percent wave", math.nan),
                          ("timeout", math.nan), ("timeout", math.inf), ("soak", math.nan),
                          ("soak", math.inf)])


def _broken_spec(good: RolloutSpec, how: str, value: float) -> RolloutSpec:
    """A spec an earlier edgefleet could store: built without today's checks."""
    spec = replace(good)
    changes: dict[str, tuple[str, Any]] = {
        "rate": ("rate_per_min", value),
        "percent wave": ("waves", (Wave(value, True), Wave(100.0, True))),
        "timeout": ("device_timeout_s", value), "soak": ("soak_s", value)}
    name, changed = changes[how]
    object.__setattr__(spec, name, changed)
    return spec


def test_a_stored_rollout_whose_tick_raises_is_stopped_and_a_healthy_one_completes(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    ctl = served.ctl

    @HOSTILE
    @given(broken=BROKEN)
    def check(broken: tuple[str, float]) -> None:
        how, value = broken
        bad_device, good_device = served.device("bad"), served.device("good")
        for device in (bad_device, good_device):
            _report(served, device, "IDLE", None, None)
            ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/status", b"online")
        base = rollout_spec({"selectors": [f"device:{bad_device}"]}, served.ref,
                            ctl.bundle_url(served.ref.sha256), len(served.bundle))
        broken_ticks = ctl.broken_ticks
        bad = Rollout(ctl.store.new_rollout_id(), _broken_spec(base, how, value),
                      created_ms=ctl.clock(), updated_ms=ctl.clock(), created_by="old")
        ctl.store.save_rollout(bad)
        ctl.runner.load()  # as after a restart: the store's live rollouts are followed
        caplog.clear()
        healthy = ctl.create_rollout(MODEL, {"selectors": [f"device:{good_device}"]}, "alice")
        for state, active, target in (("DOWNLOADING", None, served.ref),
                                      ("PROBATION", served.ref, served.ref),
                                      ("COMMITTED", served.ref, None)):
            ctl.step()
            _report(served, good_device, state, active, target)
        ctl.step()
        assert ctl.rollout(healthy.id).state == RolloutState.SUCCEEDED
        for path in ("/api/v1/rollouts", f"/api/v1/rollouts/{bad.id}", "/metrics"):
            status, _, body = served.get(path)  # the stored NaN is shown as null
            assert status == 200 and (path == "/metrics" or _strict_json(body)), body[:300]
        stopped = ctl.rollout(bad.id)
        if ctl.broken_ticks > broken_ticks:
            assert stopped.state == RolloutState.ABORTED and "its tick failed" in stopped.reason
            assert any(bad.id in r.getMessage() for r in caplog.records
                       if r.levelno >= logging.ERROR)
        else:  # a non-finite timeout or soak raises nothing: it runs (or ends by its gates)
            assert how in ("timeout", "soak"), stopped.reason
            if not stopped.finished:
                ctl.operate(bad.id, "abort", "alice")

    check()


# --- issue 16 point 5: gates that agree ------------------------------------------------

def test_max_failures_alone_lets_its_failures_pass_and_a_contradiction_is_refused(
        served: Served) -> None:
    spec = rollout_spec({"selectors": ["group:g"], "gates": {"max_failures_pct": 20}},
                        served.ref, "http://x/b.efb", 1)
    assert spec.gates == Gates(max_failures_pct=20, min_success_pct=80)
    devices = [f"d{i}" for i in range(10)]
    idle = DeviceView(online=True, active=None)
    rollout = executor.tick(Rollout("r1", spec), Observations(dict.fromkeys(devices, idle)),
                            0).rollout
    failed = DeviceView(online=True, active=None, update_state="FAILED",
                        update_target=served.ref.sha256, update_detail="health check failed")
    done = DeviceView(online=True, active=served.ref, update_state="COMMITTED")
    views = {d: failed if d == "d0" else done for d in devices}
    rollout = executor.tick(rollout, Observations(views), 1).rollout
    assert rollout.state == RolloutState.SUCCEEDED, rollout.reason  # 1 of 10 failed: 10%
    status, answer = served.post("/api/v1/rollouts", json.dumps({
        "model": MODEL, "selectors": ["group:g"],
        "gates": {"max_failures_pct": 20, "min_success_pct": 100}}).encode())
    assert status == 400 and answer["field"] == "gates.min_success_pct"
    assert "--max-failures 20" in answer["error"] and "80" in answer["hint"]


# --- point 10: device messages ----------------------------------------------------------

NAMES = st.from_regex(NAME_PATTERN.replace("{0,63}", "{0,12}"), fullmatch=True)
SEMVER = st.builds("{}.{}.{}".format, *(st.integers(0, 30) for _ in range(3)))
COUNT = st.integers(0, 10**9)
MEASURE = st.none() | st.floats(0, 1e4)
WINDOW = st.fixed_dictionaries(
    {"inferences": COUNT, "errors": COUNT, "latency_p50_ms": MEASURE,
     "latency_p95_ms": MEASURE, "latency_p99_ms": MEASURE, "throughput_rps": MEASURE},
    optional={"agreement": st.fixed_dictionaries({
        "against": SEMVER, "samples": COUNT, "dropped": COUNT,
        "top1": st.none() | st.floats(0, 1), "cosine": st.none() | st.floats(-1, 1)})})


@st.composite
def points(draw: st.DrawFn) -> dict[str, Any]:
    """One point as ``TelemetryReporter`` publishes ``Agent.telemetry_values()``."""
    versions = draw(st.dictionaries(SEMVER, WINDOW, min_size=1, max_size=3))
    active = draw(st.sampled_from(sorted(versions)))
    values = {"versions": versions, "model": draw(NAMES), "model_version": active,
              **{k: v for k, v in versions[active].items()}, "schema_version": 1,
              "seq": draw(COUNT), "inferences_total": draw(COUNT), "errors_total": draw(COUNT),
              "cpu_percent": draw(MEASURE), "rss_bytes": draw(COUNT),
              "temperature_c": draw(st.none() | st.floats(-40, 150)),
              "spool_dropped": draw(COUNT), "spool_pending": draw(COUNT)}
    if draw(st.booleans()):
        values["drift"] = {"samples": draw(COUNT), "inputs": {"x": {"n": 3, "mean": 0.5,
                                                                  "hist": [1, 2, 0]}}}
    return {"ts": draw(st.integers(0, 2**45)), "values": values}


# where the schema names a kind, and values that are never of it
NUMERIC_PATHS = [("seq",), ("inferences",), ("errors",), ("latency_p95_ms",),
                 ("inferences_total",), ("errors_total",), ("cpu_percent",), ("rss_bytes",),
                 ("spool_dropped",), ("versions", "*", "inferences"),
                 ("versions", "*", "errors"), ("versions", "*", "latency_p50_ms"),
                 ("versions", "*", "throughput_rps")]
NEVER_A_FIGURE = st.sampled_from([math.nan, math.inf, -math.inf, -1, -(2**70), 2**70, 1e300,
                                  "12", [1], {"n": 1}, True, [[[[1]]]], "x" * 10_000])
NEVER_A_CONTAINER = st.sampled_from([[1], "x", 5, math.nan, True, [[{"a": 1}]]])


def _nested(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                         max_size=3)


ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
                        | st.text(max_size=20), _nested, max_leaves=12)


def _containers(doc: Any) -> list[Any]:
    found = [doc] if isinstance(doc, dict | list) and doc else []
    for child in (doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list)
                  else ()):
        found += _containers(child)
    return found


@st.composite
def telemetry_messages(draw: st.DrawFn) -> tuple[bytes, bool | None]:
    """(payload, whether it must pass): a point or batch, valid or mutated at any level."""
    batch = draw(st.lists(points(), min_size=1, max_size=3))
    doc: Any = batch if len(batch) > 1 or draw(st.booleans()) else batch[0]
    how = draw(st.sampled_from(["valid", "figure", "figure", "container", "any", "drop",
                                "deep", "garbage"]))
    point = draw(st.sampled_from(batch))
    values = point["values"]
    if how == "figure":
        path = draw(st.sampled_from(NUMERIC_PATHS))
        node = values
        for key in path[:-1]:
            node = node[draw(st.sampled_from(sorted(node)))] if key == "*" else node[key]
        node[path[-1]] = draw(NEVER_A_FIGURE)
        return json.dumps(doc, allow_nan=True).encode(), False
    if how == "container":
        key = draw(st.sampled_from(["versions", "agreement", "version window"]))
        bad = draw(NEVER_A_CONTAINER)
        if key == "version window":
            values["versions"][draw(st.sampled_from(sorted(values["versions"])))] = bad
        else:
            values[key] = bad
        return json.dumps(doc, allow_nan=True).encode(), False
    if how in ("any", "drop"):
        node = draw(st.sampled_from(_containers(doc)))
        keys = sorted(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        if how == "drop":
            del node[key]
        else:
            node[key] = draw(ANY_JSON)
        return json.dumps(doc, allow_nan=True).encode(), None
    if how == "deep":  # too deep for any JSON reader, or deep in a field nobody reads
        if draw(st.booleans()):
            return b'{"ts": 1, "values": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", False
        values["extra"] = json.loads("[" * 200 + "]" * 200)
        return json.dumps(doc).encode(), True
    if how == "garbage":
        return draw(st.binary(max_size=200)), None
    return json.dumps(doc).encode(), True


# what no agent reports: (field, values); each is refused (schema, or identity for fleet)
ODD: dict[str, tuple[str, st.SearchStrategy[Any]]] = {
    "state": ("update.state", st.sampled_from(["WEIRD", "idle", "", "IDLE ", "PROBATION\n"])
              | st.text(max_size=20).filter(lambda t: t not in UPDATE_STATES)),
    "slot": ("slot", st.sampled_from(["c", "A", "", "a ", "ab"])),
    "serving": ("serving", st.sampled_from(["yes", "true", 1, 0, "1"])),
    "fleet": ("fleet", st.sampled_from(["G", FLEET.upper(), f"{FLEET}-2", ""])),
    "ts": ("ts", st.sampled_from([2**63 - 1, 2**53, -1, 2**62])),
}


@st.composite
def other_messages(draw: st.DrawFn, device: str) -> tuple[str, bytes, bool | None]:
    """(leaf, payload, must pass): a device's report, event or status, valid or broken."""
    leaf = draw(st.sampled_from(["state/reported", "events", "status"]))
    if leaf == "status":
        payload = draw(st.sampled_from([b"online", b"offline"]) | st.binary(max_size=70))
        # an empty payload clears a retained message: ignored, not refused
        return leaf, payload, payload in (b"online", b"offline", b"")
    if leaf == "events":
        doc: Any = {"schema_version": 1, "seq": draw(COUNT), "ts": draw(COUNT),
                    "kind": draw(st.text(max_size=20)), "detail": draw(st.text(max_size=40))}
        bad = draw(st.sampled_from([None, "seq", "schema_version", "kind"]))
        if bad is not None:
            doc[bad] = draw(st.sampled_from([math.nan, -1, [1], {"a": 1}, None]))
        return leaf, json.dumps(doc, allow_nan=True).encode(), bad is None
    doc = {"schema_version": 1, "fleet": FLEET, "device": device, "agent_version": "0.1.0",
           "runtimes": {"onnxruntime": "1.32.0"}, "slot": draw(st.sampled_from(["a", "b", None])),
           "serving": draw(st.booleans()), "ts": draw(st.integers(0, 2**53 - 1)),
           "update": {"schema_version": 1, "state": draw(st.sampled_from(sorted(UPDATE_STATES))),
                      "detail": "", "since": 1}}
    bad = draw(st.sampled_from([None, "nul", "surrogate", "since", "device", "deep", *ODD]))
    if bad in ODD:
        field, value = ODD[bad]
        target = doc["update"] if field == "update.state" else doc
        target[field.removeprefix("update.")] = draw(value)
        return leaf, json.dumps(doc).encode(), False
    if bad == "nul":
        doc["update"]["detail"] = "a\x00b"
    elif bad == "surrogate":
        doc["agent_version"] = "\ud800"
    elif bad == "since":
        doc["update"]["since"] = draw(st.sampled_from([2**63, 2**70, -1]))
    elif bad == "device":
        doc["device"] = "someone-else"
    elif bad == "deep":
        doc["runtimes"] = json.loads('{"a":' * 40 + "1" + "}" * 40)
    return leaf, json.dumps(doc).encode(), bad is None


def test_the_update_states_and_slots_the_controller_takes_are_the_agents() -> None:
    from edgefleet.agent.protocol.update_state import UpdateState
    from edgefleet.agent.update.slots import SLOTS as AGENT_SLOTS
    assert {s.value for s in UpdateState} == UPDATE_STATES
    assert set(AGENT_SLOTS) == SLOTS


@pytest.mark.parametrize(("field", "value", "why"), [
    ("update.state", "WEIRD", "schema"), ("slot", "c", "schema"), ("serving", "yes", "schema"),
    ("fleet", "G", "identity"), ("ts", 2**63 - 1, "schema"), ("ts", 2**53, "schema"),
    ("ts", 2**53 - 1, None), ("slot", None, None), ("serving", False, None)])
def test_the_issues_reported_cases_are_refused_by_reason_and_nothing_is_kept(
        served: Served, field: str, value: Any, why: str | None) -> None:
    ctl, device = served.ctl, served.device("odd")
    doc: dict[str, Any] = {"schema_version": 1, "fleet": FLEET, "device": device,
                           "agent_version": "0.1.0", "slot": "a", "serving": True, "ts": 5,
                           "update": {"schema_version": 1, "state": "IDLE", "since": 1}}
    (doc["update"] if field == "update.state" else doc)[field.removeprefix("update.")] = value
    before = dict(ctl.rejected_by)
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/state/reported", json.dumps(doc).encode())
    ctl.step()
    kept = ctl.store.device(device)
    if why is None:
        assert dict(ctl.rejected_by) == before
        assert kept is not None and kept.agent_version == "0.1.0"
        return
    assert ctl.rejected_by[why] == before.get(why, 0) + 1
    assert kept is None or kept.agent_version is None, "a refused report was kept"


@pytest.mark.parametrize("drift", [{"inputs": {"x": {"mean": math.inf}}}, [1], "x", 5,
                                   json.loads('{"a":' * 10 + "1" + "}" * 10), None])
def test_an_unusable_drift_window_is_dropped_alone_and_the_point_is_kept(
        served: Served, drift: Any) -> None:
    """A drift window summarises what the device was sent (one request of Infinity
    makes it infinite): it goes, the point's figures stay, and nothing is rejected."""
    ctl, device = served.ctl, served.device("drift")
    values: dict[str, Any] = {"schema_version": 1, "model": "digits", "model_version": "1.0.0",
                              "versions": {"1.0.0": {"inferences": 7, "errors": 0}},
                              "drift": drift}
    if drift is None:  # a window without model and model_version beside it
        values = {"schema_version": 1, "drift": {"samples": 3}}
    rejected, dropped = ctl.rejected, ctl.drift.rejected
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/telemetry",
                 json.dumps({"ts": 5, "values": values}).encode())
    kept = ctl.telemetry.snapshot()[device]
    assert ctl.rejected == rejected and ctl.drift.rejected == dropped + 1
    assert "drift" not in kept and kept.get("versions") == values.get("versions")


def _views(served: Served, every: bool = True) -> dict[str, Any]:
    """Every view of what devices said: overview, devices, /metrics, the dashboard's
    first snapshot, and ``fleet top``'s frame; each must answer 200 with strict JSON.
    Not ``every``: the overview and /metrics only (the two that broke)."""
    seen: dict[str, Any] = {}
    paths = ("/api/v1/overview", "/api/v1/devices", "/healthz") if every else (
        "/api/v1/overview",)
    for path in paths:
        status, _, body = served.get(path)
        assert status == 200, (path, body[:300])
        seen[path] = _strict_json(body)
    status, _, body = served.get("/metrics")
    assert status == 200, body[:300]
    seen["/metrics"] = {f.name: f for f in text_string_to_metric_families(body.decode())}
    if not every:
        return seen
    seen["dashboard"] = _dashboard_snapshot(served)
    seen["top"] = collect(served.client)
    json.dumps(seen["top"], allow_nan=False)
    return seen


def _dashboard_snapshot(served: Served) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", served.api.port, timeout=30)
    try:
        conn.request("GET", f"/api/v1/stream?token={TOKEN}")
        response = conn.getresponse()
        assert response.status == 200
        event = ""
        while line := response.fp.readline():
            text = line.decode().strip()
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: ") and event == "snapshot":
                return _strict_json(text[6:])
        raise AssertionError("the stream ended before a snapshot")
    finally:
        conn.close()


def _rejected_in_metrics(views: dict[str, Any]) -> dict[str, float]:
    family = views["/metrics"]["edgefleet_messages_rejected"]
    return {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_device_messages_outside_their_schema_are_counted_by_reason_and_never_reach_a_view(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    ctl = served.ctl
    device = served.device("cam")
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/status", b"online")

    @HOSTILE
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        if data.draw(st.booleans()):
            leaf, (payload, must_pass) = "telemetry", data.draw(telemetry_messages())
        else:
            leaf, payload, must_pass = data.draw(other_messages(device))
        rejected, by_reason = ctl.rejected, dict(ctl.rejected_by)
        latest = copy.deepcopy(ctl.telemetry.snapshot().get(device))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgefleet.fleet.controller"):
            result, peak = peak_traced_bytes(lambda: ctl.intake.message(
                f"edgefleet/v1/{FLEET}/{device}/{leaf}", payload))
        assert not isinstance(result, BaseException), result
        assert peak < 64 * MiB, f"{peak} bytes for a message of {len(payload)}"
        drops = [r for r in caplog.records if "dropped a message" in r.getMessage()]
        assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
        assert ctl.rejected - rejected == len(drops) <= 1
        if must_pass is True:
            assert not drops, drops[0].getMessage()
        if must_pass is False:
            assert drops, f"{leaf} {payload[:200]!r} got in"
        if drops:
            reason = re.search(r"\((\w+)\)", drops[0].getMessage())
            assert reason and reason.group(1) in REASONS
            assert ctl.rejected_by[reason.group(1)] == by_reason.get(reason.group(1), 0) + 1
            assert ctl.telemetry.snapshot().get(device) == latest, "a refused point was kept"
        if data.draw(st.integers(0, 9)) == 0:  # now and then, the device goes away
            ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/status", b"offline")
        ctl.step()  # the loop writes the device as it now is
        views = _views(served, every=data.draw(st.integers(0, 3)) == 0)
        assert views["/api/v1/overview"]["rejected"] == ctl.rejected
        assert sum(_rejected_in_metrics(views).values()) == ctl.rejected

    check()


@pytest.mark.parametrize("leaf", ["telemetry", "state/reported", "events", "status"])
def test_an_oversized_message_is_refused_before_it_is_parsed(served: Served, leaf: str) -> None:
    ctl = served.ctl
    payload = b"[" + b"1," * (1024 * 1024) + b"1]"
    before = ctl.rejected_by["too_large"]
    result, peak = peak_traced_bytes(lambda: ctl.intake.message(
        f"edgefleet/v1/{FLEET}/{served.device('big')}/{leaf}", payload))
    assert result is None and ctl.rejected_by["too_large"] == before + 1
    assert peak < 1 * MiB, f"{peak} bytes to refuse {len(payload)}"


def _window_versions(count: int) -> dict[str, Any]:
    return {f"1.0.{i}": {"inferences": 1} for i in range(count)}


@pytest.mark.parametrize(("values", "points", "passes"), [
    ({"versions": _window_versions(64)}, 1, True),
    ({"versions": _window_versions(65)}, 1, False),
    ({"model_version": "1.0.0-" + "a" * 122}, 1, True),  # 128 characters
    ({"model_version": "1.0.0-" + "a" * 123}, 1, False),
    ({"seq": 2**53}, 1, True), ({"seq": 2**53 + 1}, 1, False),
    ({"cpu_percent": 1e12}, 1, True), ({"cpu_percent": 1.0000001e12}, 1, False),
    ({}, 1000, True), ({}, 1001, False)])
def test_the_telemetry_bounds_hold_exactly_at_their_value(
        served: Served, values: dict[str, Any], points: int, passes: bool) -> None:
    ctl = served.ctl
    point = {"ts": 1, "values": {"schema_version": 1, **values}}
    payload = json.dumps(point if points == 1 else [point] * points).encode()
    rejected = ctl.rejected
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{served.device('bound')}/telemetry", payload)
    assert (ctl.rejected == rejected) is passes


def test_the_issues_telemetry_cases_are_each_refused_and_the_views_answer(
        served: Served) -> None:
    ctl = served.ctl
    device = served.device("issue")
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/status", b"online")
    base = {"schema_version": 1, "model": "digits", "model_version": "1.0.0"}
    for versions in ({"1.0.0": {"inferences": 5, "agreement": [1]}},
                     {"1.0.0": {"inferences": math.inf}}, {"1.0.0": {"agreement": "x"}},
                     [{"inferences": 5}]):
        before = ctl.rejected_by["schema"]
        payload = json.dumps({"ts": 1, "values": {**base, "versions": versions}})
        ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/telemetry", payload.encode())
        assert ctl.rejected_by["schema"] == before + 1, payload
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/status", b"offline")
    assert _rejected_in_metrics(_views(served))["schema"] >= 4


def _refused(values: Any) -> bool:
    try:
        check_values(values)
    except TelemetrySchemaError:
        return True
    return False


@HOSTILE
@given(message=telemetry_messages(), name=NAMES)
def test_a_model_window_under_models_is_held_to_the_schema_of_the_flat_keys(
        message: tuple[bytes, bool | None], name: str) -> None:
    """The class of every telemetry point above, its values moved under ``models.NAME``
    (an agent of several models): refused exactly when the flat point is."""
    try:
        doc = json.loads(message[0])
    except (ValueError, RecursionError):
        return
    for item in doc if isinstance(doc, list) else [doc]:
        values = item.get("values") if isinstance(item, dict) else None
        if not isinstance(values, dict) or "models" in values:
            continue
        key = values["model"] if type(values.get("model")) is str else name  # its own key
        nested = {"schema_version": 1, "seq": 1, "models": {key: values}}
        assert _refused(nested) is _refused(values), values


def _hostile_window() -> dict[str, Any]:
    """What the flat keys refuse, as the issue sent it under ``models.digits``."""
    bad = {"inferences": 1e300, "errors": -7, "latency_p95_ms": -1e308,
           "latency_p50_ms": "fast", "inferences_total": 1e300}
    versions: dict[str, Any] = {f'9.9.{i}"}} evil\n': {"inferences": 1} for i in range(5000)}
    return {"model": "digits", "model_version": "2.0.0", "versions": versions, **bad}


def _good_window(name: str) -> dict[str, Any]:
    return {"model": name, "model_version": "1.0.0", "inferences": 3, "errors": 0,
            "versions": {"1.0.0": {"inferences": 3, "errors": 0}}}


@pytest.mark.parametrize(("models", "passes"), [
    ({"digits": _good_window("digits"), "cls": _good_window("cls")}, True),
    ({f"m{i}": _good_window(f"m{i}") for i in range(16)}, True),
    ({f"m{i}": _good_window(f"m{i}") for i in range(17)}, False),
    ({"digits": _hostile_window()}, False),
    ({"digits": {**_good_window("digits"), "errors": -7}}, False),
    ({"digits": {**_good_window("digits"), "inferences": 1e300}}, False),
    ({"digits": {**_good_window("digits"), "latency_p50_ms": "fast"}}, False),
    ({"digits": {**_good_window("digits"), "model_version": "evil"}}, False),
    ({"digits": {**_good_window("digits"), "versions": _window_versions(65)}}, False),
    ({"digits": {**_good_window("digits"), "versions": {"x": {"inferences": 1}}}}, False),
    ({"digits": {**_good_window("digits"), "models": {"digits": _good_window("digits")}}},
     False),
    ({"Not A Name!": _good_window("digits")}, False),
    ({"digits": _good_window("cls")}, False), ({"digits": {"model": None}}, False),
    ({"digits": {"model_version": "1.0.0"}}, True),
    ({"digits": [1]}, False), ([_good_window("digits")], False)])
def test_a_point_with_a_bad_model_window_is_refused_whole_and_counted_as_schema(
        served: Served, models: Any, passes: bool) -> None:
    ctl = served.ctl
    device = served.device("models")
    values = {"schema_version": 1, "seq": 1, **_good_window("digits"), "models": models}
    before, rejected = ctl.rejected_by["schema"], ctl.rejected
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/telemetry",
                       json.dumps({"ts": 1, "values": values}).encode())
    assert (ctl.rejected == rejected) is passes
    assert ctl.rejected_by["schema"] == before + (0 if passes else 1)
    assert (device in ctl.telemetry.snapshot()) is passes, "a refused point was kept"


def test_a_model_window_that_names_another_model_than_its_key_is_refused_by_name(
        served: Served) -> None:
    """The window under ``models.digits`` says ``"model": "cls"``: no reader can tell which
    model it counts for, so the point is refused under ``schema`` and the log names both."""
    ctl = served.ctl
    device = served.device("models-mismatch")
    values = {"schema_version": 1, "seq": 1, "models": {"digits": _good_window("cls")}}
    with pytest.raises(TelemetrySchemaError, match=r"models\.digits\.model is not its key "
                                                   r"'digits'.*got 'cls'"):
        check_values(values)
    before = _rejected_in_metrics(_views(served, every=False))["schema"]
    ctl.intake.message(f"edgefleet/v1/{FLEET}/{device}/telemetry",
                       json.dumps({"ts": 1, "values": values}).encode())
    assert _rejected_in_metrics(_views(served, every=False))["schema"] == before + 1
    assert device not in ctl.telemetry.snapshot()


# --- point 11: Range on /bundles --------------------------------------------------------

DIGITS = st.text("0123456789", min_size=1, max_size=30) | st.sampled_from(
    ["9" * 5000, "0", "00", "18446744073709551616", "²", "٣", "1.5", "-1", " 1", "+1", "0x1"])


@st.composite
def range_headers(draw: st.DrawFn, size: int) -> str:
    position = st.integers(0, size + 10).map(str) | DIGITS
    spec = st.one_of(
        st.builds("{}-{}".format, position, position),
        st.builds("{}-".format, position),
        st.builds("-{}".format, position),
        st.just("-"), st.text(max_size=12))
    specs = draw(st.lists(spec, min_size=1, max_size=3))
    unit = draw(st.sampled_from(["bytes", "bytes", "BYTES", "Bytes", "items", "", "bytes "]))
    separator = draw(st.sampled_from([",", ", ", " ,", ",,"]))
    text = f"{unit}={separator.join(specs)}".replace("\r", "").replace("\n", "")
    return text.encode("latin-1", "replace").decode("latin-1")


def test_range_headers_are_answered_by_rfc_9110(served: Served) -> None:
    body, size = served.bundle, len(served.bundle)
    path = f"/bundles/{served.ref.sha256}.efb"
    content_range = re.compile(r"bytes (\d+)-(\d+)/(\d+)")

    @HOSTILE
    @given(header=range_headers(size))
    def check(header: str) -> None:
        result, peak = peak_traced_bytes(lambda: served.get(path, {"Range": header}))
        assert not isinstance(result, BaseException), result
        status, headers, got = result
        assert peak < 16 * MiB + 3 * size
        assert status == _rfc_9110_status(header, size), (header, status, got[:200])
        if status == 200:
            assert got == body and "Content-Range" not in headers
        elif status == 206:
            match = content_range.fullmatch(headers["Content-Range"])
            assert match, headers["Content-Range"]
            start, end, total = map(int, match.groups())
            assert start <= end < total == size and got == body[start:end + 1]
            assert int(headers["Content-Length"]) == len(got) == end - start + 1
        else:
            assert headers["Content-Range"] == f"bytes */{size}"
            assert "error" in json.loads(got)

    check()


def _rfc_9110_status(header: str, size: int) -> int:
    """The status RFC 9110 section 14 gives one ``Range`` header on ``size`` bytes, read
    independently of the server: 200 ignored, 206 a range (the whole file too), 416."""
    unit, sep, rest = header.strip().partition("=")
    specs = [r.strip(" \t") for r in rest.split(",") if r.strip(" \t")] if sep else []
    match = re.fullmatch(r"([0-9]*)-([0-9]*)", specs[0]) if len(specs) == 1 else None
    if unit.lower() != "bytes" or match is None or match.groups() == ("", ""):
        return 200
    first, last = (None if not g else int(g) if len(g) < 100 else 10**100
                   for g in match.groups())
    if first is None:
        return 206 if last else 416
    if last is not None and last < first:
        return 200
    return 206 if first < size else 416


@pytest.mark.parametrize(("header", "status", "span"), [
    ("bytes=" + "9" * 5000 + "-", 416, None), ("bytes=-0", 416, None),
    ("bytes=0-0", 206, (0, 0)), ("bytes=-1", 206, (-1, -1)), ("bytes=5-3", 200, None),
    ("bytes=0-1,3-4", 200, None), ("bytes=²-", 200, None),
    ("bytes=1-" + "9" * 5000, 206, (1, -1)), ("items=0-1", 200, None),
    # a suffix longer than the file is all of it; an end past the end is the end, however
    # many digits it has (only a start of more than 18 digits is past any file)
    ("bytes=-99999999", 206, (0, -1)), ("bytes=0-99999999999999999999", 206, (0, -1)),
    ("bytes=0-", 206, (0, -1)), ("bytes=9999999999999999999-", 416, None)])
def test_the_issues_range_cases(served: Served, header: str, status: int,
                                span: tuple[int, int] | None) -> None:
    got, headers, body = served.get(f"/bundles/{served.ref.sha256}.efb", {"Range": header})
    size = len(served.bundle)
    assert got == status == _rfc_9110_status(header, size)
    if status == 416:
        assert headers["Content-Range"] == f"bytes */{size}"
    if span is not None:
        start, end = (p % size for p in span)
        assert headers["Content-Range"] == f"bytes {start}-{end}/{size}"
        assert body == served.bundle[start:end + 1]


def test_two_range_headers_are_both_ignored(served: Served) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", served.api.port, timeout=30)
    try:
        conn.putrequest("GET", f"/bundles/{served.ref.sha256}.efb")
        conn.putheader("Range", "bytes=0-0")
        conn.putheader("Range", "bytes=5-9")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 200 and "Content-Range" not in response.headers
        assert response.read() == served.bundle
    finally:
        conn.close()


@pytest.mark.parametrize("name", ["UPPER", "no-efb", "short", "other-ext", "sub/dir"])
def test_a_bundle_path_that_names_no_stored_bundle_is_404_without_a_token(
        served: Served, name: str) -> None:
    sha = served.ref.sha256
    path = {"UPPER": f"{sha.upper()}.efb", "no-efb": sha, "short": "abc.efb",
            "other-ext": f"{sha}.tar", "sub/dir": f"x/{sha}.efb"}[name]
    conn = http.client.HTTPConnection("127.0.0.1", served.api.port, timeout=30)
    try:
        conn.request("GET", f"/bundles/{path}")  # no token
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 404 and answer["kind"] == "NotFoundError", answer
    assert "token" not in answer["error"]


def test_the_stored_spec_of_a_checked_rollout_round_trips(served: Served) -> None:
    spec = rollout_spec({"selectors": ["group:a", "tag:b", "device:c-1"],
                         "waves": ["1", "50%"], "rate_per_min": 5, "exponential": 2},
                        served.ref, "http://x/b.efb", 1)
    assert RolloutSpec.from_dict(spec.as_dict()) == spec
    assert spec.selectors[2] == Selector("device", "c-1")
    assert spec.waves[-1] == Wave(100.0, True)


def test_a_name_seen_before_is_no_version() -> None:
    """The schema remembers the names and versions it matched: a model named ``x`` seen
    first must not make ``x`` pass as a version key (it did, once the two shared a set)."""
    check_values({"schema_version": 1, **_good_window("x")})
    with pytest.raises(TelemetrySchemaError, match="versions key"):
        check_values({"schema_version": 1, **_good_window("digits"),
                      "versions": {"x": {"inferences": 1}}})
