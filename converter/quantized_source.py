"""Whether a source model is quantized already: then no recipe finds anything left to
quantize, and the conversion says so instead of calling the result 'not smaller'.

A TFLite source is quantized when a constant tensor is of an integer type with a scale; an
ONNX source when its graph holds quantization operators (:data:`ONNX_QUANTIZATION_OPS`,
``QLinear*``): the QDQ and QOperator models of ONNX Runtime's static quantization, the
``MatMulInteger`` / ``ConvInteger`` ones of its dynamic quantization, and int8 / uint8
weights read through ``DequantizeLinear``.
"""

from __future__ import annotations

from typing import Any

from edgefleet.converter.sources import SourceModel

__all__ = ["ONNX_QUANTIZATION_OPS", "already_quantized", "onnx_quantization_ops",
           "quantized_source"]

ONNX_QUANTIZATION_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
    "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention",
})
ONNX_QUANTIZATION_PREFIX = "QLinear"  # QLinearConv, QLinearMatMul, QLinearAdd, ...


def quantized_source(source: SourceModel) -> str:
    """Why ``source`` is quantized already, as :func:`already_quantized` words it; ``""``
    when it is a float model (or of a kind that is never quantized: Keras, SavedModel)."""
    if source.kind == "tflite":
        from edgefleet.converter.tflite_graph import quantized_weights

        quantized = quantized_weights(source.path.read_bytes())
        return already_quantized("its weights are integers") if quantized else ""
    if source.kind == "onnx":
        ops = onnx_quantization_ops(source.path.read_bytes())
        return already_quantized(f"its graph holds {', '.join(ops[:4])}"
                                 f"{' and more' if len(ops) > 4 else ''} nodes") if ops else ""
    return ""


def already_quantized(why: str) -> str:
    """The words the conversion uses for a quantized source, ``why`` in brackets."""
    return f"the source is quantized already ({why})"


def onnx_quantization_ops(model: bytes) -> list[str]:
    """The quantization operators an ONNX model holds, sorted (subgraphs included)."""
    import onnx

    proto = onnx.load_model_from_string(model)
    return sorted({op for op in _op_types(proto.graph) if op in ONNX_QUANTIZATION_OPS
                   or op.startswith(ONNX_QUANTIZATION_PREFIX)})


def _op_types(graph: Any) -> list[str]:
    """The op types of ``graph`` and of the subgraphs its nodes hold (If, Loop, Scan)."""
    found = []
    for node in graph.node:
        found.append(node.op_type)
        for attribute in node.attribute:
            held = [attribute.g] if attribute.HasField("g") else []
            for sub in [*held, *attribute.graphs]:
                found.extend(_op_types(sub))
    return found
