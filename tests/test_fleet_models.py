"""The controller with a device of several models: a rollout touches only the model of its
bundle's name, a rollback returns only that model, an agent of one model (protocol version 1)
is still sent version 1, and the device views show each device's models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.models import ModelSet
from edgefleet.agent.protocol.payloads import (
    MAX_MODELS,
    BundleRef,
    DesiredModels,
    DesiredState,
    ModelReport,
    ReportedState,
    decode,
    decode_desired,
    encode,
)
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.agent.runtime.select import installed_runtimes
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import local
from edgefleet.cli.fleet.top import collect
from edgefleet.fleet.control.observer import _full
from edgefleet.fleet.domain import Device, ModelState
from edgefleet.fleet.metrics import _device_families
from edgefleet.fleet.registry import apply_reported
from edgefleet.fleet.telemetry import TelemetryBook
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.fleet_harness import Fleet, log_in, wait_until
from tests.models import TrainedModels

_SHA = {"a": "a" * 64, "b": "b" * 64}


@pytest.fixture(scope="module")
def bundles(digits_models: TrainedModels, signing_keys: Keys,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("fleet-models")
    return {"digits-1": make_bundle(digits_models.tflite, out / "d1.efb", signing_keys, "1.0.0"),
            "digits-2": make_bundle(digits_models.tflite, out / "d2.efb", signing_keys, "2.0.0",
                                    rows=16),
            "keyword-1": make_bundle(digits_models.onnx, out / "k1.efb", signing_keys, "1.0.0",
                                     name="keyword"),
            "keyword-2": make_bundle(digits_models.onnx, out / "k2.efb", signing_keys, "2.0.0",
                                     name="keyword")}


def _two_model_device(fleet: Fleet, keys: Keys, bundles: dict[str, Path]) -> AgentService:
    models, data = ModelSet(keys.trusted), fleet.root / "devices" / "cam-2m"
    for ref in ("digits-1", "keyword-1"):
        local.install_model(models, data, bundles[ref])
    service = AgentService(ServiceConfig(fleet=fleet.name, device_id="cam-2m", data_dir=data,
                                         broker_url=fleet.broker_url, telemetry_interval_s=0.3,
                                         probation_s=600), models)
    service.start()
    fleet.agents["cam-2m"] = service
    return service


def _device(fleet: Fleet, device: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        (d for d in fleet.client().get("/api/v1/devices") if d["id"] == device), {})
    return found


def _versions(device: dict[str, Any]) -> dict[str, str | None]:
    return {name: (state["active"] or {}).get("version")
            for name, state in (device.get("models") or {}).items()}


def _to(sub: Subscriber, device: str) -> list[bytes]:
    return [m.payload for m in list(sub.messages) if f"/{device}/" in m.topic]


def _settled(fleet: Fleet, rollout: str, state: str) -> bool:
    return bool(fleet.client().get(f"/api/v1/rollouts/{rollout}")["state"] == state)


def test_a_rollout_and_its_rollback_touch_only_the_model_of_their_bundle(
        fleet: Fleet, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    client = fleet.start_controller()
    service = _two_model_device(fleet, signing_keys, bundles)
    keyword = service.models["keyword"].model
    wait_until(lambda: _versions(_device(fleet, "cam-2m")) == {"digits": "1.0.0",
                                                               "keyword": "1.0.0"},
               30, what="the device registered with its two models")
    client.post("/api/v1/devices/group", {"devices": ["cam-2m"], "group": "cams"})
    client.upload("/api/v1/models", bundles["digits-2"].read_bytes())
    sub = Subscriber(fleet.broker_url, [device_topic(fleet.name, "cam-2m", Leaf.DESIRED)])
    try:
        rollout = client.post("/api/v1/rollouts", {
            "model": "digits:2.0.0", "selectors": ["group:cams"], "waves": ["100%"],
            "device_timeout_s": 60, "soak_s": 0.5})
        wait_until(lambda: _settled(fleet, rollout["id"], "SUCCEEDED"), 90, what="digits 2.0.0")
        sent = decode_desired(sub.messages[0].payload)
        assert isinstance(sent, DesiredModels) and list(sent.models) == ["digits"]
        wait_until(lambda: _versions(_device(fleet, "cam-2m")) == {"digits": "2.0.0",
                                                                   "keyword": "1.0.0"},
                   30, what="the registry to show digits 2.0.0 beside keyword 1.0.0")
        client.post(f"/api/v1/rollouts/{rollout['id']}/rollback")
        wait_until(lambda: _versions(_device(fleet, "cam-2m")) == {"digits": "1.0.0",
                                                                   "keyword": "1.0.0"},
                   60, what="digits back on 1.0.0")
    finally:
        sub.close()
    assert service.models["keyword"].model is keyword, "keyword was never reloaded"
    listed = _device(fleet, "cam-2m")
    assert listed["models"]["keyword"]["update_state"] == "COMMITTED"


def _overview_counts(fleet: Fleet) -> tuple[dict[str, int], dict[str, int]]:
    overview = fleet.client().overview()
    return overview["versions"], overview["update_states"]


def _page(browser: Any, script: str, *args: Any) -> Any:
    """Read in the page, in one go: the page re-renders as the stream speaks."""
    return browser.execute_script(script, *args)


def test_the_overview_top_and_the_page_count_every_model_of_a_device(
        fleet: Fleet, signing_keys: Keys, bundles: dict[str, Path], browser: Any) -> None:
    """A device of digits and keyword beside a device of digits alone: two devices run
    digits 1.0.0 and one keyword 1.0.0 (none runs "none"), three models are settled."""
    fleet.start_controller()
    _two_model_device(fleet, signing_keys, bundles)
    fleet.add_agent("cam-1m", bundles["digits-1"])
    wait_until(lambda: _overview_counts(fleet)[0] == {"digits:1.0.0": 2, "keyword:1.0.0": 1},
               30, what="the overview counting each model")
    _, states = _overview_counts(fleet)
    assert sum(states.values()) == 3 and set(states) <= {"IDLE", "COMMITTED"}, states
    frame = collect(fleet.client())
    assert [(row["version"], row["devices"]) for row in frame["versions"]] == [
        ("digits:1.0.0", 2), ("keyword:1.0.0", 1)]
    assert frame["attention"] == []

    assert fleet.api is not None
    log_in(browser, fleet.api.url)
    tile = '[data-device="cam-2m"]'
    wait_until(lambda: _page(browser, "const e = document.querySelector(arguments[0]);"
                             "return e && e.dataset.version;", tile)
               == "digits:1.0.0 keyword:1.0.0", 15, what="the tile of two models")
    legend = _page(browser, "return [...document.querySelectorAll('#versions .legend-item')]"
                            ".map(e => [e.dataset.version, e.querySelector('.n').innerText]);")
    assert sorted(map(tuple, legend)) == [("digits:1.0.0", "2"), ("keyword:1.0.0", "1")]
    swatches = _page(browser, "return [...document.querySelectorAll(arguments[0] + ' .ver "
                              ".swatch')].map(e => e.title);", tile)
    assert swatches == ["digits:1.0.0", "keyword:1.0.0"]
    assert _page(browser, "return document.querySelector(arguments[0]).dataset.state;",
                 tile) in ("IDLE", "COMMITTED")


def test_rolling_back_a_rollout_that_added_a_model_says_the_device_keeps_it(
        fleet: Fleet, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    """keyword is added to a device of digits alone, then its rollout rolled back: there
    is nothing to go back to, so the device keeps keyword, and the rollout and its row say
    so instead of claiming a rollback (or waiting in ROLLING_BACK for ever)."""
    client = fleet.start_controller()
    models, data = ModelSet(signing_keys.trusted), fleet.root / "devices" / "cam-1"
    local.install_model(models, data, bundles["digits-1"])
    service = AgentService(ServiceConfig(fleet=fleet.name, device_id="cam-1", data_dir=data,
                                         broker_url=fleet.broker_url, telemetry_interval_s=0.3,
                                         probation_s=600), models)
    service.start()
    fleet.agents["cam-1"] = service
    wait_until(lambda: _versions(_device(fleet, "cam-1")) == {"digits": "1.0.0"}, 30,
               what="the device of one model registered")
    client.upload("/api/v1/models", bundles["keyword-1"].read_bytes())
    rollout = client.post("/api/v1/rollouts", {
        "model": "keyword:1.0.0", "selectors": ["device:cam-1"], "waves": ["100%"],
        "device_timeout_s": 60, "soak_s": 0.5})
    wait_until(lambda: _settled(fleet, rollout["id"], "SUCCEEDED"), 90, what="keyword added")
    client.post(f"/api/v1/rollouts/{rollout['id']}/rollback")
    ended = client.get(f"/api/v1/rollouts/{rollout['id']}")
    assert ended["state"] == "ROLLED_BACK"
    assert "1 of 1 devices keep keyword 1.0.0" in ended["reason"]
    row = ended["devices"][0]
    assert row["state"] == "SUCCEEDED" and "nothing to roll back to" in row["reason"]
    assert _versions(_device(fleet, "cam-1")) == {"digits": "1.0.0", "keyword": "1.0.0"}


def test_a_restarted_controller_still_sends_every_models_last_word(
        fleet: Fleet, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    """digits 2.0.0 is rolled out to a device of two models; after a controller restart a
    rollout of keyword carries digits' entry too (docs/protocol.md: the last word of every
    rollout to that device by model name), not keyword's alone."""
    client = fleet.start_controller()
    _two_model_device(fleet, signing_keys, bundles)
    wait_until(lambda: _versions(_device(fleet, "cam-2m")) == {"digits": "1.0.0",
                                                               "keyword": "1.0.0"},
               30, what="the device registered with its two models")
    for ref in ("digits-2", "keyword-2"):
        client.upload("/api/v1/models", bundles[ref].read_bytes())
    first = client.post("/api/v1/rollouts", {
        "model": "digits:2.0.0", "selectors": ["device:cam-2m"], "waves": ["100%"],
        "device_timeout_s": 60, "soak_s": 0.5})
    wait_until(lambda: _settled(fleet, first["id"], "SUCCEEDED"), 90, what="digits 2.0.0")

    fleet.stop_controller()
    client = fleet.start_controller()
    wait_until(lambda: _versions(_device(fleet, "cam-2m")) == {"digits": "2.0.0",
                                                               "keyword": "1.0.0"},
               30, what="the device's retained report read again")
    sub = Subscriber(fleet.broker_url, [device_topic(fleet.name, "cam-2m", Leaf.DESIRED)])
    try:
        wait_until(lambda: len(sub.messages) >= 1, 10, what="the retained desired state")
        retained = len(sub.messages)
        client.post("/api/v1/rollouts", {
            "model": "keyword:2.0.0", "selectors": ["device:cam-2m"], "waves": ["100%"],
            "device_timeout_s": 60, "soak_s": 0.5})
        wait_until(lambda: len(sub.messages) > retained, 30, what="the keyword install")
        sent = decode_desired(sub.messages[retained].payload)
    finally:
        sub.close()
    assert isinstance(sent, DesiredModels)
    assert {name: (e.version, e.rollout) for name, e in sent.models.items()} == {
        "digits": ("2.0.0", first["id"]), "keyword": ("2.0.0", sent.models["keyword"].rollout)}
    assert sent.models["keyword"].action == "install"


def test_a_device_of_one_model_is_sent_version_1_and_one_of_several_version_2(
        fleet: Fleet, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    client = fleet.start_controller()
    _two_model_device(fleet, signing_keys, bundles)
    old = ReportedState(fleet=fleet.name, device="old-1", agent_version="0.0.9",
                        active=BundleRef(name="digits", version="1.0.0", sha256=_SHA["a"]),
                        runtimes=installed_runtimes(), serving=True)
    sub = Subscriber(fleet.broker_url, [device_topic(fleet.name, d, Leaf.DESIRED)
                                        for d in ("old-1", "cam-2m")])
    try:
        sub.publish(device_topic(fleet.name, "old-1", Leaf.REPORTED), encode(old), retain=True)
        wait_until(lambda: _device(fleet, "old-1") and _device(fleet, "cam-2m").get("models"),
                   30, what="both devices registered")
        client.post("/api/v1/devices/group", {"devices": ["old-1", "cam-2m"], "group": "cams"})
        client.upload("/api/v1/models", bundles["digits-2"].read_bytes())
        client.post("/api/v1/rollouts", {"model": "digits:2.0.0", "selectors": ["group:cams"],
                                         "waves": ["100%"], "device_timeout_s": 60})
        wait_until(lambda: _to(sub, "old-1") and _to(sub, "cam-2m"), 30,
                   what="a desired state for each")
        old_word = _to(sub, "old-1")[0]
        assert json.loads(old_word)["schema_version"] == 1
        assert decode(DesiredState, old_word).version == "2.0.0"
        assert json.loads(_to(sub, "cam-2m")[0])["schema_version"] == 2
    finally:
        sub.close()
    listed = _device(fleet, "old-1")
    assert listed["models"] is None and listed["active"]["version"] == "1.0.0"


def test_a_device_serving_the_most_models_is_not_sent_another_and_the_row_says_why(
        fleet: Fleet, bundles: dict[str, Path]) -> None:
    """Its agent would refuse the entry (MAX_MODELS) and say nothing to the fleet: the
    rollout marks it INCOMPATIBLE with the reason instead of timing out on it."""
    client = fleet.start_controller()
    models = {f"m{i}": ModelReport(active=BundleRef(name=f"m{i}", version="1.0.0",
                                                   sha256=_SHA["a"]), serving=True)
              for i in range(MAX_MODELS)}
    full = ReportedState(schema_version=2, fleet=fleet.name, device="full-1",
                         agent_version="0.2.0", runtimes=installed_runtimes(), serving=True,
                         models=models)
    sub = Subscriber(fleet.broker_url, [device_topic(fleet.name, "full-1", Leaf.DESIRED)])
    try:
        sub.publish(device_topic(fleet.name, "full-1", Leaf.REPORTED), encode(full), retain=True)
        wait_until(lambda: len(_device(fleet, "full-1").get("models") or {}) == MAX_MODELS, 30,
                   what="the device of 16 models registered")
        client.upload("/api/v1/models", bundles["keyword-1"].read_bytes())
        rollout = client.post("/api/v1/rollouts", {
            "model": "keyword:1.0.0", "selectors": ["device:full-1"], "waves": ["100%"],
            "device_timeout_s": 60})
        wait_until(lambda: _settled(fleet, rollout["id"], "SUCCEEDED"), 30, what="the rollout")
        row = client.get(f"/api/v1/rollouts/{rollout['id']}")["devices"][0]
        assert _to(sub, "full-1") == [], "the device was sent the model"
    finally:
        sub.publish(device_topic(fleet.name, "full-1", Leaf.REPORTED), b"", retain=True)
        sub.close()
    assert row["state"] == "INCOMPATIBLE"
    assert "serves 16 models already" in row["reason"]


def test_a_device_of_one_model_stands_for_that_model_whatever_the_rollout_names() -> None:
    one = apply_reported(Device(id="old", fleet="f"), ReportedState(
        fleet="f", device="old", agent_version="0.0.9",
        active=BundleRef(name="digits", version="1.0.0", sha256=_SHA["a"])), 1)
    assert one.models is None and one.model_names == ["digits"]
    assert one.model("keyword").active == one.active, "version 1: its model is replaced"
    several = apply_reported(Device(id="new", fleet="f"), ReportedState.model_validate({
        "schema_version": 2, "fleet": "f", "device": "new", "agent_version": "0.1.0",
        "models": {"digits": {"active": {"name": "digits", "version": "1.0.0",
                                         "sha256": _SHA["a"]}},
                   "keyword": {"active": {"name": "keyword", "version": "3.0.0",
                                          "sha256": _SHA["b"]}, "slot": "b",
                               "update": {"state": "PROBATION"}}}}), 1)
    assert several.model_names == ["digits", "keyword"]
    assert several.model("keyword").update_state == "PROBATION"
    assert several.model("vad").active is None, "a model it does not run: nothing yet"
    assert Device.from_dict(several.as_dict()) == several


def _point(model: str, version: str, inferences: int) -> dict[str, Any]:
    return {"model": model, "model_version": version,
            "versions": {version: {"inferences": inferences, "errors": 1,
                                   "latency_p95_ms": 2.0}}}


def test_the_telemetry_of_each_model_counts_for_that_model() -> None:
    book = TelemetryBook()
    detector, keyword = _point("detector", "1.0.0", 40), _point("keyword", "3.0.0", 9)
    book.add("cam", 1_000, {**detector, "models": {"detector": detector, "keyword": keyword,
                                                   "bad/name": keyword, "vad": {}}})
    assert book.quality(["cam"], ("keyword", "3.0.0"), 0).inferences == 9
    assert book.quality(["cam"], ("detector", "1.0.0"), 0).inferences == 40
    assert book.running(("keyword", "3.0.0")) == ["cam"]
    assert sorted(book.summary()) == ["detector:1.0.0", "keyword:3.0.0"]


@pytest.mark.parametrize(("states", "summary"), [
    (("COMMITTED", "FAILED"), "FAILED"),
    (("COMMITTED", "PROBATION"), "PROBATION"),
    (("IDLE", "COMMITTED"), "COMMITTED"),
    (("ROLLED_BACK", "DOWNLOADING"), "ROLLED_BACK"),
])
def test_metrics_count_a_device_of_several_models_once_by_the_state_that_says_most(
        states: tuple[str, str], summary: str) -> None:
    ref = BundleRef(name="digits", version="1.0.0", sha256="a" * 64)
    device = Device(id="cam-1", fleet="f", online=True, models={
        name: ModelState(active=ref.model_copy(update={"name": name}), update_state=state)
        for name, state in zip(("digits", "keyword"), states, strict=True)})
    assert device.summary_state == summary
    family = next(f for f in _device_families([device]) if f.name == "edgefleet_devices")
    assert [(s.labels["state"], s.value) for s in family.samples] == [(summary, 1)]


def test_the_fleet_counts_installed_models_as_the_agent_does_not_its_failed_entries() -> None:
    """Fourteen entries of the fleet that failed to install and two models served: the
    device takes a third (its agent counts what is installed); sixteen served: it does not."""
    ref = BundleRef(name="digits", version="1.0.0", sha256="a" * 64)
    served = {name: ModelState(active=ref.model_copy(update={"name": name}),
                               update_state="COMMITTED") for name in ("digits", "keyword")}
    failed = {f"bogus{i:02d}": ModelState(update_state="FAILED") for i in range(14)}
    assert _full(Device(id="d", fleet="f", models={**served, **failed}), "detector") is None
    full = {f"m{i:02d}": ModelState(active=ref.model_copy(update={"name": f"m{i:02d}"}))
            for i in range(16)}
    reason = _full(Device(id="d", fleet="f", models=full), "detector")
    assert reason is not None and "serves 16 models" in reason
