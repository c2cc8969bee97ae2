"""KServe v2 / Open Inference Protocol: decode requests and encode responses (no I/O).

JSON tensors, and the binary tensor data extension used by ``tritonclient``:
the JSON header's length is given by ``Inference-Header-Content-Length`` and
raw tensor bytes follow it, each input announcing ``binary_data_size``; outputs
asked for with ``binary_data`` (or all of them, with the request parameter
``binary_data_output``) are returned the same way.

What the server needs of a model is computed once, in :class:`ModelView`, so a
request does a few dictionary lookups besides parsing and inference. A client
sending binary tensors repeats the same JSON header on every request of one
shape: the view keeps each such header's parsed and checked form (a
:class:`Plan`, at most ``CACHE_SIZE`` of them), and the JSON header of the
answer to it, so a repeated request is a bytes lookup, ``np.frombuffer`` views of
the body and one join of the answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.agent.runtime.base import Array, TensorInfo, check_feeds
from edgefleet.agent.serving.errors import RequestError
from edgefleet.agent.serving.schema import check_depth, check_request

__all__ = ["CACHE_SIZE", "DATATYPES", "InferRequest", "ModelView", "Plan", "RequestError",
           "datatype_of", "decode_infer", "encode_infer"]

CACHE_SIZE = 64  # request headers remembered per model (then forgotten all at once)

DATATYPES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT8": "int8",
             "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT32": "int32",
             "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64", "BOOL": "bool"}
_BY_DTYPE = {np.dtype(numpy_name): name for name, numpy_name in DATATYPES.items()}
_COMPACT = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}
_INPUT_HINT = "GET /v2/models/{name} lists the inputs the model takes"


def datatype_of(dtype: str | np.dtype[Any]) -> str:
    """The KServe datatype name of a numpy dtype (``BYTES`` for anything else)."""
    return _BY_DTYPE.get(np.dtype(dtype), "BYTES")


@dataclass(frozen=True)
class _Input:
    spec: TensorInfo
    dtype: np.dtype[Any]
    datatype: str


class ModelView:
    """One loaded model as the protocol sees it: names, datatypes, metadata (made once)."""

    def __init__(self, name: str, version: str, platform: str, inputs: list[TensorInfo],
                 outputs: list[TensorInfo]) -> None:
        self.name, self.version, self.specs = name, version, inputs
        self.inputs = {t.name: _Input(t, np.dtype(t.dtype), datatype_of(t.dtype))
                       for t in inputs}
        self.output_names = [t.name for t in outputs]
        self.metadata = {"name": name, "versions": [version], "platform": platform,
                         "inputs": [_tensor_meta(t) for t in inputs],
                         "outputs": [_tensor_meta(t) for t in outputs]}
        self.metadata_json = json.dumps(self.metadata).encode()
        self.ready_json = json.dumps({"name": name, "ready": True}).encode()
        self.plans: dict[bytes, Plan] = {}

    def remember(self, header: bytes, plan: Plan) -> None:
        if len(self.plans) >= CACHE_SIZE:
            self.plans.clear()  # a client varying its headers gets no cache, not unbounded memory
        self.plans[header] = plan


def _tensor_meta(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "datatype": datatype_of(t.dtype), "shape": list(t.shape)}


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, Array]
    outputs: Sequence[tuple[str, bool]]  # (name, as binary), in the order to answer
    plan: Plan | None = None  # set when every input came as binary data


@dataclass(frozen=True)
class Plan:
    """A binary request's JSON header, parsed and checked once: where each input lies in
    the binary data (name, dtype, offset, count, shape), and the answers' JSON headers
    by output shapes and dtypes."""

    id: str | None
    inputs: tuple[tuple[str, np.dtype[Any], int, int, tuple[int, ...]], ...]
    size: int
    outputs: tuple[tuple[str, bool], ...]
    heads: dict[tuple[Any, ...], bytes] = field(default_factory=dict, compare=False)

    def request(self, binary: memoryview) -> InferRequest:
        inputs = {name: np.frombuffer(binary, dtype, count, offset).reshape(shape)
                  for name, dtype, offset, count, shape in self.inputs}
        return InferRequest(self.id, inputs, self.outputs, self)


def decode_infer(body: bytes, header_length: int | None, model: ModelView,
                 max_depth: int = 64) -> InferRequest:
    """Parse an infer request and check it against the protocol's schema (JSON nested
    deeper than ``max_depth`` is refused unparsed), then every input against the model's."""
    if header_length is not None:
        plan = model.plans.get(body[:header_length])
        if plan is not None and len(body) - header_length == plan.size:
            return plan.request(memoryview(body)[header_length:])
    doc = _json_header(body, header_length, max_depth)
    binary = memoryview(body)[len(body) if header_length is None else header_length:]
    inputs, offset, layout = {}, 0, []
    for item in doc["inputs"]:
        name, array, end = _decode_input(item, binary, offset, model)
        inputs[name] = array
        if (item.get("parameters") or {}).get("binary_data_size") is not None:
            layout.append((name, array.dtype, offset, array.size, array.shape))
        offset = end
    if offset != len(binary):
        raise RequestError(f"{len(binary)} bytes of binary tensor data, inputs announce {offset}")
    problems = check_feeds(model.specs, inputs)
    if problems:
        raise RequestError("; ".join(problems), hint=_INPUT_HINT)
    params = doc.get("parameters") or {}
    binary_default = bool(params.get("binary_data_output", False))
    outputs = tuple(_requested(doc.get("outputs"), binary_default, model.output_names))
    plan = None
    if header_length is not None and len(layout) == len(inputs) and _plain_id(doc.get("id")):
        plan = Plan(doc.get("id"), tuple(layout), offset, outputs)
        model.remember(body[:header_length], plan)
    return InferRequest(doc.get("id"), inputs, outputs, plan)


def _plain_id(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _json_header(body: bytes, header_length: int | None, max_depth: int) -> dict[str, Any]:
    if header_length is not None and not 0 < header_length <= len(body):
        raise RequestError(f"Inference-Header-Content-Length {header_length} does not fit "
                           f"a body of {len(body)} bytes")
    text = body if header_length is None else body[:header_length]
    check_depth(text, max_depth)
    try:
        doc = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RequestError(f"request body is not valid JSON: {exc}",
                           hint="send a KServe v2 infer request") from exc
    return check_request(doc)


def _decode_input(item: dict[str, Any], binary: memoryview, offset: int,
                  model: ModelView) -> tuple[str, Array, int]:
    name, shape, datatype = item["name"], item["shape"], item["datatype"]
    known = model.inputs.get(name)
    if known is None:
        raise RequestError(f"unknown input {name!r}; the model takes {sorted(model.inputs)}",
                           hint=_INPUT_HINT)
    if datatype != known.datatype:
        raise RequestError(f"input {name!r}: datatype {datatype}, model expects "
                           f"{known.datatype}",
                           hint=f"send {known.datatype} with shape {list(known.spec.shape)}")
    size = (item.get("parameters") or {}).get("binary_data_size")
    if size is None:
        return name, _from_json(name, item["data"], shape, known), offset
    return name, _from_binary(name, binary, offset, size, shape, known), offset + size


def _from_json(name: str, data: list[Any], shape: list[int], known: _Input) -> Array:
    try:
        return np.asarray(data, dtype=known.dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:  # Overflow: 10**400 as FP32, 300 as INT8
        raise RequestError(f"input {name!r}: data does not fit shape {shape}: {exc}",
                           hint=f"send prod(shape) {known.datatype} values") from exc


def _from_binary(name: str, binary: memoryview, offset: int, size: int, shape: list[int],
                 known: _Input) -> Array:
    expected = math.prod(shape) * known.dtype.itemsize
    if size != expected or offset + size > len(binary):
        raise RequestError(f"input {name!r}: binary_data_size {size!r}, shape {shape} of "
                           f"{known.datatype} needs {expected} bytes "
                           f"({len(binary) - offset} left in the body)")
    return np.frombuffer(binary, known.dtype, expected // known.dtype.itemsize,
                         offset).reshape(shape)


def _requested(outputs: list[dict[str, Any]] | None, binary_default: bool,
               names: list[str]) -> list[tuple[str, bool]]:
    if not outputs:
        return [(name, binary_default) for name in names]
    wanted = [(str(o["name"]), bool((o.get("parameters") or {}).get("binary_data",
                                                                     binary_default)))
              for o in outputs]
    unknown = [name for name, _ in wanted if name not in names]
    if unknown:
        raise RequestError(f"unknown output {unknown[0]!r}; the model gives {names}")
    return wanted


def encode_infer(model: ModelView, request: InferRequest,
                 results: Mapping[str, Array]) -> tuple[bytes, int | None]:
    """Response body, and the JSON header's length when binary tensors follow it."""
    plan = request.plan
    if plan is not None and all(binary for _, binary in plan.outputs):
        values = [results[name] for name, _ in plan.outputs]
        key = tuple((v.shape, v.dtype) for v in values)
        header = plan.heads.get(key)
        if header is None:
            header, length = encode_infer(model, InferRequest(plan.id, {}, plan.outputs), results)
            header = plan.heads.setdefault(key, header[:length])
        return b"".join([header, *(_raw(v) for v in values)]), len(header)
    outputs, blobs = [], []
    for name, binary in request.outputs:
        value = results[name]
        entry: dict[str, Any] = {"name": name, "shape": list(value.shape),
                                 "datatype": _BY_DTYPE.get(value.dtype, "BYTES")}
        if binary:
            blob = _raw(value)
            entry["parameters"] = {"binary_data_size": value.nbytes}
            blobs.append(blob)
        else:
            entry["data"] = value.ravel().tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model.name, "model_version": model.version,
                           "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = _json_bytes(doc)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _json_bytes(doc: dict[str, Any]) -> bytes:
    """``doc`` as strict JSON: NaN and infinities in output data become the strings
    ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (JSON has no such numbers)."""
    try:
        return _COMPACT.encode(doc).encode()
    except ValueError:  # a non-finite float: rare, so only then is every value looked at
        for output in doc["outputs"]:
            if "data" in output:
                output["data"] = [_finite(v) for v in output["data"]]
        return _COMPACT.encode(doc).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return _NON_FINITE[repr(value)]
    return value


def _raw(value: Array) -> bytes | memoryview:
    """The bytes of ``value`` in C order, without a copy when it is contiguous."""
    if value.size and value.flags.c_contiguous:
        return value.data.cast("B")
    return value.tobytes()
