"""Read and edit a ``.tflite`` flatbuffer: which operators compute in float, whether the
weights are quantized already, input and output names, and the interpreter that keeps
every tensor.

Used by the quantizer (:mod:`edgefleet.converter.litert_quantizer`), the per-operator
ranking (:mod:`edgefleet.converter.sensitivity`) and the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flatbuffers

__all__ = ["debug_interpreter", "float_io", "float_ops", "input_names", "output_names", "pack",
           "quantized_weights", "rename_inputs", "rename_outputs", "split_shared_outputs",
           "unpack"]

BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")  # conversions at the edges of integer parts
QUANTIZED_TYPES = ("INT8", "UINT8", "INT4", "INT16")


def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def unpack(model: bytes) -> Any:
    """The model as mutable objects (``ModelT``), every buffer inside the flatbuffer.

    ai-edge-quantizer writes weights after the flatbuffer, found by offset; packing the
    objects back writes the flatbuffer alone, so such buffers are read in first.
    """
    import numpy as np

    schema = _schema()
    root = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(model, 0))
    for buffer in root.buffers or []:
        if buffer.offset > 1:
            buffer.data = np.frombuffer(model, np.uint8, buffer.size, buffer.offset).copy()
            buffer.offset = buffer.size = 0
    return root


def pack(root: Any, size_hint: int) -> bytes:
    """``root`` (``ModelT``) written back as a ``.tflite`` flatbuffer."""
    builder = flatbuffers.Builder(size_hint + 1024)
    builder.Finish(root.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def debug_interpreter(model: bytes) -> Any:
    """A LiteRT interpreter on its own kernels that keeps every tensor readable.

    Inside the XNNPack delegate's part of a graph intermediate tensors are never written
    (37 of 128 activations of mediapipe's face detector read as zeros), and it densifies
    sparse weights inside itself, leaving ``DENSIFY`` outputs unwritten; LiteRT's own
    kernels write them all. Tensors allocated, ready for ``set_tensor``.
    """
    import warnings

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    with warnings.catch_warnings():  # "intended for debugging purposes only": it is used so
        warnings.simplefilter("ignore")
        interpreter = Interpreter(
            model_content=model, experimental_preserve_all_tensors=True,
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    return interpreter


def _op_names(root: Any) -> list[str]:
    """Operator code index -> builtin name (codes of the old schema field included), or
    ``CUSTOM:<name>``."""
    names = {v: k for k, v in vars(_schema().BuiltinOperator).items() if not k.startswith("_")}
    found = []
    for i in range(root.OperatorCodesLength()):
        code = root.OperatorCodes(i)
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
        custom = code.CustomCode() if name == "CUSTOM" else None
        found.append(f"CUSTOM:{custom.decode()}" if custom else name)
    return found


def float_ops(model: bytes) -> list[str]:
    """Operators of the main graph that compute in float: a float32 activation goes in or
    comes out (conversions at the edges, ``QUANTIZE`` / ``DEQUANTIZE``, aside)."""
    schema = _schema()
    root = schema.Model.GetRootAsModel(model, 0)
    graph, names = root.Subgraphs(0), _op_names(root)

    def float_activation(index: int) -> bool:
        tensor = graph.Tensors(index)
        return tensor.Type() == schema.TensorType.FLOAT32 and not _constant(root, tensor)

    found: list[str] = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        name = names[op.OpcodeIndex()]
        tensors = [op.Inputs(j) for j in range(op.InputsLength())] + \
            [op.Outputs(j) for j in range(op.OutputsLength())]
        if name not in BOUNDARY_OPS and name not in found and \
                any(float_activation(t) for t in tensors if t >= 0):
            found.append(name)
    return found


def quantized_weights(model: bytes) -> bool:
    """Whether the model's weights are quantized already: a constant tensor of an integer
    type with a quantization scale (int8 full-integer or dynamic-range models)."""
    schema = _schema()
    root = schema.Model.GetRootAsModel(model, 0)
    types = {getattr(schema.TensorType, t) for t in QUANTIZED_TYPES
             if hasattr(schema.TensorType, t)}
    for g in range(root.SubgraphsLength()):
        graph = root.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            quantization = tensor.Quantization()
            if tensor.Type() in types and _constant(root, tensor) and \
                    quantization is not None and quantization.ScaleLength() > 0:
                return True
    return False


def _constant(root: Any, tensor: Any) -> bool:
    """Whether the tensor holds data in the file (in the flatbuffer, or after it by offset)."""
    buffer = root.Buffers(tensor.Buffer())
    return buffer is not None and (buffer.DataLength() > 0 or buffer.Offset() > 1)


def output_names(model: bytes) -> list[str]:
    root = _schema().Model.GetRootAsModel(model, 0)
    graph = root.Subgraphs(0)
    return [bytes(graph.Tensors(graph.Outputs(i)).Name()).decode()
            for i in range(graph.OutputsLength())]


def float_io(model: bytes) -> list[str]:
    """Names of the main graph's inputs and outputs that are float (float32 or float16)."""
    schema = _schema()
    graph = schema.Model.GetRootAsModel(model, 0).Subgraphs(0)
    ends = [graph.Inputs(i) for i in range(graph.InputsLength())] + \
        [graph.Outputs(i) for i in range(graph.OutputsLength())]
    floats = (schema.TensorType.FLOAT32, schema.TensorType.FLOAT16)
    return [bytes(graph.Tensors(t).Name()).decode() for t in ends
            if graph.Tensors(t).Type() in floats]


def input_names(model: bytes) -> list[str]:
    root = _schema().Model.GetRootAsModel(model, 0)
    graph = root.Subgraphs(0)
    return [bytes(graph.Tensors(graph.Inputs(i)).Name()).decode()
            for i in range(graph.InputsLength())]


def rename_inputs(model: bytes, names: Sequence[str], order: Sequence[int]) -> bytes:
    """``model`` with its graph inputs in ``order`` (input ``order[i]`` becomes input ``i``)
    and named ``names``, the signature's input names too (the TFLite converter names a
    Keras input ``a`` ``serving_default_a:0``, and may list the inputs in another order).
    A tensor that already has one of the names swaps names with the input. Unchanged when
    inputs and names are so already, or their numbers differ."""
    return _renamed(model, "inputs", input_names(model), names, list(order))


def _rename_tensors(graph: Any, indices: Sequence[int], names: Sequence[str]) -> None:
    """Tensor ``indices[i]`` named ``names[i]``; a tensor holding one of the names already
    takes the old name in exchange (names stay unique)."""
    by_name = {_text(t.name): i for i, t in enumerate(graph.tensors)}
    for index, new in zip(indices, names, strict=True):
        old = _text(graph.tensors[index].name)
        holder = by_name.get(new)
        if holder is not None and holder != index:
            graph.tensors[holder].name = old
            by_name[old] = holder
        graph.tensors[index].name, by_name[new] = new, index


def rename_outputs(model: bytes, names: Sequence[str],
                   order: Sequence[int] | None = None) -> bytes:
    """``model`` with its graph outputs in ``order`` (output ``order[i]`` becomes output
    ``i``; default: as they are) and named ``names`` (the signature's too).

    A tensor that already has one of the names swaps names with the output (the int8
    tensor before a final ``DEQUANTIZE`` is named as the source's output): names stay
    unique, which the per-operator ranking relies on. Unchanged when outputs and names
    are so already, or their numbers differ.
    """
    current = output_names(model)
    return _renamed(model, "outputs", current, names,
                    list(order) if order is not None else list(range(len(current))))


def _renamed(model: bytes, side: str, current: list[str], names: Sequence[str],
             order: list[int]) -> bytes:
    """The graph's ``side`` ("inputs" or "outputs") reordered and renamed, and the first
    signature's names with them (its inputs listed in the graph's new order)."""
    if len(current) != len(names) or sorted(order) != list(range(len(current))) or \
            ([current[j] for j in order] == list(names) and order == sorted(order)):
        return model
    root = unpack(model)
    graph = root.subgraphs[0]
    ends = [int(getattr(graph, side)[j]) for j in order]
    setattr(graph, side, ends)
    _rename_tensors(graph, ends, names)
    new_names = dict(zip(ends, names, strict=True))
    position = {index: i for i, index in enumerate(ends)}
    for signature in root.signatureDefs or []:
        if signature.subgraphIndex != 0:
            continue
        items = getattr(signature, side) or []
        for item in items:
            item.name = new_names.get(item.tensorIndex, item.name)
        if side == "inputs":
            items.sort(key=lambda item: position.get(item.tensorIndex, len(position)))
    return pack(root, len(model))


def _text(name: bytes | str | None) -> str:
    return name.decode() if isinstance(name, bytes) else str(name or "")


def split_shared_outputs(model: bytes) -> bytes:
    """``model`` with each graph output that repeats an earlier one's tensor (a Keras model
    returning the same tensor twice) given its own tensor, made by a ``RESHAPE`` to the same
    shape: one tensor has one name, so the two outputs could not be told apart (both were
    ``y_1``, and a dict of outputs by name kept one). Unchanged when no output repeats."""
    import copy

    schema = _schema()
    root = unpack(model)
    graph = root.subgraphs[0]
    outputs = [int(i) for i in graph.outputs]
    if len(set(outputs)) == len(outputs):
        return model
    codes = root.operatorCodes
    reshape = next((i for i, c in enumerate(codes)
                    if max(c.builtinCode, c.deprecatedBuiltinCode) ==
                    schema.BuiltinOperator.RESHAPE), None)
    if reshape is None:
        code = schema.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.RESHAPE
        code.version = 1
        codes.append(code)
        reshape = len(codes) - 1
    seen: set[int] = set()
    for position, index in enumerate(outputs):
        if index not in seen:
            seen.add(index)
            continue
        tensor = copy.deepcopy(graph.tensors[index])
        tensor.name = f"{_text(tensor.name)}_{position}"
        tensor.buffer = len(root.buffers)
        root.buffers.append(schema.BufferT())
        graph.tensors.append(tensor)
        copied = len(graph.tensors) - 1
        options = schema.ReshapeOptionsT()
        options.newShape = [int(d) for d in (tensor.shapeSignature
                                             if tensor.shapeSignature is not None
                                             else tensor.shape)]
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = reshape, [index], [copied]
        op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
        op.builtinOptions = options
        graph.operators.append(op)
        outputs[position] = copied
        for signature in root.signatureDefs or []:
            items = [item for item in signature.outputs or [] if item.tensorIndex == index]
            if signature.subgraphIndex == 0 and len(items) > 1:
                items[-1].tensorIndex = copied
    graph.outputs = outputs
    return pack(root, len(model))
