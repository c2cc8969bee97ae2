"""Hostile requests to the agent's KServe v2 HTTP server, as a class.

One ``edgefleet agent run --http`` process per module serves the real digits bundle.
Valid infer requests (JSON or binary tensors) are drawn, then mutated: a field dropped
or retyped at every level, ``parameters`` that are not objects, wrong shapes and
datatypes, huge numbers, NaN, deep nesting, bytes that are not UTF-8, truncated
bodies, lying ``Inference-Header-Content-Length`` and ``binary_data_size``, length
headers of unicode digits, bodies over their bounds. Each is sent on its own
connection; every one must get a status line, no 5xx, a strict-JSON body naming the
problem, and the server's RSS stays under ``RSS_CAP``. Afterwards the model still
answers a good request correctly, and the server logged no traceback.

Slow and idle connections are timed out while good requests keep flowing; a
connection over the bound is answered 503; NaN outputs are strict JSON.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent.serving.errors import RequestError
from edgefleet.agent.serving.limits import JSON_WEIGHT, HttpLimits
from edgefleet.agent.serving.schema import check_depth
from edgefleet.fleet.mosquitto import free_port, wait_for_port
from tests.conftest import Keys
from tests.hostile import EXAMPLES, HOSTILE, MiB
from tests.models import TrainedModels

TIMEOUT_S = 1.5  # --http-timeout of the module's server: slow sockets are cut after it
MAX_CONNECTIONS = 64
LIMITS = HttpLimits(timeout_s=TIMEOUT_S, max_connections=MAX_CONNECTIONS)
RSS_CAP = 200 * MiB  # the server process's peak, whatever it was sent (measured: 85-140 MiB)
INFER = "/v2/models/digits/infer"
Draw = Callable[..., Any]  # hypothesis's draw, or a DataObject's


@dataclass(frozen=True)
class Served:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    input: str
    output: str

    def rss(self) -> tuple[int, int]:
        """The server's resident set now and at its peak (VmRSS, VmHWM), in bytes."""
        fields = dict(line.split(":", 1) for line in
                      Path(f"/proc/{self.process.pid}/status").read_text().splitlines())
        return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, digits_bundles: dict[str, Path],
           signing_keys: Keys) -> Iterator[Served]:
    work, port = tmp_path_factory.mktemp("hostile-http"), free_port()
    log = work / "agent.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--bundle",
             str(digits_bundles["tflite"]), "--trusted-key", str(signing_keys.public),
             "--data-dir", str(work / "data"), "--http", f"127.0.0.1:{port}",
             "--http-timeout", str(TIMEOUT_S), "--http-max-connections", str(MAX_CONNECTIONS)],
            stdout=sink, stderr=subprocess.STDOUT)
    try:
        assert wait_for_port("127.0.0.1", port, 60), log.read_text()
        meta = json.loads(_exchange(port, _request("GET", "/v2/models/digits")).body)
        yield Served(process, port, log, meta["inputs"][0]["name"], meta["outputs"][0]["name"])
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- talking to the server ------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        doc = _strict_json(self.body)
        assert isinstance(doc, dict) and isinstance(doc.get("error"), str), self.body[:200]
        return str(doc["error"])


def _request(method: str, path: str, body: bytes = b"",
             headers: list[tuple[str, str]] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: edge"]
    if headers is None:
        headers = [("Content-Length", str(len(body)))] if body or method == "POST" else []
    lines += [f"{name}: {value}" for name, value in headers]
    head = "\r\n".join(lines) + "\r\n\r\n"
    # one byte a character where it can be ("²" as 0xB2, which the server reads as "²")
    return head.encode("latin-1" if max(map(ord, head)) < 256 else "utf-8") + body


def _exchange(port: int, raw: bytes, timeout: float = 20.0) -> Response:
    """Send ``raw`` on a new connection, end the sending side, read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused early
            sock.sendall(raw)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        data = _read_to_end(sock)
    return _parse(data)


def _read_to_end(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _parse(data: bytes) -> Response:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 "), f"no status line: {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers["content-length"])
    assert len(rest) >= length, "the answer was cut short"
    return Response(int(lines[0].split()[1]), headers, rest[:length])


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _strict_json(text: bytes) -> Any:
    return json.loads(text, parse_constant=_refuse_constant)


# --- requests, valid then mutated ----------------------------------------------------


@dataclass
class Case:
    """A request to send, and what must come back: one of ``fragments`` in the error (any
    4xx error when empty; a 200 is also fine when ``may_pass``)."""

    doc: Any
    blob: bytes | None  # binary tensor data after the JSON header, or None for JSON
    fragments: tuple[str, ...] = ()
    may_pass: bool = True
    text: bytes | None = None  # the JSON text, when a mutation wrote it by hand
    headers: dict[str, str] = field(default_factory=dict)  # replaced or added headers
    send: bytes | None = None  # the bytes to send, when a mutation cut or changed them

    def expect(self, *fragments: str) -> Case:
        self.fragments, self.may_pass = fragments, False
        return self

    def raw(self) -> bytes:
        text = self.text if self.text is not None else json.dumps(self.doc).encode()
        body = text + (self.blob or b"")
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if self.blob is not None:
            headers["Inference-Header-Content-Length"] = str(len(text))
        headers.update(self.headers)
        return _request("POST", INFER, body if self.send is None else self.send,
                        list(headers.items()))


@st.composite
def valid_cases(draw: st.DrawFn, names: tuple[str, str]) -> Case:
    rows = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.random((rows, 8, 8, 1), np.float32)
    tensor: dict[str, Any] = {"name": names[0], "shape": list(x.shape), "datatype": "FP32"}
    doc: dict[str, Any] = {"inputs": [tensor]}
    binary = draw(st.booleans())
    if binary:
        tensor["parameters"] = {"binary_data_size": x.nbytes}
    else:
        tensor["data"] = x.tolist() if draw(st.booleans()) else x.ravel().tolist()
    if draw(st.booleans()):
        doc["id"] = draw(st.text(max_size=12))
    if draw(st.booleans()):
        doc["outputs"] = [{"name": names[1], "parameters": {"binary_data": draw(st.booleans())}}]
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(st.booleans())}
    return Case(doc, x.tobytes() if binary else None)


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=8),
                     st.floats(allow_nan=True, allow_infinity=True))
_WRONG = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3),
                   st.dictionaries(st.text(max_size=5), _SCALARS, max_size=3))
_NOT_OBJECT = _WRONG.filter(lambda v: not isinstance(v, dict) and v is not None)
_NOT_LIST = _WRONG.filter(lambda v: not isinstance(v, list))
_NOT_STR = _WRONG.filter(lambda v: not isinstance(v, str) or v == "")
_NOT_BOOL = _WRONG.filter(lambda v: not isinstance(v, bool) and v is not None)
_NOT_PARAM = st.one_of(st.none(), st.lists(_SCALARS, max_size=2),
                       st.dictionaries(st.text(max_size=3), _SCALARS, max_size=2))
_BAD_DIMS = st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31),
                      st.floats(), st.booleans(), st.text(max_size=3), st.none())
_BAD_SHAPES = st.one_of(
    _NOT_LIST,
    st.lists(st.integers(0, 9), min_size=65, max_size=80),
    st.tuples(st.lists(st.integers(0, 9), max_size=3), _BAD_DIMS).map(lambda t: [*t[0], t[1]]))
_DATATYPES = ["FP32", "FP16", "FP64", "INT8", "UINT8", "INT16", "UINT16", "INT32", "UINT32",
              "INT64", "UINT64", "BOOL", "BYTES"]
_LATIN1_DIGITS = "²³¹½¼¾"  # str.isdigit() says True to the first three
_ODD_DIGITS = _LATIN1_DIGITS + "١٢٣٤५६७①٫०٩߀০੦୦௦౦೦൦๐໐０９"


def _tensor(case: Case) -> dict[str, Any]:
    return case.doc["inputs"][0]  # type: ignore[no-any-return]


def drop_field(draw: Draw, case: Case) -> Case:
    where = draw(st.sampled_from(["inputs", "name", "shape", "datatype", "data", "output"]))
    tensor = _tensor(case)
    if where == "inputs":
        del case.doc["inputs"]
        return case.expect("inputs must be a list")
    if where == "output" and "outputs" in case.doc:
        del case.doc["outputs"][0]["name"]
        return case.expect("outputs[0].name")
    if where in ("data", "output"):
        tensor.pop("data", None)
        tensor.pop("parameters", None)
        return case.expect("inputs[0].data")
    del tensor[where]
    return case.expect(f"inputs[0].{where}")


def retype_field(draw: Draw, case: Case) -> Case:
    tensor = _tensor(case)
    where = draw(st.sampled_from(["doc", "inputs", "inputs[0]", "name", "shape", "datatype",
                                  "data", "id", "outputs", "outputs[0]", "outputs[0].name"]))
    if where == "doc":
        case.doc = draw(_WRONG.filter(lambda v: not isinstance(v, dict)))
        return case.expect("request must be a JSON object")
    if where == "inputs":
        case.doc["inputs"] = draw(_NOT_LIST)
        return case.expect("inputs must be a list")
    if where == "inputs[0]":
        case.doc["inputs"][0] = draw(_WRONG.filter(lambda v: not isinstance(v, dict)))
        return case.expect("inputs[0] must be a JSON object")
    if where == "id":
        case.doc["id"] = draw(_WRONG.filter(lambda v: not isinstance(v, str)))
        return case.expect("id must be a string")
    if where == "outputs":
        case.doc["outputs"] = draw(_NOT_LIST.filter(lambda v: v is not None))
        return case.expect("outputs must be a list")
    outputs = case.doc.setdefault("outputs", [{"name": "x"}])
    if where == "outputs[0]":
        outputs[0] = draw(_WRONG.filter(lambda v: not isinstance(v, dict)))
        return case.expect("outputs[0] must be a JSON object")
    if where == "outputs[0].name":
        outputs[0]["name"] = draw(_NOT_STR)
        return case.expect("outputs[0].name")
    if where == "data":
        tensor["data"] = draw(_NOT_LIST)
        return case.expect("inputs[0].data", "inputs[0] has both")
    tensor[where] = draw({"name": _NOT_STR, "shape": _BAD_SHAPES,
                          "datatype": st.text(max_size=6).filter(
                              lambda v: v not in _DATATYPES)}[where])
    return case.expect(f"inputs[0].{where}")


def bad_parameters(draw: Draw, case: Case) -> Case:
    """``parameters`` that are not an object, or hold a value that is not a scalar, or a
    known parameter of the wrong type: at the request, the input and the output."""
    level = draw(st.sampled_from(["request", "input", "output"]))
    holder, where = {"request": (case.doc, "parameters"),
                     "input": (_tensor(case), "inputs[0].parameters"),
                     "output": (case.doc.setdefault("outputs", [{"name": "x"}])[0],
                                "outputs[0].parameters")}[level]
    kind = draw(st.sampled_from(["not an object", "bad value", "known"]))
    if kind == "not an object":
        holder["parameters"] = draw(_NOT_OBJECT)
        return case.expect(f"{where} must be a JSON object")
    params = holder.setdefault("parameters", {})
    if kind == "bad value":
        key = draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in params))
        params[key] = draw(_NOT_PARAM.filter(lambda v: v is not None))
        return case.expect(f"{where}.{key}")
    known = {"request": "binary_data_output", "input": "binary_data_size",
             "output": "binary_data"}[level]
    params[known] = draw(_NOT_BOOL if known != "binary_data_size" else st.one_of(
        st.integers(max_value=-1), st.floats(), st.text(max_size=3), st.booleans()))
    return case.expect(f"{where}.{known}")


def wrong_shape_or_datatype(draw: Draw, case: Case) -> Case:
    tensor = _tensor(case)
    if draw(st.booleans()):
        shape = draw(st.lists(st.integers(0, 70), max_size=6))
        case.may_pass = shape == tensor["shape"]
        tensor["shape"] = shape
        case.fragments = ("shape",)
        return case
    tensor["datatype"] = draw(st.sampled_from([d for d in _DATATYPES if d != "FP32"]))
    return case.expect("datatype")


def odd_values(draw: Draw, case: Case) -> Case:
    """Huge numbers, NaN, infinities, strings, objects and ragged lists in JSON data."""
    tensor = _tensor(case)
    if "data" not in tensor:
        size = tensor["parameters"]["binary_data_size"] + draw(st.sampled_from([-4, 4, 2**40]))
        tensor["parameters"]["binary_data_size"] = size
        return case.expect("binary_data_size", "binary tensor data")
    flat: list[Any] = np.asarray(tensor["data"], np.float32).ravel().tolist()
    index = draw(st.integers(0, len(flat) - 1))
    odd = draw(st.sampled_from(["nan", "inf", "-inf", "1e400", "10**400", "10**5000", "abc",
                                "{}", "[1,2]", "true"]))
    if odd in ("nan", "inf", "-inf", "1e400", "true"):
        flat[index] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "1e400": 1e400,
                       "true": True}[odd]
        tensor["data"] = flat
        return case  # NaN goes through the model: the answer must still be strict JSON
    flat[index] = {"10**400": 10**400, "abc": "abc", "{}": {}, "[1,2]": [1, 2]}.get(odd, 0)
    tensor["data"] = flat
    if odd == "10**5000":
        case.text = json.dumps(case.doc).replace("[", f"[{'9' * 5000},", 1).encode()
        return case.expect("not valid JSON", "inputs[0]")
    return case.expect("data does not fit")


def deep_nesting(draw: Draw, case: Case) -> Case:
    depth = draw(st.one_of(st.integers(65, 300), st.sampled_from([1000, 100_000])))
    text = json.dumps(case.doc)
    at = draw(st.sampled_from(["data", "parameters", "doc"]))
    nested = "[" * depth + "]" * depth
    if at == "doc":
        case.text = nested.encode()
    elif at == "parameters":
        case.text = text.replace("{", '{"parameters": {"x": ' + nested + "}, ", 1).encode()
    else:
        case.text = text.replace('"inputs": [', '"inputs": [' + nested + ", ", 1).encode()
    return case.expect("nested deeper than 64")


def not_utf8(draw: Draw, case: Case) -> Case:
    text = json.dumps(case.doc).encode()
    at = draw(st.integers(0, len(text)))
    case.text = text[:at] + bytes([draw(st.integers(0x80, 0xFF))]) + text[at:]
    return case.expect("not valid JSON")


def truncated(draw: Draw, case: Case) -> Case:
    body = json.dumps(case.doc).encode() + (case.blob or b"")
    cut = draw(st.integers(0, len(body) - 1))
    if draw(st.booleans()):  # Content-Length announces it all: the body ends early
        case.send = body[:cut]
        return case.expect("body ended after")
    case.headers["Content-Length"] = str(cut)
    case.send = body[:cut]
    return case.expect("not valid JSON", "Inference-Header-Content-Length", "binary",
                       "Content-Length is required")


def lying_header_length(draw: Draw, case: Case) -> Case:
    text = json.dumps(case.doc).encode()
    if case.blob is None:
        case.blob = b""  # a JSON request that says it is a binary one
    real = len(text)
    claim = draw(st.one_of(st.integers(0, real + len(case.blob) + 64),
                           st.integers(0, 10**30)).filter(lambda v: v != real))
    case.headers["Inference-Header-Content-Length"] = str(claim)
    return case.expect("Inference-Header-Content-Length", "not valid JSON", "JSON header")


def odd_length_header(draw: Draw, case: Case) -> Case:
    """Length headers that are not ASCII digits: unicode digits, signs, blanks inside."""
    name = draw(st.sampled_from(["Content-Length", "Inference-Header-Content-Length"]))
    if draw(st.booleans()):  # digits to str.isdigit(), not to int(): "1²", "³"
        value = draw(st.text(alphabet="0123456789", max_size=6))
        at = draw(st.integers(0, len(value)))
        value = value[:at] + draw(st.sampled_from("²³¹")) + value[at:]
    else:
        alphabet = draw(st.sampled_from([_LATIN1_DIGITS, _ODD_DIGITS])) + "0123456789+- .,x"
        value = draw(st.text(alphabet=alphabet, min_size=1, max_size=8)
                     .filter(lambda v: not (v.strip().isascii() and v.strip().isdigit())))
    case.headers[name] = value
    return case.expect(name)


def over_the_bounds(draw: Draw, case: Case) -> Case:
    kind = draw(st.sampled_from(["body", "json", "header", "two lengths", "chunked"]))
    if kind == "two lengths":
        case.send = b""
        case.headers["content-length"] = str(draw(st.integers(0, 10**6)) + 10**6 + 1)
        return case.expect("two different")
    if kind == "chunked":
        case.headers["Transfer-Encoding"] = "chunked"
        return case.expect("chunked")
    case.send = b""  # refused by its Content-Length: nothing of it is read
    bound = LIMITS.max_json if kind != "body" else LIMITS.max_body
    if kind == "json":
        case.blob = None
    size = draw(st.one_of(st.integers(bound + 1, bound + 2 * MiB), st.integers(bound, 10**40)
                          .filter(lambda v: v > bound)))
    if kind == "header":
        case.blob = b""
        case.headers["Inference-Header-Content-Length"] = str(size)
        case.headers["Content-Length"] = str(max(size, LIMITS.max_json))
        return case.expect("JSON header", "body of")
    if kind == "body":
        case.headers["Inference-Header-Content-Length"] = "10"
    case.headers["Content-Length"] = str(size)
    return case.expect("body of")


Mutation = Callable[[Draw, Case], Case]
MUTATIONS: list[Mutation] = [
    drop_field, retype_field, bad_parameters, wrong_shape_or_datatype, odd_values, deep_nesting,
    not_utf8, truncated, lying_header_length, odd_length_header, over_the_bounds]
PER_CLASS = max(20, -(-EXAMPLES // len(MUTATIONS)))  # >= EXAMPLES requests over the classes


# --- the tests ------------------------------------------------------------------------


def _check_answer(case: Case, response: Response) -> None:
    assert response.status < 500, (response.status, response.body[:300])
    if response.status == 200:
        assert case.may_pass, f"expected an error naming {case.fragments}, got 200"
        length = response.headers.get("inference-header-content-length")
        _strict_json(response.body[:int(length)] if length else response.body)
        return
    error = response.error()
    assert 400 <= response.status < 500
    if case.fragments:
        assert any(f in error for f in case.fragments), (case.fragments, error)


def _good_request_is_answered_right(served: Served, digits: Any) -> float:
    x, y = digits.x_test[:8], digits.y_test[:8]
    doc = {"inputs": [{"name": served.input, "shape": list(x.shape), "datatype": "FP32",
                       "data": x.ravel().tolist()}]}
    started = time.monotonic()
    response = _exchange(served.port, _request("POST", INFER, json.dumps(doc).encode()))
    took = time.monotonic() - started
    assert response.status == 200, response.body[:300]
    probs = np.asarray(_strict_json(response.body)["outputs"][0]["data"]).reshape(8, 10)
    assert (probs.argmax(1) == y).mean() >= 0.75
    return took


@pytest.mark.parametrize("mutate", MUTATIONS, ids=[m.__name__ for m in MUTATIONS])
def test_hostile_infer_requests_get_a_4xx_naming_the_problem_and_the_model_keeps_serving(
        served: Served, digits_models: TrainedModels, mutate: Mutation) -> None:
    names = (served.input, served.output)

    @settings(HOSTILE, max_examples=PER_CLASS)
    @given(st.data())
    def one(data: st.DataObject) -> None:
        case = mutate(data.draw, data.draw(valid_cases(names)))
        _check_answer(case, _exchange(served.port, case.raw()))

    one()
    _good_request_is_answered_right(served, digits_models.digits)
    peak = served.rss()[1]
    assert peak < RSS_CAP, f"server peak RSS {peak / MiB:.0f} MiB"
    assert "Traceback" not in served.log.read_text()


def _slow_socket(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head)
    return sock


def test_slow_and_idle_connections_are_cut_while_good_requests_keep_flowing(
        served: Served, digits_models: TrainedModels) -> None:
    partial = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: edge\r\nX-Slow: "
    body_short = _request("POST", INFER, headers=[("Content-Length", "1000")]) + b"{"
    slow = [_slow_socket(served.port, partial if i % 3 else body_short) for i in range(40)]
    idle = [_slow_socket(served.port, b"") for _ in range(10)]
    stop = threading.Event()

    def trickle() -> None:  # a byte every 0.2 s: each read is quick, the head never ends
        until = time.monotonic() + TIMEOUT_S - 0.4  # then quiet, so the 408 is not reset
        while not stop.wait(0.2) and time.monotonic() < until:
            for sock in slow[1::3]:
                with contextlib.suppress(OSError):
                    sock.send(b"a")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    started = time.monotonic()
    try:
        for _ in range(5):
            assert _good_request_is_answered_right(served, digits_models.digits) < 1.0
        answers = [_read_to_end(sock) for sock in slow]
        cut_after = time.monotonic() - started
        assert all(_read_to_end(sock) == b"" for sock in idle)  # idle: closed, nothing said
    finally:
        stop.set()
        for sock in slow + idle:
            sock.close()
    assert cut_after < TIMEOUT_S + 2.0, f"slow sockets held {cut_after:.1f} s"
    for answer in answers:
        response = _parse(answer)
        assert response.status == 408 and "did not arrive within" in response.error()
        assert response.headers["connection"] == "close"


def test_a_connection_over_the_bound_is_answered_503_and_the_server_recovers(
        served: Served, digits_models: TrainedModels) -> None:
    idle = [_slow_socket(served.port, b"") for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # the server has taken every one of them
        response = _exchange(served.port, _request("GET", "/v2/health/live"))
        assert response.status == 503 and response.headers["retry-after"] == "1"
        assert "connections are open" in response.error()
        time.sleep(TIMEOUT_S + 1.0)  # the idle ones are closed by then
        assert _good_request_is_answered_right(served, digits_models.digits) < 1.0
    finally:
        for sock in idle:
            sock.close()


def _worst_json(size: int, input_name: str) -> bytes:
    """A JSON request of ``size`` bytes that parses into the most Python objects."""
    head = json.dumps({"inputs": [{"name": input_name, "shape": [1], "datatype": "FP32",
                                   "data": []}]}).encode()
    before, after = head.split(b"[]", 1)
    count = (size - len(head)) // 3
    return before + b"[" + b"{}," * (count - 1) + b"{}]" + after


def test_bodies_at_and_over_their_bounds_keep_memory_bounded_and_good_requests_fast(
        served: Served, digits_models: TrainedModels) -> None:
    Path(f"/proc/{served.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = served.rss()[0]
    worst = _worst_json(LIMITS.max_json, served.input)
    assert len(worst) <= LIMITS.max_json
    answers: list[Response] = []
    senders = [threading.Thread(target=lambda: answers.append(
        _exchange(served.port, _request("POST", INFER, worst)))) for _ in range(3)]
    big = _request("POST", INFER, headers=[("Content-Length", str(49 * 1000 * 1000))])
    for sender in senders:
        sender.start()
    refused = _exchange(served.port, big)  # the 49 MB JSON, refused by its length
    took = _good_request_is_answered_right(served, digits_models.digits)
    for sender in senders:
        sender.join()
    assert refused.status == 413 and "over this server's" in refused.error()
    assert took < 1.5, f"a good request waited {took:.2f} s"
    assert 400 in {a.status for a in answers} <= {400, 503}  # 503: waited past the timeout
    assert all("data does not fit" in a.error() for a in answers if a.status == 400)
    grew = served.rss()[1] - base
    assert grew < JSON_WEIGHT * LIMITS.max_json + 48 * MiB, f"peak grew {grew / MiB:.0f} MiB"


def test_nan_outputs_are_strict_json_and_tritonclient_reads_them(served: Served) -> None:
    x = np.full((2, 8, 8, 1), np.nan, np.float32)
    x[1] = 0.5
    client = triton.InferenceServerClient(f"127.0.0.1:{served.port}")
    tensor = triton.InferInput(served.input, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    wanted = triton.InferRequestedOutput(served.output, binary_data=False)
    result = client.infer("digits", [tensor], outputs=[wanted])
    probs = result.as_numpy(served.output)
    assert probs is not None and np.isnan(probs[0]).all() and np.isfinite(probs[1]).all()
    header = json.dumps({"inputs": [{"name": served.input, "shape": list(x.shape),
                                     "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    response = _exchange(served.port, _request(
        "POST", INFER, header + x.tobytes(),
        [("Content-Length", str(len(header) + x.nbytes)),
         ("Inference-Header-Content-Length", str(len(header)))]))
    data = _strict_json(response.body)["outputs"][0]["data"]
    assert data[:10] == ["NaN"] * 10 and all(isinstance(v, float) for v in data[10:])


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


_JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.integers(),
              st.text(alphabet=st.sampled_from('[]{}"\\ab\n'), max_size=8)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(alphabet=st.sampled_from('[]{}"\\k'), max_size=4), inner, max_size=3),
    max_leaves=40)


@HOSTILE
@given(_JSON_VALUES, st.integers(1, 12))
def test_the_nesting_prescan_refuses_exactly_what_nests_deeper_than_its_limit(
        value: Any, limit: int) -> None:
    """Brackets inside strings (escaped quotes too) never count: the pre-scan refuses a
    document if and only if the parser would have nested deeper than the limit."""
    text = json.dumps(value).encode()
    try:
        check_depth(text, limit)
        refused = False
    except RequestError as exc:
        refused = "nested deeper than" in str(exc)
    assert refused == (_depth(value) > limit), text


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /v2 HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", 431),
    (b"GET /v2 HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", 431),
    (b"GET /v2 HTTP/1.1\r\n" + b"X-Many: " + b"b" * 1000 + b"\r\n" * 1 + (
        b"X-More: " + b"c" * 1000 + b"\r\n") * 70 + b"\r\n", 431),
    (b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", 400),
])
def test_heads_over_their_bounds_are_refused_with_their_status(
        served: Served, head: bytes, status: int) -> None:
    response = _exchange(served.port, head)
    assert response.status == status and response.headers["connection"] == "close"
    assert response.error()
