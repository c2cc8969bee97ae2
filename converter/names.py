"""The converted model's outputs carry the source's names.

Converters name outputs after their own internals: the TFLite converter writes
``StatefulPartitionedCall_1:0``, Keras' ONNX export ``Identity:0``, ai-edge-quantizer's
full-integer recipe ``<name>_dequant``. A bundle's outputs are what its users read, so the
artifact's outputs are renamed to the source's, in order (the order the conversion is
measured in, output by output). Converters may also reorder outputs (the TFLite
converter did, for a three-output Keras model): :func:`output_order` finds which converted
output is which source output, by shape and then by value, and the artifact's outputs are
put back in the source's order.

Inputs likewise (:func:`rename_inputs`): the TFLite converter names a Keras input ``a``
``serving_default_a:0`` and may list a model's inputs in another order; a device client
feeds the source's names, so the artifact's inputs take them, in the source's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgefleet.agent.runtime.base import Array
from edgefleet.converter import tflite_graph

__all__ = ["input_order", "output_order", "rename_inputs", "rename_outputs"]


def rename_outputs(artifact: bytes, fmt: str, names: Sequence[str],
                   order: Sequence[int] | None = None) -> bytes:
    """``artifact`` (``fmt``: tflite or onnx) with its outputs in ``order`` (output
    ``order[i]`` becomes output ``i``) and named ``names``; unchanged when they are so
    already, or when the counts differ."""
    if not names:
        return artifact
    order = list(order) if order is not None else list(range(len(names)))
    if fmt == "tflite":
        return tflite_graph.rename_outputs(artifact, names, order)
    return _rename_onnx(artifact, names, order)


def rename_inputs(artifact: bytes, fmt: str, names: Sequence[str]) -> bytes:
    """``artifact``'s inputs named ``names`` (the source's) and in their order, matched by
    name (:func:`input_order`); unchanged when they do not match one to one. ONNX exports
    keep the source's input names: only TFLite artifacts are renamed."""
    if fmt != "tflite" or not names:
        return artifact
    order = input_order(names, tflite_graph.input_names(artifact))
    return artifact if order is None else tflite_graph.rename_inputs(artifact, names, order)


def input_order(names: Sequence[str], converted: Sequence[str]) -> list[int] | None:
    """For each source input name, the index of the converted input of that name once the
    converter's decoration (``serving_default_``, ``:0``) is taken off; None unless each
    matches exactly one."""
    bare = [_bare(name) for name in converted]
    if len(names) != len(bare) or sorted(bare) != sorted(names) or \
            len(set(bare)) != len(bare):
        return None
    return [bare.index(name) for name in names]


def _bare(name: str) -> str:
    return name.split(":")[0].removeprefix("serving_default_")


def output_order(source: Sequence[Array], converted: Sequence[Array]) -> list[int] | None:
    """For each source output, the index of the converted output that is it: of the same
    shape (else size), the closest in value; None when one has no counterpart."""
    if len(source) != len(converted):
        return None
    remaining, order = list(range(len(converted))), []
    for wanted in source:
        same = [j for j in remaining if converted[j].shape == wanted.shape] or \
            [j for j in remaining if converted[j].size == wanted.size]
        if not same:
            return None
        best = min(same, key=lambda j: _distance(wanted, converted[j].reshape(wanted.shape)))
        order.append(best)
        remaining.remove(best)
    return order


def _distance(a: Array, b: Array) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.linalg.norm(x - y) / (np.linalg.norm(x) + 1e-12))


def _rename_onnx(model: bytes, names: Sequence[str], order: list[int]) -> bytes:
    import onnx

    proto = onnx.load_model_from_string(model)
    graph = proto.graph
    current = [o.name for o in graph.output]
    if len(current) != len(names) or sorted(order) != list(range(len(current))) or \
            (current == list(names) and order == sorted(order)):
        return model
    outputs = [type(graph.output[j])() for j in order]
    for new, j in zip(outputs, order, strict=True):
        new.CopyFrom(graph.output[j])
    del graph.output[:]
    graph.output.extend(outputs)
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in graph.node for a in node.attribute):
        _rename_values(graph, names)  # a subgraph may read an output by its name: kept
    return bytes(proto.SerializeToString())


def _rename_values(graph: Any, names: Sequence[str]) -> None:
    """Name the graph's outputs ``names`` wherever they are made or read; a name some
    other value, input or initializer has already is left alone."""
    outputs = [o.name for o in graph.output]
    nodes = graph.node
    fixed = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    taken = ({v for node in nodes for v in [*node.input, *node.output]} | fixed) - set(outputs)
    renames = {old: new for old, new in zip(outputs, names, strict=True)
               if old != new and new not in taken and old not in fixed}
    for node in nodes:
        node.output[:] = [renames.get(v, v) for v in node.output]
        node.input[:] = [renames.get(v, v) for v in node.input]
    for value in [*graph.output, *graph.value_info]:
        value.name = renames.get(value.name, value.name)
