"""Float ``.tflite`` -> quantized ``.tflite`` with ai-edge-quantizer (LiteRT Quantizer).

Recipes: ``dynamic`` (int8 weights, float activations), ``int8`` (static int8
weights and activations, calibrated), ``fp16`` is not offered for TFLite
sources (re-export from the original model). Many published models carry no
signature, which the quantizer requires: such a model first gets a
``serving_default`` signature over its graph inputs and outputs.
"""

from __future__ import annotations

from typing import Any

import flatbuffers

from converter._tf import quiet_stdout
from converter.data import Dataset
from converter.errors import (
    ConversionFailedError,
    DataError,
    MissingExtraError,
    UnsupportedPathError,
)

__all__ = ["ensure_signature", "float16_weights_to_float32", "quantize_tflite"]

SIGNATURE = "serving_default"


def _modules() -> tuple[Any, Any]:
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError as exc:
        raise MissingExtraError("ai-edge-quantizer") from exc
    return quantizer, recipe


def ensure_signature(model: bytes) -> bytes:
    """Return ``model`` with a ``serving_default`` signature over its graph inputs/outputs."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    if root.signatureDefs:
        return model
    graph = root.subgraphs[0]
    signature = schema.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = SIGNATURE, 0
    signature.inputs = [_tensor_map(graph, i) for i in graph.inputs]
    signature.outputs = [_tensor_map(graph, i) for i in graph.outputs]
    root.signatureDefs = [signature]
    builder = flatbuffers.Builder(len(model) + 1024)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def float16_weights_to_float32(model: bytes) -> bytes:
    """Fold ``DEQUANTIZE`` of constant float16 weights into float32 constants.

    Models published with float16 weights (mediapipe's, for one) dequantize them
    at run time; the quantizer only quantizes float32 constants, so without this
    it leaves such a model as it is.
    """
    import numpy as np
    from ai_edge_litert import schema_py_generated as schema

    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    code = schema.BuiltinOperator.DEQUANTIZE
    dequantize = [i for i, c in enumerate(root.operatorCodes)
                  if max(c.builtinCode, c.deprecatedBuiltinCode) == code]
    folded = 0
    for graph in root.subgraphs:
        keep = []
        for op in graph.operators:
            source = graph.tensors[op.inputs[0]] if op.opcodeIndex in dequantize else None
            data = root.buffers[source.buffer].data if source is not None else None
            if source is None or source.type != schema.TensorType.FLOAT16 or data is None:
                keep.append(op)
                continue
            weights = np.frombuffer(bytes(bytearray(data)), np.float16).astype(np.float32)
            target = graph.tensors[op.outputs[0]]
            buffer = schema.BufferT()
            buffer.data = list(weights.tobytes())
            root.buffers.append(buffer)
            target.buffer = len(root.buffers) - 1
            # the float16 source tensor stays (now unused): tensor indices must not shift
            folded += 1
        graph.operators = keep
    if not folded:
        return model
    builder = flatbuffers.Builder(len(model) * 2 + 1024)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor_map(graph: Any, index: int) -> Any:
    from ai_edge_litert import schema_py_generated as schema

    item = schema.TensorMapT()
    name = graph.tensors[index].name
    item.name = (name.decode() if isinstance(name, bytes) else str(name)).split(":")[0]
    item.tensorIndex = index
    return item


def _signature_inputs(model: bytes) -> dict[str, str]:
    """Tensor name -> signature input name, as LiteRT reports them."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=model).get_signature_runner(SIGNATURE)
    return {detail["name"]: key for key, detail in runner.get_input_details().items()}


def quantize_tflite(model: bytes, mode: str, data: Dataset | None) -> bytes:
    if mode in ("none",):
        return model
    if mode == "fp16":
        raise UnsupportedPathError("fp16 of a float .tflite is not offered",
                                   hint="convert the original Keras/SavedModel with fp16")
    quantizer, recipe = _modules()
    signed = ensure_signature(float16_weights_to_float32(model))
    try:
        with quiet_stdout():
            return _quantize(quantizer, recipe, signed, mode, data)
    except (DataError, UnsupportedPathError):
        raise
    except Exception as exc:  # the quantizer raises ValueError, KeyError, RuntimeError
        raise ConversionFailedError(f"ai-edge-quantizer ({mode}) failed: {exc!r}",
                                    hint="try --quantize dynamic, or convert the source model"
                                    ) from exc


def _quantize(quantizer: Any, recipe: Any, signed: bytes, mode: str,
              data: Dataset | None) -> bytes:
    if mode == "dynamic":
        q = quantizer.Quantizer(signed, recipe.dynamic_wi8_afp32())
        return bytes(q.quantize(enable_progress_report=False).quantized_model)
    if data is None:
        raise DataError("int8 quantization needs calibration data",
                        hint="pass --calibration PATH (.npy, .npz or an image folder)")
    q = quantizer.Quantizer(signed, recipe.static_wi8_ai8())
    names = _signature_inputs(signed)
    samples = [{names.get(k, k): v[i:i + 1] for k, v in data.inputs.items()}
               for i in range(len(data))]
    calibration = q.calibrate({SIGNATURE: samples})
    return bytes(q.quantize(calibration, enable_progress_report=False).quantized_model)
