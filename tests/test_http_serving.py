"""The KServe v2 HTTP server, driven by the real tritonclient and by raw HTTP."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from edgefleet.agent.core import Agent
from edgefleet.agent.serving.http import InferenceServer
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


def test_tritonclient_without_requested_outputs_gets_them_all_in_binary(
        server: InferenceServer, digits_models: TrainedModels) -> None:
    x = digits_models.digits.x_test[:16]
    in_name, out_name = _names(server)
    client = triton.InferenceServerClient(server.url)
    tensor = triton.InferInput(in_name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor])
    probs = result.as_numpy(out_name)
    assert probs is not None and probs.shape == (16, 10)
    [output] = result.get_response()["outputs"]
    assert output["parameters"]["binary_data_size"] == 16 * 10 * 4


def test_server_metadata_names_the_binary_extension(server: InferenceServer) -> None:
    meta = triton.InferenceServerClient(server.url).get_server_metadata()
    assert meta["name"] == "edgefleet" and meta["extensions"] == ["binary_tensor_data"]


def test_model_metadata_names_format_and_runtime(server: InferenceServer) -> None:
    status, meta = _get(server, "/v2/models/digits/versions/1.0.0")
    assert status == 200
    assert meta["platform"] in ("tflite_litert", "tflite_tflite-runtime", "onnx_onnxruntime")
    assert _get(server, "/v2/models/digits/versions/1.0.0/ready")[0] == 200


def _post_raw(srv: InferenceServer, path: str, body: bytes | str,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    result = resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    conn.close()
    return result


def _post(srv: InferenceServer, path: str, body: bytes | str) -> tuple[int, Any]:
    status, _, data = _post_raw(srv, path, body)
    return status, json.loads(data)


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


def test_nested_data_is_read_like_flat_data(server: InferenceServer,
                                            digits_models: TrainedModels) -> None:
    in_name, _ = _names(server)
    x = digits_models.digits.x_test[:2]
    flat = _post(server, "/v2/models/digits/infer",
                 _request(in_name, shape=[2, 8, 8, 1], data=x.reshape(-1).tolist()))
    nested = _post(server, "/v2/models/digits/infer",
                   json.dumps({"inputs": [{"name": in_name, "shape": [2, 8, 8, 1],
                                           "datatype": "FP32", "data": x.tolist()}]}))
    assert flat == nested and flat[0] == 200


def test_request_level_binary_data_output_returns_raw_bytes(server: InferenceServer) -> None:
    in_name, out_name = _names(server)
    doc = json.loads(_request(in_name, shape=[3, 8, 8, 1]))
    doc["parameters"] = {"binary_data_output": True}
    status, headers, body = _post_raw(server, "/v2/models/digits/infer", json.dumps(doc))
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    json_length = int(headers["inference-header-content-length"])
    [output] = json.loads(body[:json_length])["outputs"]
    assert output["name"] == out_name and output["parameters"] == {"binary_data_size": 120}
    probs = np.frombuffer(body[json_length:], np.float32).reshape(output["shape"])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)


def test_binary_input_with_json_output(server: InferenceServer,
                                       digits_models: TrainedModels) -> None:
    in_name, out_name = _names(server)
    x = digits_models.digits.x_test[:4]
    header = json.dumps({"inputs": [{"name": in_name, "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": out_name,
                                      "parameters": {"binary_data": False}}]}).encode()
    status, headers, body = _post_raw(server, "/v2/models/digits/infer", header + x.tobytes(),
                                      {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and "inference-header-content-length" not in headers
    probs = np.asarray(json.loads(body)["outputs"][0]["data"]).reshape(4, 10)
    assert (probs.argmax(1) == digits_models.digits.y_test[:4]).all()


def test_binary_size_that_does_not_match_the_shape_is_400(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    header = json.dumps({"inputs": [{"name": in_name, "shape": [1, 8, 8, 1], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 128}}]}).encode()
    status, _, body = _post_raw(server, "/v2/models/digits/infer", header + bytes(128),
                                {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "needs 256 bytes" in json.loads(body)["error"]


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


def test_missing_input_is_400(server: InferenceServer) -> None:
    status, body = _post(server, "/v2/models/digits/infer", '{"inputs": []}')
    assert status == 400 and "missing input" in body["error"]


def test_unknown_output_is_400_before_inference(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    doc = json.loads(_request(in_name))
    doc["outputs"] = [{"name": "logits"}]
    status, body = _post(server, "/v2/models/digits/infer", json.dumps(doc))
    assert status == 400 and "unknown output 'logits'" in body["error"]


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


def test_expect_100_continue_is_answered(server: InferenceServer) -> None:
    in_name, _ = _names(server)
    body = _request(in_name).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


def test_stop_closes_open_keep_alive_connections(signing_keys: Keys,
                                                 digits_bundles: dict[str, Path]) -> None:
    agent = Agent(signing_keys.trusted)
    agent.load(digits_bundles["tflite"])
    srv = InferenceServer(agent).start()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("GET", "/v2/health/live")
    assert conn.getresponse().read() == b'{"live":true}'
    srv.stop()
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        conn.request("GET", "/v2/health/live")
        conn.getresponse()


def test_not_ready_before_a_model_is_loaded(signing_keys: Keys) -> None:
    srv = InferenceServer(Agent(signing_keys.trusted)).start()
    try:
        assert _get(srv, "/v2/health/live")[0] == 200
        assert _get(srv, "/v2/health/ready") == (503, {"ready": False})
        status, body = _post(srv, "/v2/models/digits/infer", "{}")
        assert status == 503 and "no model is loaded" in body["error"]
        assert _get(srv, "/v2/models/digits")[0] == 503
    finally:
        srv.stop()
