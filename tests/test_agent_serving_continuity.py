"""Serving never stops: steady HTTP load across an OTA update and a rollback, zero failures."""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.core import Agent
from edgefleet.agent.models import ModelSet
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.payloads import (
    DesiredModels,
    DesiredState,
    ReportedState,
    decode,
    encode,
)
from edgefleet.agent.protocol.topics import Leaf, device_topic, fleet_filter
from edgefleet.agent.service import AgentService, ServiceConfig
from edgefleet.agent.update import local
from edgefleet.fleet.mosquitto import MosquittoBroker, free_port
from tests.brokers import Subscriber
from tests.conftest import Keys, make_bundle
from tests.http_files import FileServer
from tests.models import TrainedModels


class Load:
    """Keep-alive clients sending one digit after another; counts answers by version."""

    def __init__(self, port: int, name: str, x: np.ndarray, clients: int = 2,
                 model: str = "digits") -> None:
        self.path = f"/v2/models/{model}/infer"
        self.ok: dict[str, int] = {}
        self.failed: list[str] = []
        self._stop = threading.Event()
        body = json.dumps({"inputs": [{"name": name, "shape": [1, 8, 8, 1], "datatype": "FP32",
                                       "data": x.reshape(-1).tolist()}]})
        self._threads = [threading.Thread(target=self._run, args=(port, body), daemon=True)
                         for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self, port: int, body: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not self._stop.is_set():
            try:
                conn.request("POST", self.path, body)
                resp = conn.getresponse()
                data = json.loads(resp.read())
                if resp.status != 200:
                    self.failed.append(f"{resp.status} {data}")
                    continue
                version = data["model_version"]
                self.ok[version] = self.ok.get(version, 0) + 1
            except Exception as exc:  # any failure counts
                self.failed.append(repr(exc))
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def test_no_request_fails_across_an_update_and_a_rollback(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_models: TrainedModels, signing_keys: Keys) -> None:
    www = tmp_path / "www"
    www.mkdir()
    v1 = make_bundle(digits_models.tflite, www / "v1.efb", signing_keys, "1.0.0")
    v2 = make_bundle(digits_models.tflite, www / "v2.efb", signing_keys, "2.0.0", rows=16)
    server = FileServer(www)
    agent = Agent(signing_keys.trusted)
    data = tmp_path / "device"
    local.install(agent, data, v1)
    port = free_port()
    service = AgentService(ServiceConfig(fleet=fleet_name, device_id="d1", data_dir=data,
                                         broker_url=mosquitto.url, http_port=port,
                                         telemetry_interval_s=1.0, probation_s=0.3), agent)
    service.start()
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name, Leaf.REPORTED)])
    assert agent.model is not None
    load = Load(port, agent.model.runtime.inputs[0].name, digits_models.digits.x_test[:1])
    try:
        time.sleep(0.5)
        bundle = read_bundle(v2, signing_keys.trusted)
        desired = DesiredState(name="digits", version="2.0.0", sha256=bundle.sha256,
                               url=server.url("v2.efb"), size=v2.stat().st_size,
                               auto_commit=True)
        topic = device_topic(fleet_name, "d1", Leaf.DESIRED)
        sub.publish(topic, encode(desired), retain=True)
        assert sub.wait_for(lambda ms: _model_state(ms, "digits", "COMMITTED", "2.0.0"), 30)
        time.sleep(0.5)
        sub.publish(topic, encode(desired.model_copy(update={"action": "rollback"})),
                    retain=True)
        assert sub.wait_for(lambda ms: _model_state(ms, "digits", "ROLLED_BACK"), 30)
        time.sleep(0.5)
    finally:
        load.stop()
        service.stop()
        server.stop()
        sub.close()
    assert load.failed == []
    assert load.ok.get("1.0.0", 0) > 50 and load.ok.get("2.0.0", 0) > 50, load.ok


def _model_state(messages: list[Any], model: str, state: str, version: str | None = None) -> bool:
    """A report of ``model`` in update ``state`` (on the bundle of ``version``, if given: the
    install before the update is COMMITTED too)."""
    return any((entry := decode(ReportedState, m.payload).model_reports().get(model)) is not None
               and entry.update.state == state
               and (version is None or (entry.update.target is not None
                                        and entry.update.target.version == version))
               for m in messages)


def test_no_request_to_one_model_fails_while_another_switches_and_rolls_back(
        mosquitto: MosquittoBroker, fleet_name: str, tmp_path: Path,
        digits_models: TrainedModels, signing_keys: Keys) -> None:
    www = tmp_path / "www"
    www.mkdir()
    a1 = make_bundle(digits_models.tflite, www / "a1.efb", signing_keys, "1.0.0")
    a2 = make_bundle(digits_models.tflite, www / "a2.efb", signing_keys, "2.0.0", rows=16)
    b1 = make_bundle(digits_models.onnx, www / "b1.efb", signing_keys, "1.0.0", name="keyword")
    server, data = FileServer(www), tmp_path / "device"
    models = ModelSet(signing_keys.trusted)
    for bundle in (a1, b1):
        local.install_model(models, data, bundle)
    port = free_port()
    service = AgentService(ServiceConfig(fleet=fleet_name, device_id="d1", data_dir=data,
                                         broker_url=mosquitto.url, http_port=port,
                                         telemetry_interval_s=1.0, probation_s=0.3), models)
    service.start()
    sub = Subscriber(mosquitto.url, [fleet_filter(fleet_name, Leaf.REPORTED)])
    keyword = models["keyword"].model
    assert keyword is not None
    load = Load(port, keyword.runtime.inputs[0].name, digits_models.digits.x_test[:1],
                model="keyword")
    try:
        time.sleep(0.5)
        entry = DesiredState(name="digits", version="2.0.0",
                             sha256=read_bundle(a2, signing_keys.trusted).sha256,
                             url=server.url("a2.efb"), size=a2.stat().st_size, auto_commit=True)
        topic = device_topic(fleet_name, "d1", Leaf.DESIRED)
        sub.publish(topic, encode(DesiredModels(models={"digits": entry})), retain=True)
        assert sub.wait_for(lambda ms: _model_state(ms, "digits", "COMMITTED", "2.0.0"), 30)
        time.sleep(0.5)
        back = DesiredModels(models={"digits": entry.model_copy(update={"action": "rollback"})})
        sub.publish(topic, encode(back), retain=True)
        assert sub.wait_for(lambda ms: _model_state(ms, "digits", "ROLLED_BACK"), 30)
        time.sleep(0.5)
        reported = decode(ReportedState, encode(service.reported_state())).model_reports()
    finally:
        load.stop()
        service.stop()
        server.stop()
        sub.close()
    assert load.failed == []
    assert set(load.ok) == {"1.0.0"} and load.ok["1.0.0"] > 50, load.ok
    assert models["keyword"].model is keyword, "the other model was never reloaded"
    assert reported["keyword"].update.state == "COMMITTED", "its own install, untouched"
    assert reported["digits"].active is not None and reported["digits"].active.version == "1.0.0"
