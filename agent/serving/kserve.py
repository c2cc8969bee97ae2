"""KServe v2 / Open Inference Protocol: decode requests and encode responses (no I/O).

JSON tensors, and the binary tensor data extension used by ``tritonclient``:
the JSON header's length is given by ``Inference-Header-Content-Length`` and
raw tensor bytes follow it, each input announcing ``binary_data_size``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.protocol.errors import EdgefleetError
from agent.runtime.base import Array, TensorInfo, check_feeds

__all__ = ["DATATYPES", "InferRequest", "RequestError", "decode_infer", "encode_infer",
           "model_metadata"]

DATATYPES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT8": "int8",
             "UINT8": "uint8", "INT16": "int16", "UINT16": "uint16", "INT32": "int32",
             "UINT32": "uint32", "INT64": "int64", "UINT64": "uint64", "BOOL": "bool"}
KSERVE_NAMES = {v: k for k, v in DATATYPES.items()}


class RequestError(EdgefleetError):
    """A request the server answers with an HTTP error status."""

    def __init__(self, status: int, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, Array]
    outputs: list[tuple[str, bool]] | None  # requested (name, binary); None = all
    binary_default: bool


def datatype_of(dtype: str) -> str:
    return KSERVE_NAMES.get(dtype, "BYTES")


def model_metadata(name: str, version: str, platform: str, inputs: list[TensorInfo],
                   outputs: list[TensorInfo]) -> dict[str, Any]:
    def tensor(t: TensorInfo) -> dict[str, Any]:
        return {"name": t.name, "datatype": datatype_of(t.dtype), "shape": list(t.shape)}

    return {"name": name, "versions": [version], "platform": platform,
            "inputs": [tensor(t) for t in inputs], "outputs": [tensor(t) for t in outputs]}


def decode_infer(body: bytes, header_length: int | None, specs: list[TensorInfo]) -> InferRequest:
    """Parse an infer request and check every input against the model's inputs."""
    header_bytes = body if header_length is None else body[:header_length]
    try:
        doc = json.loads(header_bytes)
    except ValueError as exc:
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError(400, "request must be an object with an 'inputs' list")
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    by_name = {spec.name: spec for spec in specs}
    inputs, offset = {}, 0
    for item in doc["inputs"]:
        name, array, offset = _decode_input(item, binary, offset, by_name)
        inputs[name] = array
    problems = check_feeds(specs, inputs)
    if problems:
        raise RequestError(400, "; ".join(problems),
                           hint="GET /v2/models/{name} lists the inputs the model takes")
    params = doc.get("parameters") or {}
    return InferRequest(doc.get("id"), inputs, _requested(doc.get("outputs")),
                        bool(params.get("binary_data_output", False)))


def _decode_input(item: Any, binary: memoryview, offset: int,
                  specs: dict[str, TensorInfo]) -> tuple[str, Array, int]:
    if not isinstance(item, dict) or not {"name", "shape", "datatype"} <= item.keys():
        raise RequestError(400, "each input needs 'name', 'shape' and 'datatype'")
    name, shape, datatype = item["name"], item["shape"], item["datatype"]
    spec = specs.get(name)
    if spec is None:
        raise RequestError(400, f"unknown input {name!r}; the model takes {sorted(specs)}")
    expected = datatype_of(spec.dtype)
    if datatype != expected:
        raise RequestError(400, f"input {name!r}: datatype {datatype}, model expects {expected}",
                           hint=f"send {expected} with shape {list(spec.shape)}")
    dtype = np.dtype(spec.dtype)
    size = (item.get("parameters") or {}).get("binary_data_size")
    try:
        if size is not None:
            data = np.frombuffer(binary[offset:offset + int(size)], dtype=dtype)
            offset += int(size)
        else:
            data = np.asarray(item.get("data"), dtype=dtype).reshape(-1)
        return name, data.reshape(shape), offset
    except (ValueError, TypeError) as exc:
        raise RequestError(400, f"input {name!r}: data does not fit shape {shape}: {exc}",
                           hint=f"send prod(shape) {expected} values") from exc


def _requested(outputs: Any) -> list[tuple[str, bool]] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise RequestError(400, "'outputs' must be a list")
    return [(str(o.get("name")), bool((o.get("parameters") or {}).get("binary_data", False)))
            for o in outputs if isinstance(o, dict)]


def encode_infer(model: str, version: str, request: InferRequest,
                 results: dict[str, Array]) -> tuple[bytes, int | None]:
    """Response body, and the JSON header length when binary tensors follow it."""
    wanted = request.outputs or [(name, request.binary_default) for name in results]
    outputs, blobs = [], []
    for name, binary in wanted:
        if name not in results:
            raise RequestError(400, f"unknown output {name!r}; the model gives {sorted(results)}")
        value = results[name]
        entry: dict[str, Any] = {"name": name, "shape": list(value.shape),
                                 "datatype": datatype_of(value.dtype.name)}
        if binary:
            blob = np.ascontiguousarray(value).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value.reshape(-1).tolist()
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
