"""Run a model with float inputs and outputs even when it takes or gives int8.

Inputs are matched to the reference's by name (converters decorate names), else by
position; int8/uint8 tensors with a scale are quantized on the way in and dequantized
on the way out, so two conversions of one model can be compared number for number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from edgefleet.agent.runtime.base import Array, Runtime, TensorInfo

__all__ = ["dequantize_output", "float_predict", "input_map", "quantize_input"]


def input_map(source: list[TensorInfo], converted: list[TensorInfo]) -> dict[str, TensorInfo]:
    """Source input name -> converted input: by name (converters decorate names), else order."""
    def bare(name: str) -> str:
        return name.split(":")[0].removeprefix("serving_default_")

    by_name = {bare(t.name): t for t in converted}
    if all(bare(s.name) in by_name for s in source):
        return {s.name: by_name[bare(s.name)] for s in source}
    return {s.name: c for s, c in zip(source, converted, strict=True)}


def float_predict(runtime: Runtime, source: list[TensorInfo]
                  ) -> Callable[[Mapping[str, Array]], list[Array]]:
    """Run with float I/O even when the model takes or gives int8 (quantize at the edges)."""
    ins = input_map(source, runtime.inputs)
    outs = runtime.outputs

    def predict(feeds: Mapping[str, Array]) -> list[Array]:
        quantized = {ins[k].name: quantize_input(v, ins[k]) for k, v in feeds.items()}
        result = runtime.run(quantized)
        return [dequantize_output(result[t.name], t) for t in outs]

    return predict


def quantize_input(value: Array, spec: TensorInfo) -> Array:
    if not spec.scales or spec.dtype not in ("int8", "uint8", "int16"):
        return value
    info = np.iinfo(spec.dtype)
    q = np.round(value / spec.scales[0] + spec.zero_points[0])
    out: Array = np.clip(q, info.min, info.max).astype(spec.dtype)
    return out


def dequantize_output(value: Array, spec: TensorInfo) -> Array:
    if not spec.scales or spec.dtype not in ("int8", "uint8", "int16"):
        return value
    out: Array = ((value.astype(np.float32) - spec.zero_points[0]) * spec.scales[0])
    return out.astype(np.float32)
