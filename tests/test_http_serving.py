"""The KServe v2 HTTP server, driven by the real tritonclient and by raw HTTP."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from agent.core import Agent
from agent.serving.http import InferenceServer
from tests.conftest import Keys
from tests.models import TrainedModels


@pytest.fixture(params=["tflite", "onnx"])
def server(request: pytest.FixtureRequest, digits_bundles: dict[str, Path],
           signing_keys: Keys) -> Iterator[InferenceServer]:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles[request.param])
    srv = InferenceServer(agent).start()
    yield srv
    srv.stop()


def _names(srv: InferenceServer) -> tuple[str, str]:
    client = triton.InferenceServerClient(srv.url)
    meta = client.get_model_metadata("digits")
    return meta["inputs"][0]["name"], meta["outputs"][0]["name"]


def test_tritonclient_sees_a_live_ready_model(server: InferenceServer) -> None:
    client = triton.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta["versions"] == ["1.0.0"]
    assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"][1:] == [8, 8, 1]
    assert meta["outputs"][0]["shape"] == [-1, 10]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_held_out_digits(server: InferenceServer,
                                             digits_models: TrainedModels, binary: bool) -> None:
    x, y = digits_models.digits.x_test, digits_models.digits.y_test
    in_name, out_name = _names(server)
    client = triton.InferenceServerClient(server.url)
    tensor = triton.InferInput(in_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = triton.InferRequestedOutput(out_name, binary_data=binary)
    result = client.infer("digits", [tensor], outputs=[wanted], request_id="r-1")
    probs = result.as_numpy(out_name)
    assert probs is not None and probs.shape == (len(x), 10)
    assert float((probs.argmax(1) == y).mean()) >= 0.95
    assert result.get_response()["id"] == "r-1"


def _post(srv: InferenceServer, path: str, body: bytes | str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    status, data = resp.status, json.loads(resp.read())
    conn.close()
    return status, data


def _get(srv: InferenceServer, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    status, data = resp.status, json.loads(resp.read())
    conn.close()
    return status, data


def _request(name: str, datatype: str = "FP32", shape: list[int] | None = None,
             data: list[float] | None = None) -> str:
    shape = shape or [1, 8, 8, 1]
    values = data if data is not None else [0.0] * int(np.prod(shape))
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                   "data": values}]})


def test_plain_json_infer_returns_probabilities(server: InferenceServer) -> None:
    in_name, out_name = _names(server)
    status, body = _post(server, "/v2/models/digits/infer", _request(in_name))
    assert status == 200
    [output] = body["outputs"]
    assert output["name"] == out_name and output["shape"] == [1, 10]
    assert abs(sum(output["data"]) - 1.0) < 1e-4
    assert body["model_version"] == "1.0.0"


def test_versioned_infer_path_works(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    status, _ = _post(server, "/v2/models/digits/versions/1.0.0/infer", _request(in_name))
    assert status == 200


def test_unknown_model_is_404_naming_what_is_served(server: InferenceServer) -> None:
    status, body = _post(server, "/v2/models/cats/infer", "{}")
    assert status == 404 and "unknown model 'cats'" in body["error"]
    assert "serves digits version 1.0.0" in body["error"]
    status, _ = _get(server, "/v2/models/digits/versions/9.9.9")
    assert status == 404


def test_wrong_datatype_names_expected_and_given(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    status, body = _post(server, "/v2/models/digits/infer", _request(in_name, "INT32"))
    assert status == 400
    assert "datatype INT32, model expects FP32" in body["error"]


def test_wrong_shape_names_expected_and_given(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    status, body = _post(server, "/v2/models/digits/infer",
                         _request(in_name, shape=[1, 4, 4, 1]))
    assert status == 400
    assert "shape [1, 4, 4, 1], model expects [-1, 8, 8, 1]" in body["error"]


def test_data_that_does_not_fill_the_shape_is_400(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    status, body = _post(server, "/v2/models/digits/infer", _request(in_name, data=[0.0] * 10))
    assert status == 400 and "does not fit shape" in body["error"]


def test_unknown_input_name_is_400(server: InferenceServer) -> None:
    status, body = _post(server, "/v2/models/digits/infer", _request("pixels"))
    assert status == 400 and "unknown input 'pixels'" in body["error"]


def test_malformed_json_is_400(server: InferenceServer) -> None:
    status, body = _post(server, "/v2/models/digits/infer", "{not json")
    assert status == 400 and "not valid JSON" in body["error"]


def test_keep_alive_serves_many_requests_on_one_connection(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(20):
        conn.request("POST", "/v2/models/digits/infer", _request(in_name))
        resp = conn.getresponse()
        assert resp.status == 200
        resp.read()
    conn.close()


def test_not_ready_before_a_model_is_loaded(signing_keys: Keys) -> None:
    srv = InferenceServer(Agent(signing_keys.trusted)).start()
    try:
        assert _get(srv, "/v2/health/live")[0] == 200
        assert _get(srv, "/v2/health/ready") == (503, {"ready": False})
        status, body = _post(srv, "/v2/models/digits/infer", "{}")
        assert status == 503 and "no model is loaded" in body["error"]
    finally:
        srv.stop()
