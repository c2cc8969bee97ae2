"""Float ``.tflite`` -> quantized ``.tflite`` with ai-edge-quantizer (LiteRT Quantizer).

Recipes (:data:`RECIPES`): ``int8`` (``static_wi8_ai8``, calibrated), ``int8-a16``
(``static_wi8_ai16``: an accuracy option, LiteRT runs int16 activations on reference
kernels), ``weight-only`` (``weight_only_wi8_afp32``), ``dynamic`` (``dynamic_wi8_afp32``)
and ``fp16`` (float casting; a source that already stores float16 weights is kept as it
is). ``keep_float`` names operators (by their first output tensor) left in float through
per-op ``NO_QUANTIZE`` rules. Many published models carry no signature, which the
quantizer requires: such a model first gets a ``serving_default`` signature over its graph
inputs and outputs; sparse weights behind ``DENSIFY`` are made dense constants, float16
weights behind ``DEQUANTIZE`` are folded to float32 first, and operator codes written in
the old schema field only are normalized (the quantizer reads the new field alone).
Inputs and outputs stay float unless ``int8_io`` is asked for.
"""

from __future__ import annotations

from typing import Any

from edgefleet.converter._tf import quiet_stdout
from edgefleet.converter.data import Dataset
from edgefleet.converter.errors import (
    ConversionFailedError,
    DataError,
    MissingExtraError,
    UnsupportedPathError,
)
from edgefleet.converter.tflite_graph import debug_interpreter, pack, quantized_weights

__all__ = ["RECIPES", "STATIC", "densify_weights", "ensure_signature",
           "float16_weights_to_float32", "normalize_opcodes",
           "prepare", "quantize_tflite", "stores_float16"]

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
    return pack(root, len(model))


def float16_weights_to_float32(model: bytes) -> bytes:
    """Fold ``DEQUANTIZE`` of constant float16 weights into float32 constants.

    Models published with float16 weights (mediapipe's, for one) dequantize them
    at run time; the quantizer only quantizes float32 constants, so without this
    it leaves such a model as it is. The float16 copies are dropped from the file.
    """
    from ai_edge_litert import schema_py_generated as schema

    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    if not _fold_float16(root, schema):
        return model
    return pack(root, len(model) * 2)


def densify_weights(model: bytes) -> bytes:
    """Replace every ``DENSIFY`` of a constant (sparse weights) by the dense constant.

    Models published with sparse weights (mediapipe's full-range face detector, its pose
    detector) densify them at run time; the quantizer took the dense result for an
    activation and wrote it asymmetric (zero point -128), which LiteRT's int8
    convolutions refuse to load. LiteRT itself densifies them here: the model runs once
    with every tensor kept, and each ``DENSIFY`` output becomes a constant.
    """
    from ai_edge_litert import schema_py_generated as schema

    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    code = schema.BuiltinOperator.DENSIFY
    densify = {i for i, c in enumerate(root.operatorCodes)
               if max(c.builtinCode, c.deprecatedBuiltinCode) == code}
    graph = root.subgraphs[0]
    targets = [op for op in graph.operators if op.opcodeIndex in densify]
    if not targets:
        return model
    dense = _dense_values(model, [op.outputs[0] for op in targets])
    for op in targets:
        buffer = schema.BufferT()
        buffer.data = list(dense[op.outputs[0]].tobytes())
        root.buffers.append(buffer)
        graph.tensors[op.outputs[0]].buffer = len(root.buffers) - 1
        root.buffers[graph.tensors[op.inputs[0]].buffer].data = None  # the sparse copy
    graph.operators = [op for op in graph.operators if op.opcodeIndex not in densify]
    _drop_unused_tensors(root, graph, 0)
    return pack(root, len(model) * 2)


def _dense_values(model: bytes, tensors: list[int]) -> dict[int, Any]:
    """The values of ``tensors`` after one run of ``model`` on zeros (LiteRT's own kernels:
    the XNNPack delegate leaves the DENSIFY outputs unwritten)."""
    import numpy as np

    interpreter = debug_interpreter(model)
    for spec in interpreter.get_input_details():
        interpreter.set_tensor(spec["index"], np.zeros(spec["shape"], spec["dtype"]))
    interpreter.invoke()
    return {index: interpreter.get_tensor(index).copy() for index in tensors}


def normalize_opcodes(model: bytes) -> bytes:
    """Set every operator code's ``builtinCode`` from ``deprecatedBuiltinCode`` when older.

    Models written before the schema widened the field (mediapipe's, for one) only fill
    ``deprecated_builtin_code``; LiteRT reads the larger of the two, but ai-edge-quantizer
    reads ``builtin_code`` alone and took every such operator for ``ADD`` (code 0): it
    quantized convolution weights as activations (asymmetric, zero point != 0), which the
    int8 kernels refuse to load.
    """
    from ai_edge_litert import schema_py_generated as schema

    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    if not _normalize(root):
        return model
    return pack(root, len(model))


def _normalize(root: Any) -> int:
    fixed = 0
    for code in root.operatorCodes:
        if code.deprecatedBuiltinCode > code.builtinCode:
            code.builtinCode, fixed = code.deprecatedBuiltinCode, fixed + 1
    return fixed


def _fold_float16(root: Any, schema: Any) -> int:
    import numpy as np

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
            buffer = schema.BufferT()
            buffer.data = list(weights.tobytes())
            root.buffers.append(buffer)
            graph.tensors[op.outputs[0]].buffer = len(root.buffers) - 1
            root.buffers[source.buffer].data = None  # the float16 copy is no longer read
            folded += 1
        graph.operators = keep
        _drop_unused_tensors(root, graph, root.subgraphs.index(graph))
    return folded


def _drop_unused_tensors(root: Any, graph: Any, index: int) -> None:
    """Remove tensors no operator, graph input or output uses; renumber the rest."""
    used = {i for op in graph.operators for i in [*op.inputs, *op.outputs] if i >= 0}
    used |= {*graph.inputs, *graph.outputs}
    order = [i for i in range(len(graph.tensors)) if i in used]
    new = {old: n for n, old in enumerate(order)}
    graph.tensors = [graph.tensors[i] for i in order]
    for op in graph.operators:
        op.inputs = [new[i] if i >= 0 else i for i in op.inputs]
        op.outputs = [new[i] for i in op.outputs]
    graph.inputs, graph.outputs = [new[i] for i in graph.inputs], [new[i] for i in graph.outputs]
    for signature in root.signatureDefs or []:
        if signature.subgraphIndex == index:
            for item in [*(signature.inputs or []), *(signature.outputs or [])]:
                item.tensorIndex = new[item.tensorIndex]


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


def prepare(model: bytes) -> bytes:
    """What the quantizer reads: opcodes normalized, sparse weights made dense, float16
    weights folded, a signature."""
    return ensure_signature(float16_weights_to_float32(densify_weights(normalize_opcodes(model))))


def stores_float16(model: bytes) -> bool:
    """Whether the model keeps its weights in float16 behind ``DEQUANTIZE`` (mediapipe's do)."""
    from ai_edge_litert import schema_py_generated as schema

    root = schema.Model.GetRootAsModel(model, 0)
    graph = root.Subgraphs(0)
    codes = [max(root.OperatorCodes(i).BuiltinCode(), root.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(root.OperatorCodesLength())]
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if codes[op.OpcodeIndex()] == schema.BuiltinOperator.DEQUANTIZE and \
                graph.Tensors(op.Inputs(0)).Type() == schema.TensorType.FLOAT16:
            return True
    return False


def quantize_tflite(model: bytes, mode: str, data: Dataset | None,
                    keep_float: tuple[str, ...] = (), int8_io: bool = False) -> bytes:
    """Quantize a float TFLite with recipe ``mode`` (:data:`RECIPES`); ``keep_float`` names
    the output tensors of operators left in float. The graph's inputs and outputs stay
    float unless ``int8_io`` (the quantizer's static recipes make them int8)."""
    if mode == "none" or quantized_weights(model):
        return model  # quantized already: nothing left to quantize (the pipeline says so)
    if mode == "fp16" and stores_float16(model):
        return model  # keep float16: the source already is what fp16 would write
    if mode not in RECIPES:
        raise UnsupportedPathError(f"{mode} of a float .tflite is not offered",
                                   hint=f"use --quantize with one of {sorted(RECIPES)}")
    quantizer, _ = _modules()
    signed = prepare(model)
    try:
        with quiet_stdout():
            return _quantize(quantizer, _recipe(mode, keep_float, int8_io), signed, data)
    except (DataError, UnsupportedPathError):
        raise
    except Exception as exc:  # the quantizer raises ValueError, KeyError, RuntimeError
        raise ConversionFailedError(f"ai-edge-quantizer ({mode}) failed: {exc!r}",
                                    hint="try --quantize fp16 or --quantize auto") from exc


# edgefleet mode -> (ai-edge-quantizer config kind, weight bits, activation bits)
RECIPES = {"dynamic": ("dynamic", 8, 0), "weight-only": ("weight_only", 8, 0),
           "int8": ("static", 8, 8), "int8-a16": ("static", 8, 16), "fp16": ("float16", 16, 0)}
STATIC = ("int8", "int8-a16")


def _recipe(mode: str, keep_float: tuple[str, ...], int8_io: bool = False) -> Any:
    import re

    from ai_edge_quantizer import algorithm_manager, qtyping, recipe_manager

    manager = recipe_manager.RecipeManager()
    kind, weights, activations = RECIPES[mode]
    every = qtyping.TFLOperationName.ALL_SUPPORTED
    if kind == "static":
        manager.add_static_config(regex=".*", operation_name=every,
                                  activation_num_bits=activations, weight_num_bits=weights)
    elif kind == "float16":
        manager.add_weight_only_config(regex=".*", operation_name=every, num_bits=16,
                                       algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    else:
        getattr(manager, f"add_{kind}_config")(regex=".*", operation_name=every,
                                                 num_bits=weights)
    for name in keep_float:  # later rules win: these operators stay float
        manager.add_quantization_config(
            regex=f"^{re.escape(name)};", operation_name=every,  # scope: "out1;out2;"
            algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
    # float I/O unless int8_io: the graph's inputs and outputs are not quantized (and the
    # outputs of float operators are not requantized at the end); int16 activations keep
    # float I/O always (LiteRT takes int16 inputs, which nothing upstream gives)
    ends = [] if int8_io and activations == 8 else \
        [qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT]
    if int8_io and activations == 8 and keep_float:
        ends = [qtyping.TFLOperationName.OUTPUT]
    for end in ends:
        manager.add_quantization_config(
            regex=".*", operation_name=end,
            algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


def _quantize(quantizer: Any, recipe: Any, signed: bytes, data: Dataset | None) -> bytes:
    q = quantizer.Quantizer(signed, recipe)
    if not q.need_calibration:
        return bytes(q.quantize(enable_progress_report=False).quantized_model)
    if data is None:
        raise DataError("static quantization needs calibration data",
                        hint="pass --calibration PATH (.npy, .npz or an image folder)")
    names = _signature_inputs(signed)
    samples = [{names.get(k, k): v[i:i + 1] for k, v in data.inputs.items()}
               for i in range(len(data))]
    calibration = q.calibrate({SIGNATURE: samples})
    return bytes(q.quantize(calibration, enable_progress_report=False).quantized_model)
