"""Several models on one device: each under its own name, its own slots and update; requests
routed by name; a data dir of one model migrated as the model of its name."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.core import Agent
from edgefleet.agent.models import ModelSet, UnknownModelError
from edgefleet.agent.protocol.update_state import UpdateState
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.update import layout, local
from edgefleet.agent.update.slots import SlotStore
from tests.conftest import Keys, make_bundle
from tests.models import TrainedModels


@pytest.fixture(scope="module")
def bundles(digits_models: TrainedModels, signing_keys: Keys,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``digits`` (LiteRT) in two versions, ``keyword`` (ONNX Runtime) in two versions."""
    out = tmp_path_factory.mktemp("models")
    made = {}
    for name, model in (("digits", digits_models.tflite), ("keyword", digits_models.onnx)):
        for version in ("1.0.0", "2.0.0"):
            made[f"{name}-{version}"] = make_bundle(model, out / f"{name}-{version}.efb",
                                                    signing_keys, version, name=name)
    return made


def _two(data: Path, keys: Keys, bundles: dict[str, Path]) -> ModelSet:
    models = ModelSet(keys.trusted)
    for ref in ("digits-1.0.0", "keyword-1.0.0"):
        assert local.install_model(models, data, bundles[ref]).state is UpdateState.COMMITTED
    return models


def _served(models: ModelSet) -> dict[str, str | None]:
    return {name: agent.model.version if agent.model else None for name, agent in models.items()}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_two_models_install_side_by_side_each_in_its_own_folder(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    models = _two(tmp_path, signing_keys, bundles)
    assert _served(models) == {"digits": "1.0.0", "keyword": "1.0.0"}
    assert layout.installed(tmp_path) == ["digits", "keyword"]
    assert not (tmp_path / "slots.json").exists(), "nothing of a model at the data dir's root"
    shown = local.models_status(tmp_path)["models"]
    assert [(m["model"], [s["version"] for s in m["slots"] if "active" in s["role"]])
            for m in shown] == [("digits", ["1.0.0"]), ("keyword", ["1.0.0"])]


def test_installing_one_model_never_touches_the_other(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    models = _two(tmp_path, signing_keys, bundles)
    keyword, before = models["keyword"].model, _tree(layout.model_dir(tmp_path, "keyword"))
    assert local.install_model(models, tmp_path, bundles["digits-2.0.0"]).state is \
        UpdateState.COMMITTED
    assert _served(models) == {"digits": "2.0.0", "keyword": "1.0.0"}
    assert models["keyword"].model is keyword, "the other model was not even reloaded"
    assert _tree(layout.model_dir(tmp_path, "keyword")) == before


def test_a_rollback_returns_only_that_model(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    models = _two(tmp_path, signing_keys, bundles)
    for ref in ("digits-2.0.0", "keyword-2.0.0"):
        local.install_model(models, tmp_path, bundles[ref])
    journal = local.rollback_model(models, tmp_path, "keyword")
    assert journal.state is UpdateState.ROLLED_BACK
    assert _served(models) == {"digits": "2.0.0", "keyword": "1.0.0"}
    with pytest.raises(UnknownModelError, match="no model 'nope' is installed"):
        local.rollback_model(models, tmp_path, "nope")


def test_remove_deletes_one_model_and_the_agent_serves_the_rest_after_a_restart(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    _two(tmp_path, signing_keys, bundles).close()
    assert local.remove_model(tmp_path, "digits") == ["keyword"]
    assert not layout.model_dir(tmp_path, "digits").exists()
    with pytest.raises(UnknownModelError, match="installed: keyword"):
        local.remove_model(tmp_path, "digits")
    again = ModelSet(signing_keys.trusted)
    local.serve_models(again, tmp_path)
    assert _served(again) == {"keyword": "1.0.0"}


def test_a_data_dir_of_one_model_is_migrated_as_the_model_of_its_name(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)  # what an agent of one model wrote: all at the root
    for ref in ("digits-1.0.0", "digits-2.0.0"):
        local.install(agent, tmp_path, bundles[ref])
    pointer = SlotStore(tmp_path).pointer()
    models = ModelSet(signing_keys.trusted)
    local.serve_models(models, tmp_path)
    assert _served(models) == {"digits": "2.0.0"}
    folder = layout.model_dir(tmp_path, "digits")
    assert SlotStore(folder).pointer() == pointer, "the slots and their pointer moved as they were"
    assert not (tmp_path / "slots.json").exists() and not (tmp_path / "journal.json").exists()
    assert local.rollback_model(models, tmp_path, "digits").state is UpdateState.ROLLED_BACK
    assert _served(models) == {"digits": "1.0.0"}, "its fallback slot came along"


def test_a_migration_killed_half_way_is_finished_by_the_next_start(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)
    for ref in ("digits-1.0.0", "digits-2.0.0"):
        local.install(agent, tmp_path, bundles[ref])
    folder = layout.model_dir(tmp_path, "digits")
    folder.mkdir(parents=True)
    for item in ("journal.json", "slots.json"):  # moved before the kill; the slots were not
        (tmp_path / item).rename(folder / item)
    assert layout.migrate(tmp_path) == "digits"
    assert layout.migrate(tmp_path) is None, "nothing left to move"
    assert SlotStore(folder).active_bundle() is not None
    models = ModelSet(signing_keys.trusted)
    local.serve_models(models, tmp_path)
    assert _served(models) == {"digits": "2.0.0"}


def _request(port: int, method: str, path: str, body: str | None = None
             ) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def _infer_body(agent: Agent, x: np.ndarray) -> str:
    assert agent.model is not None
    return json.dumps({"inputs": [{"name": agent.model.runtime.inputs[0].name,
                                   "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.reshape(-1).tolist()}]})


@pytest.fixture()
def two_served(tmp_path: Path, signing_keys: Keys,
               bundles: dict[str, Path]) -> Iterator[tuple[ModelSet, InferenceServer]]:
    models = _two(tmp_path, signing_keys, bundles)
    server = InferenceServer(models).start()
    yield models, server
    server.stop()
    models.close()


def test_requests_are_routed_by_model_name(two_served: tuple[ModelSet, InferenceServer],
                                           digits_models: TrainedModels) -> None:
    models, server = two_served
    x = digits_models.digits.x_test[:2]
    for name in ("digits", "keyword"):
        status, answer = _request(server.port, "POST", f"/v2/models/{name}/infer",
                                  _infer_body(models[name], x))
        assert status == 200 and answer["model_name"] == name, answer
        assert len(models[name].stats_of("1.0.0").samples) == 1, "counted on its own model"
    status, answer = _request(server.port, "GET", "/v2/models/radar/ready")
    assert status == 404
    assert "digits version 1.0.0, keyword version 1.0.0" in answer["error"]


def test_ready_is_per_model_and_the_server_is_ready_when_every_model_is(
        two_served: tuple[ModelSet, InferenceServer]) -> None:
    models, server = two_served
    assert _request(server.port, "GET", "/v2/models/keyword/ready") == (
        200, {"name": "keyword", "ready": True})
    assert _request(server.port, "GET", "/v2/health/ready")[0] == 200
    models.agent("vad")  # a model whose first bundle is on its way: not installed yet
    assert _request(server.port, "GET", "/v2/models/vad/ready")[0] == 503
    assert _request(server.port, "GET", "/v2/health/ready")[0] == 200
    models.close()
    assert _request(server.port, "GET", "/v2/health/ready")[0] == 503


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgefleet", "agent", *args],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "COLUMNS": "200"})


def test_cli_installs_lists_rolls_back_and_removes_models_by_name(
        tmp_path: Path, signing_keys: Keys, bundles: dict[str, Path]) -> None:
    common, key = ["--data-dir", str(tmp_path)], ["--trusted-key", str(signing_keys.public)]
    for ref in ("digits-1.0.0", "keyword-1.0.0", "keyword-2.0.0"):
        done = _cli("install", str(bundles[ref]), *common, *key, "--json")
        assert done.returncode == 0, done.stderr
    shown = json.loads(_cli("status", *common, "--json").stdout)
    assert [m["model"] for m in shown["models"]] == ["digits", "keyword"]
    assert {(s["model"], s["version"]) for s in shown["slots"] if "active" in s["role"]} == {
        ("digits", "1.0.0"), ("keyword", "2.0.0")}
    refused = _cli("rollback", *common, *key)
    assert refused.returncode == 2 and "holds 2 models: digits, keyword" in refused.stderr
    back = _cli("rollback", "--model", "keyword", *common, *key)
    assert back.returncode == 0 and "ROLLED_BACK" in back.stdout, back.stderr
    removed = _cli("remove", "digits", *common, "--json")
    assert json.loads(removed.stdout) == {"removed": "digits", "models": ["keyword"]}
    shown = json.loads(_cli("status", *common, "--json").stdout)
    assert [(s["model"], s["version"]) for s in shown["slots"] if "active" in s["role"]] == [
        ("keyword", "1.0.0")]


def test_a_lone_agent_is_served_by_the_name_of_whatever_it_loads(
        signing_keys: Keys, bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)
    server = InferenceServer(agent).start()
    try:
        assert _request(server.port, "GET", "/v2/health/ready")[0] == 503
        agent.load(bundles["keyword-1.0.0"])
        assert _request(server.port, "GET", "/v2/models/keyword/ready")[0] == 200
        agent.load(bundles["digits-2.0.0"])
        assert _request(server.port, "GET", "/v2/models/digits/ready")[0] == 200
        assert _request(server.port, "GET", "/v2/models/keyword/ready")[0] == 404
    finally:
        server.stop()
        agent.close()
