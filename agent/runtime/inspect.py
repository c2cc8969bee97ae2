"""Read a model's operators, op versions and tensor types without running it.

``.tflite`` is read with the flatbuffer schema that LiteRT ships; ``.onnx`` with
the ``onnx`` package when it is installed (the converter side), else only what
ONNX Runtime reports. Used by the converter to check device profiles and by the
agent to say which op and version it cannot load.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.runtime.errors import RuntimeLoadError

__all__ = ["ModelInfo", "inspect_model"]

_TFLITE_SCHEMA = "ai_edge_litert.schema_py_generated"


@dataclass(frozen=True)
class ModelInfo:
    """Operators (name -> highest version used), nodes per op, tensor dtypes, opset."""

    format: str
    ops: dict[str, int]
    nodes: dict[str, list[str]] = field(default_factory=dict)
    dtypes: set[str] = field(default_factory=set)
    opset: int | None = None
    min_runtime_version: str | None = None

    def node_names(self, op: str, limit: int = 5) -> list[str]:
        return self.nodes.get(op, [])[:limit]


def inspect_model(model: bytes, fmt: str) -> ModelInfo:
    if fmt == "tflite":
        return _inspect_tflite(model)
    if fmt == "onnx":
        return _inspect_onnx(model)
    raise RuntimeLoadError(f"unknown model format {fmt!r}", hint="use tflite or onnx")


def _inspect_tflite(model: bytes) -> ModelInfo:
    schema = importlib.import_module(_TFLITE_SCHEMA)
    try:
        root = schema.Model.GetRootAsModel(model, 0)
        codes = [_op_code(schema, root.OperatorCodes(i)) for i in range(root.OperatorCodesLength())]
    except Exception as exc:  # flatbuffers raises struct/index errors on garbage
        raise RuntimeLoadError(f"not a TFLite flatbuffer: {exc}",
                               hint="pass a .tflite file written by a TFLite converter") from exc
    ops: dict[str, int] = {}
    for name, version in codes:
        ops[name] = max(version, ops.get(name, 0))
    nodes: dict[str, list[str]] = defaultdict(list)
    dtypes: set[str] = set()
    type_names = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    for g in range(root.SubgraphsLength()):
        graph = root.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            dtypes.add(_numpy_name(type_names.get(graph.Tensors(t).Type(), "unknown")))
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            out = graph.Tensors(op.Outputs(0)).Name() if op.OutputsLength() else b""
            nodes[codes[op.OpcodeIndex()][0]].append((out or b"").decode(errors="replace"))
    min_version = _metadata(root, "min_runtime_version")
    return ModelInfo("tflite", ops, dict(nodes), dtypes, None, min_version)


def _op_code(schema: Any, code: Any) -> tuple[str, int]:
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    number = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if number == schema.BuiltinOperator.CUSTOM:
        custom = code.CustomCode()
        return f"CUSTOM:{(custom or b'?').decode()}", code.Version()
    return names.get(number, f"BUILTIN_{number}"), code.Version()


def _metadata(root: Any, key: str) -> str | None:
    for i in range(root.MetadataLength()):
        meta = root.Metadata(i)
        if meta.Name() == key.encode():
            buffer = root.Buffers(meta.Buffer())
            raw = bytes(buffer.DataAsNumpy()) if buffer.DataLength() else b""
            return raw.rstrip(b"\x00").decode(errors="replace") or None
    return None


def _numpy_name(tflite_type: str) -> str:
    return {"float32": "float32", "float16": "float16", "float64": "float64", "int8": "int8",
            "uint8": "uint8", "int16": "int16", "int32": "int32", "int64": "int64",
            "bool": "bool"}.get(tflite_type, tflite_type)


def _inspect_onnx(model: bytes) -> ModelInfo:
    try:
        onnx = importlib.import_module("onnx")
    except ImportError:
        return ModelInfo("onnx", {})
    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf DecodeError
        raise RuntimeLoadError(f"not an ONNX model: {exc}",
                               hint="pass a .onnx file") from exc
    ops: dict[str, int] = {}
    nodes: dict[str, list[str]] = defaultdict(list)
    opsets = {o.domain or "ai.onnx": int(o.version) for o in proto.opset_import}
    for node in proto.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
        ops[key] = opsets.get(node.domain or "ai.onnx", 0)
        nodes[key].append(node.name or (node.output[0] if node.output else ""))
    dtypes = {onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
              for t in proto.graph.initializer}
    for value in [*proto.graph.input, *proto.graph.output]:
        elem = value.type.tensor_type.elem_type
        if elem:
            dtypes.add(onnx.helper.tensor_dtype_to_np_dtype(elem).name)
    return ModelInfo("onnx", ops, dict(nodes), dtypes, opsets.get("ai.onnx"))
