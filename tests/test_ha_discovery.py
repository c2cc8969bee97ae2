"""Home Assistant discovery: the agent publishes retained configs that read its own topics.

The broker is a real Mosquitto; "Home Assistant" is a subscriber that joins after the
device, reads every config, subscribes to the topics the configs name, and renders each
``value_template`` against the device's real telemetry: with Jinja's sandbox, as Home
Assistant does, when jinja2 is installed, else with a by-hand reading of the one
template form the agent writes.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.agent import __version__
from edgefleet.agent.core import Agent
from edgefleet.agent.protocol.homeassistant import SENSORS, node_id, value_template
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.cli import agent as agent_cli
from edgefleet.fleet.mosquitto import MosquittoBroker
from tests.brokers import Message, Subscriber
from tests.conftest import Keys
from tests.models import TrainedModels

_NODE = re.compile(r"^[a-zA-Z0-9_-]+$")
_BY_HAND = re.compile(
    r"\{% set p = value_json if value_json is mapping else value_json \| last %\}"
    r"\{\{ p\['values'\]\['(\w+)'\] \| default\(none\) \}\}")


def _jinja() -> Any:
    try:
        return importlib.import_module("jinja2.sandbox").ImmutableSandboxedEnvironment()
    except ImportError:
        return None


_JINJA = _jinja()


def render(template: str, payload: bytes) -> str:
    """What Home Assistant makes of ``payload`` with ``template``."""
    value_json = json.loads(payload)
    if _JINJA is not None:
        return str(_JINJA.from_string(template).render(value_json=value_json,
                                                       value=payload.decode()))
    match = _BY_HAND.fullmatch(template)
    assert match, f"not the template form the agent writes: {template}"
    point = value_json if isinstance(value_json, dict) else value_json[-1]
    return str(point["values"].get(match.group(1)))  # Jinja prints None as "None"


def _service(url: str, fleet: str, data_dir: Path, bundle: Path, keys: Keys,
             ha_discovery: bool = True) -> AgentService:
    agent = Agent(keys.trusted)
    agent.load(bundle)
    config = ServiceConfig(fleet=fleet, device_id="cam.1", data_dir=data_dir, broker_url=url,
                           telemetry_interval_s=0.1, profile="raspberry-pi-4",
                           ha_discovery=ha_discovery)
    return AgentService(config, agent)


def _online(url: str, fleet: str) -> Subscriber:
    return Subscriber(url, [device_topic(fleet, "cam.1", Leaf.STATUS)])


def _served(payload: bytes) -> bool:
    """A single telemetry point of a window with inferences."""
    point = json.loads(payload)
    return isinstance(point, dict) and point["values"].get("inferences", 0) > 0


@pytest.fixture()
def digit(digits_models: TrainedModels) -> np.ndarray:
    return digits_models.digits.x_test[:1]


def test_configs_are_retained_and_read_the_devices_own_topics(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_bundles: dict[str, Path], signing_keys: Keys, digit: np.ndarray) -> None:
    status = device_topic(fleet_name, "cam.1", Leaf.STATUS)
    telemetry = device_topic(fleet_name, "cam.1", Leaf.TELEMETRY)
    device = _online(mosquitto.url, fleet_name)
    service = _service(mosquitto.url, fleet_name, tmp_path, digits_bundles["tflite"],
                       signing_keys)
    service.start()
    try:
        assert device.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        ha = Subscriber(mosquitto.url, ["homeassistant/#"])  # joins after the device
        assert ha.wait_for(lambda ms: len(ms) >= len(SENSORS) + 1)
        configs = {m.topic: _config(m) for m in ha.messages}
        node = node_id(fleet_name, "cam.1")
        sensors = {c["unique_id"].removeprefix(f"{node}_"): c for t, c in configs.items()
                   if t.startswith(f"homeassistant/sensor/{node}/")}
        assert set(sensors) == {s.key for s in SENSORS}
        assert len({c["unique_id"] for c in configs.values()}) == len(configs)
        for key, config in sensors.items():
            assert ha.on(f"/sensor/{node}/{key}/config"), "topic: .../<node>/<object>/config"
            assert config["state_topic"] == telemetry
            assert config["value_template"] == value_template(key)
            assert (config["availability_topic"], config["payload_available"],
                    config["payload_not_available"]) == (status, "online", "offline")
            assert config["device"] == {"identifiers": [node], "name": "cam.1",
                                        "manufacturer": "edgefleet", "model": "raspberry-pi-4",
                                        "sw_version": __version__}
        assert sensors["latency_p50_ms"]["unit_of_measurement"] == "ms"
        assert sensors["latency_p95_ms"]["unit_of_measurement"] == "ms"
        assert sensors["throughput_rps"]["unit_of_measurement"] == "req/s"
        assert "unit_of_measurement" not in sensors["model_version"]
        connectivity = configs[f"homeassistant/binary_sensor/{node}/status/config"]
        assert (connectivity["state_topic"], connectivity["payload_on"],
                connectivity["payload_off"], connectivity["device_class"]) == (
                    status, "online", "offline", "connectivity")

        reads = Subscriber(mosquitto.url, [status, telemetry])  # what the configs name
        assert reads.wait_for(lambda ms: any(m.retain and m.payload == b"online" for m in ms))
        for _ in range(30):
            service.agent.predict(digit)
        assert reads.wait_for(lambda ms: {_served(m.payload) for m in ms
                                          if m.topic == telemetry} == {True, False})
        _renders_real_telemetry(sensors, reads.on("/telemetry"))
        ha.close()
        reads.close()
    finally:
        service.stop()
        device.close()
    late = Subscriber(mosquitto.url, [status])  # availability follows the status
    assert late.wait_for(lambda ms: len(ms) >= 1)
    assert late.messages[-1].retain and late.messages[-1].payload == b"offline"
    late.close()


def _config(message: Message) -> dict[str, Any]:
    assert message.retain, f"{message.topic} is not retained"
    _, component, node, _, leaf = message.topic.split("/")
    assert component in ("sensor", "binary_sensor") and leaf == "config"
    assert _NODE.match(node), f"Home Assistant refuses node id {node!r}"
    config: dict[str, Any] = message.json()
    for field in ("name", "unique_id", "state_topic", "device"):
        assert config.get(field), f"{message.topic} has no {field}"
    return config


def _renders_real_telemetry(sensors: dict[str, dict[str, Any]],
                            messages: list[Message]) -> None:
    served = next(m.payload for m in messages if _served(m.payload))
    values = json.loads(served)["values"]
    shown = {key: render(config["value_template"], served) for key, config in sensors.items()}
    assert shown == {key: str(values[key]) for key in sensors}
    assert float(shown["latency_p50_ms"]) > 0 and float(shown["throughput_rps"]) > 0
    assert float(shown["latency_p95_ms"]) >= float(shown["latency_p50_ms"])
    assert shown["model_version"] == "1.0.0" and shown["errors_total"] == "0"
    assert int(shown["inferences_total"]) >= values["inferences"]
    older = messages[0].payload
    batch = b"[" + older + b"," + served + b"]"  # a replayed backlog: the newest point wins
    assert render(sensors["latency_p50_ms"]["value_template"], batch) == shown["latency_p50_ms"]
    idle = next(m.payload for m in messages if not _served(m.payload))
    assert json.loads(idle)["values"]["latency_p50_ms"] is None
    # a window without inferences: "None", which Home Assistant shows as unknown
    assert render(sensors["latency_p50_ms"]["value_template"], idle) == "None"


def test_without_the_option_nothing_is_published_for_home_assistant(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    device = _online(mosquitto.url, fleet_name)
    service = _service(mosquitto.url, fleet_name, tmp_path, digits_bundles["onnx"],
                       signing_keys, ha_discovery=False)
    service.start()
    try:
        assert device.wait_for(lambda ms: any(m.payload == b"online" for m in ms))
        ha = Subscriber(mosquitto.url, ["homeassistant/#"])
        assert not ha.wait_for(lambda ms: len(ms) > 0, timeout=0.5)
        ha.close()
    finally:
        service.stop()
        device.close()


def test_node_ids_are_what_home_assistant_accepts_and_never_shared() -> None:
    ids = {node_id(fleet, device) for fleet, device in
           [("f", "cam.1"), ("f", "cam_1"), ("g", "cam.1"), ("f_cam", "1"), ("f", "cam-1")]}
    assert len(ids) == 5 and all(_NODE.match(i) for i in ids)
    with pytest.raises(ValueError, match="not allowed"):
        node_id("f", "cam/1")


def test_agent_run_has_the_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                  digits_bundles: dict[str, Path], signing_keys: Keys) -> None:
    started: list[ServiceConfig] = []
    monkeypatch.setattr(agent_cli, "_serve_until_signalled",
                        lambda s, *_: started.append(s.config))
    result = CliRunner().invoke(agent_cli.app, [
        "run", "--bundle", str(digits_bundles["onnx"]), "--trusted-key",
        str(signing_keys.public), "--data-dir", str(tmp_path), "--ha-discovery"])
    assert result.exit_code == 0, result.output
    assert started[0].ha_discovery is True
