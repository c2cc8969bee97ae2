"""Rank operators by how much error quantizing them adds, measured on calibration data.

Both models (float and fully quantized) run on the same samples; every activation that
both keep under one name is compared (SQNR, dB). Error accumulates along the graph, so
an operator's rank is the SQNR it *loses*: its inputs' SQNR (the worst of them) minus
its output's. The operators that lose most are kept in float first (the NNCF accuracy-
aware loop reverts layers in the order of their measured contribution the same way).

- TFLite (float ``.tflite`` sources): LiteRT's own kernels (no XNNPack delegate, which
  leaves the activations of its part of the graph unwritten) with
  ``experimental_preserve_all_tensors``;
  an operator is named by its first output tensor, which is the scope name
  ai-edge-quantizer's per-op rules match.
- ONNX: ONNX Runtime's QDQ debugging helpers (``qdq_loss_debug``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.runtime.base import Array
from edgefleet.converter.data import Dataset
from edgefleet.converter.errors import ConversionFailedError
from edgefleet.converter.failures import first_lines
from edgefleet.converter.tflite_graph import debug_interpreter

__all__ = ["Node", "rank_by_loss", "sqnr_db", "tflite_ranking"]

EXACT_DB = 100.0  # the SQNR given to an input no quantization touched (graph inputs, constants)


@dataclass(frozen=True)
class Node:
    """An operator: its name (what keep-float rules match), input and output tensors."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def sqnr_db(reference: Array, other: Array) -> float:
    a, b = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    noise, signal = float(np.mean((a - b) ** 2)), float(np.mean(a * a))
    if noise == 0:
        return EXACT_DB
    return 10 * math.log10(signal / noise) if signal > 0 else -EXACT_DB


def rank_by_loss(nodes: Iterable[Node], sqnr: Mapping[str, float]) -> list[str]:
    """Node names, the one whose quantization loses the most SQNR first."""
    scored = []
    for node in nodes:
        measured = [sqnr[t] for t in node.outputs if t in sqnr]
        if not measured:
            continue
        before = min((sqnr.get(t, EXACT_DB) for t in node.inputs), default=EXACT_DB)
        scored.append((before - min(measured), node.name))
    return [name for _, name in sorted(scored, key=lambda s: -s[0])]


def tflite_ranking(float_model: bytes, quantized: bytes, data: Dataset) -> list[str]:
    """Operators of ``float_model`` ranked by the SQNR their int8 versions lose."""
    reference = _tflite_tensors(float_model, data)
    found = _tflite_tensors(quantized, data)
    nodes = _tflite_nodes(float_model)
    produced = {t for node in nodes for t in node.outputs}  # activations, not constants
    sqnr = {name: sqnr_db(value, found[name]) for name, value in reference.items()
            if name in produced and name in found and found[name].shape == value.shape}
    return rank_by_loss(nodes, sqnr)


def _tflite_nodes(model: bytes) -> list[Node]:
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.Model.GetRootAsModel(model, 0).Subgraphs(0)

    def name(index: int) -> str:
        return bytes(graph.Tensors(index).Name()).decode()

    nodes = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        outs = tuple(name(op.Outputs(j)) for j in range(op.OutputsLength()))
        ins = tuple(name(op.Inputs(j)) for j in range(op.InputsLength()) if op.Inputs(j) >= 0)
        if outs:
            nodes.append(Node(outs[0], ins, outs))
    return nodes


def _tflite_tensors(model: bytes, data: Dataset) -> dict[str, Array]:
    """Every float-valued tensor over the samples (dequantized when quantized), by name.

    Read on LiteRT's own kernels (:func:`debug_interpreter`): under the XNNPack delegate
    activations are never written, and a ranking over them kept the wrong operators float.
    A model those kernels cannot run (a custom operator only the delegate has) is a
    :class:`ConversionFailedError`.
    """
    try:
        return _collected(model, data)
    except (RuntimeError, ValueError) as exc:  # LiteRT's failures to prepare or invoke
        first = first_lines(exc)
        raise ConversionFailedError(
            f"LiteRT's own kernels cannot run the model to measure its operators: {first}",
            hint="the search skips the mixed stage (int8 with operators kept float) and "
                 "goes on to fp16 and float") from exc


def _collected(model: bytes, data: Dataset) -> dict[str, Array]:
    interpreter = debug_interpreter(model)
    details = interpreter.get_tensor_details()
    feeds = interpreter.get_input_details()
    collected: dict[str, list[Array]] = {}
    for i in range(len(data)):
        for spec, value in zip(feeds, _ordered(data, len(feeds)), strict=True):
            interpreter.set_tensor(spec["index"], _as_input(value[i:i + 1], spec))
        interpreter.invoke()
        for detail in details:
            read = _read(interpreter, detail)
            if read is not None:
                collected.setdefault(detail["name"], []).append(read)
    return {k: np.concatenate(v) for k, v in collected.items() if len(v) == len(data)}


def _ordered(data: Dataset, count: int) -> Sequence[Array]:
    values = list(data.inputs.values())
    return values[:count]


def _as_input(value: Array, spec: Mapping[str, Any]) -> Array:
    scale, zero = spec.get("quantization", (0.0, 0))
    if spec["dtype"] in (np.int8, np.uint8) and scale:
        info = np.iinfo(spec["dtype"])
        q: Array = np.clip(np.round(value / scale + zero), info.min, info.max)
        return q.astype(spec["dtype"])
    out: Array = value.astype(spec["dtype"])
    return out


def _read(interpreter: Any, detail: Mapping[str, Any]) -> Array | None:
    try:
        value = interpreter.get_tensor(detail["index"])
    except ValueError:  # tensors without data (freed scratch buffers) cannot be read
        return None
    if value.ndim == 0 or value.dtype == np.int32 or value.dtype == np.bool_:
        return None
    scale, zero = detail.get("quantization", (0.0, 0))
    if value.dtype in (np.int8, np.uint8, np.int16) and scale:
        real: Array = (value.astype(np.float32) - zero) * scale
        return real[None]
    if value.dtype not in (np.float32, np.float16):
        return None
    floats: Array = value.astype(np.float32)
    return floats[None]
