"""Whether a source model is quantized already: then no recipe finds anything left to
quantize, and the conversion says so instead of calling the result 'not smaller'."""

from __future__ import annotations

from edgefleet.converter.sources import SourceModel

__all__ = ["QUANTIZED_SOURCE", "quantized_source"]

QUANTIZED_SOURCE = "the source is quantized already (its weights are integers)"


def quantized_source(source: SourceModel) -> bool:
    from edgefleet.converter.tflite_graph import quantized_weights

    return source.kind == "tflite" and quantized_weights(source.path.read_bytes())
