"""``.onnx`` outputs: Keras/SavedModel export (tf2onnx), and ONNX Runtime quantization.

ONNX -> ONNX modes: ``none`` (as is), ``fp16`` (float16 weights and compute, float
I/O kept), ``dynamic`` (int8 weights, after ``quant_pre_process``), ``int8``
(static QDQ: uint8 activations, int8 per-channel weights, calibrated, after
``quant_pre_process``); ``int8`` may exclude named nodes (``keep_float``). A source that
is quantized already (QDQ, QOperator, ``MatMulInteger``) is returned as it is in every mode.

Activations are uint8 (ONNX Runtime's default): with int8 activations ONNX Runtime's
CPU kernels fuse fewer ``DequantizeLinear -> Conv -> QuantizeLinear`` groups (depthwise
convolutions among them), which then run in float between Q/DQ round trips; on
PP-OCR's classifier that made int8 3x slower than float, with uint8 1.5x
(BENCHMARKS.md). The shape annotations (``value_info``) pre-processing leaves
behind are dropped from the result: the runtime infers them again.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.converter._tf import quiet_stdout
from edgefleet.converter.data import Dataset
from edgefleet.converter.errors import (
    ConversionFailedError,
    DataError,
    MissingExtraError,
    UnsupportedPathError,
)
from edgefleet.converter.failures import exception_text, first_lines, onnx_graph_fault
from edgefleet.converter.quantized_source import onnx_quantization_ops
from edgefleet.converter.sources import SourceModel

__all__ = ["CALIBRATION_METHODS", "export_onnx", "quantize_onnx", "sensitive_onnx_nodes"]

OPSET = 17
QDQ_MIN_OPSET = 13


TRACE_SIDE = 224  # a dynamic dim past the batch is traced at this size (1 was too small)
TRACE_NUMBERS = 1 << 22  # at most this many numbers an input on the tracing call


def _trace_shape(shape: tuple[int, ...]) -> list[int]:
    """The shape a Keras model is called at before its ONNX export: the batch 1, other
    dynamic dims :data:`TRACE_SIDE` (halved while the input would pass
    :data:`TRACE_NUMBERS`). At 1, two 3x3 convolutions of a dynamic height and width failed
    ("Computed output size would be negative"); the export keeps the dims dynamic."""
    side = TRACE_SIDE
    while True:
        dims = [1 if i == 0 and d <= 0 else (side if d <= 0 else d)
                for i, d in enumerate(shape)]
        if side <= 8 or math.prod(dims) <= TRACE_NUMBERS:
            return dims
        side //= 2


def export_onnx(source: SourceModel) -> bytes:
    """Keras or SavedModel -> float ONNX."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        try:
            if source.kind == "keras":
                model = source.handle
                dummies = [np.zeros(_trace_shape(i.shape), i.dtype) for i in source.inputs]
                model(dummies[0] if len(dummies) == 1 else dummies)  # export needs a call
                with quiet_stdout():
                    model.export(str(out), format="onnx", verbose=False, opset_version=OPSET)
            else:
                _tf2onnx_cli(source.path, out)
        except ConversionFailedError:
            raise
        except Exception as exc:  # keras export / tf2onnx raise many types
            raise _export_failed(source, exc) from exc
        return out.read_bytes()


def _export_failed(source: SourceModel, exc: Exception) -> ConversionFailedError:
    """Keras' export failed: for a model of dynamic dims past the batch (traced at
    :data:`TRACE_SIDE`), the fix is the deployment size; else an op without an ONNX
    equivalent is likeliest."""
    said = first_lines(exc, count=2, limit=400)
    dynamic = [i.name for i in source.inputs if any(d <= 0 for d in i.shape[1:])]
    if dynamic:
        return ConversionFailedError(
            f"ONNX export failed: {said} (input {dynamic[0]!r} has dynamic dims, traced at "
            f"{TRACE_SIDE} a dim)",
            hint="pass --input-size HxW (the deployment size) or --input-shape NAME=DIMS")
    return ConversionFailedError(f"ONNX export failed: {said}",
                                 hint="check the model's ops have ONNX equivalents")


def _tf2onnx_cli(saved_model: Path, out: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model",
                             str(saved_model), "--output", str(out), "--opset", str(OPSET)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        stderr = exception_text(RuntimeError(result.stderr)).strip()
        raise ConversionFailedError(f"tf2onnx failed: {stderr[-400:]}",
                                    hint="check the SavedModel's serving signature")


class _Reader:
    """ONNX Runtime's calibration data reader over a :class:`Dataset`, one sample at a time,
    or ``batch`` at a time for a model of a fixed batch (the last call padded with its own
    last row)."""

    def __init__(self, data: Dataset,
                 on_sample: Callable[[int, int], None] = lambda done, total: None,
                 batch: int = 1) -> None:
        self._data, self._next, self._on_sample, self._batch = data, 0, on_sample, batch

    def get_next(self) -> dict[str, Any] | None:
        if self._next >= len(self._data):
            return None
        i, self._next = self._next, min(self._next + self._batch, len(self._data))
        self._on_sample(self._next, len(self._data))
        rows = {k: v[i:self._next] for k, v in self._data.inputs.items()}
        short = self._batch - (self._next - i)
        return {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) if short else v
                for k, v in rows.items()}

    def rewind(self) -> None:
        self._next = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


def fixed_batch_of(model: bytes) -> int:
    """The batch every graph input fixes (2 for [2, 3, 24, 24]), else 1: calibration feeds
    that many rows a call."""
    import onnx

    graph = onnx.load_model_from_string(model).graph
    weights = {t.name for t in graph.initializer}
    leading = {i.type.tensor_type.shape.dim[0].dim_value for i in graph.input
               if i.name not in weights and len(i.type.tensor_type.shape.dim) > 0}
    return leading.pop() if len(leading) == 1 and min(leading) > 0 else 1


def quantize_onnx(model: bytes, mode: str, data: Dataset | None = None,
                  keep_float: tuple[str, ...] = (),
                  on_sample: Callable[[int, int], None] = lambda done, total: None,
                  method: str = "minmax", activations: str = "uint8") -> bytes:
    """``mode`` none, fp16, dynamic or int8; int8 takes a calibration ``method``
    (:data:`CALIBRATION_METHODS`) and ``activations`` (uint8 or int8)."""
    if mode == "none" or onnx_quantization_ops(model):
        return model  # quantized already: nothing left to quantize (the pipeline says so)
    if stores_float16_onnx(model):
        if mode == "fp16":
            return model  # its float16 weights kept: the answer for a float16 source
        raise UnsupportedPathError(
            f"{mode} of an ONNX model that stores float16 weights is not offered (ONNX "
            "Runtime's quantizer reads float32 weights)",
            hint="keep float16 with --quantize fp16, or convert the float32 original")
    try:
        from onnxruntime.quantization import (
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise MissingExtraError("onnxruntime quantization tools (onnx, sympy)") from exc
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp) / n for n in ("src.onnx", "pre.onnx", "out.onnx"))
        src.write_bytes(model)
        try:
            if mode == "fp16":
                return _fp16(model, data)
            _pre_process(quant_pre_process, src, pre)
            if mode == "dynamic":
                quantize_dynamic(pre, out, weight_type=QuantType.QInt8)
            else:
                if data is None:
                    raise DataError("int8 quantization needs calibration data",
                                    hint="pass --calibration PATH (.npy, .npz or an image folder)")
                quantize_static(pre, out, _Reader(data, on_sample, fixed_batch_of(model)),
                                quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=QuantType.QUInt8
                                if activations == "uint8" else QuantType.QInt8,
                                weight_type=QuantType.QInt8, nodes_to_exclude=list(keep_float),
                                calibrate_method=_method(method),
                                extra_options=_calibration_options(method))
            _strip_shape_annotations(out)
        except (DataError, MissingExtraError):
            raise
        except ConversionFailedError as exc:  # said already (the opset upgrade), with its fix
            raise ConversionFailedError(f"ONNX Runtime quantization ({mode}) failed: "
                                        f"{exc.message}", hint=exc.hint) from exc
        except Exception as exc:  # ORT quantization raises many types: the graph's fault
            # when known; else no hint, and the attempt says which options remain
            said = f"{type(exc).__name__}: {first_lines(exc)}"
            raise ConversionFailedError(f"ONNX Runtime quantization ({mode}) failed: {said}",
                                        hint=onnx_graph_fault(model)) from exc
        return out.read_bytes()


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
            "entropy": CalibrationMethod.Entropy}[name]


def _calibration_options(method: str) -> dict[str, Any]:
    # histograms of 2048 bins (ORT's entropy default is 128): fine enough, bounded memory
    return {"CalibPercentile": 99.999, "CalibNumBins": 2048} if method != "minmax" else {}


def _strip_shape_annotations(path: Path) -> None:
    import onnx

    model = onnx.load(path)
    if len(model.graph.value_info):
        del model.graph.value_info[:]
        onnx.save(model, path)


def _pre_process(pre_process: Any, src: Path, out: Path) -> None:
    """Opset 13 at least (per-channel QDQ needs it), then ORT's pre-processing; symbolic
    shape inference is skipped for graphs it cannot infer (dynamic spatial sizes, as in
    many detection models)."""
    _upgrade_opset(src, QDQ_MIN_OPSET)
    # A failed symbolic inference dumps the model into the working directory
    # (sym_shape_infer_temp.onnx and its external data): keep that in the temp folder.
    with _working_directory(src.parent):
        try:
            pre_process(src, out, skip_symbolic_shape=False)
        except Exception:  # AssertionError or "Incomplete symbolic shape inference"
            pre_process(src, out, skip_symbolic_shape=True)


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def _upgrade_opset(path: Path, opset: int) -> None:
    import onnx
    from onnx import version_converter

    model = onnx.load(path)
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise ConversionFailedError(_ml_only(model), hint="convert it with --quantize none: "
                                    "quantization works on standard ONNX operators (Conv, "
                                    "MatMul, Gemm), and this model has none")
    try:
        onnx.save(version_converter.convert_version(model, opset), path)
    except Exception as exc:  # the version converter raises RuntimeError / ValidationError
        raise ConversionFailedError(
            f"the model uses ONNX opset {current}; upgrading it to {opset} for int8 failed: "
            f"{first_lines(exc)}", hint="re-export the model with opset 13 or newer") from exc


FP16_MAX = 65504.0  # the largest finite float16
FP16_SAFE = FP16_MAX / 4  # an activation seen above this may overflow on other inputs
FP16_PROBE_SAMPLES = 8


def _fp16(model: bytes, data: Dataset | None = None) -> bytes:
    """Float16 weights and compute, except where float16 cannot hold the numbers.

    A published text detector keeps a batch norm variance of 1e8 and activations of the
    same scale: converted whole, float16 clips them and its output falls to cosine 0.42.
    The nodes that make or read a constant beyond float16's range, and (with calibration
    data) an activation seen above a quarter of it, stay float32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load_model_from_string(model)
    big = _big_constants(proto) | (_big_activations(model, data) if data is not None else set())
    kept = _name_readers_and_makers(proto, big)
    converted = convert_float_to_float16(proto, keep_io_types=True, node_block_list=kept)
    _drop_round_trips(converted)
    _pack_float16(converted)
    return bytes(converted.SerializeToString())


def _pack_float16(proto: Any) -> None:
    """Float16 tensors as raw bytes: the float16 converter leaves a Constant node's values
    one varint each (2.5 bytes a number on PP-OCR cls, whose weights are all Constants)."""
    from onnx import TensorProto, numpy_helper

    tensors = [*proto.graph.initializer,
               *(a.t for n in proto.graph.node for a in n.attribute if a.name == "value")]
    for tensor in tensors:
        if tensor.data_type == TensorProto.FLOAT16 and not tensor.raw_data:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))


def _drop_round_trips(proto: Any) -> None:
    """Remove float32 -> float16 -> float32 Cast pairs: the float16 converter puts one
    between any two float32 nodes, which would clip the very tensor they keep. The cast
    back becomes an Identity of the float32 tensor (it may name a graph output)."""
    from onnx import TensorProto

    def cast_to(node: Any) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((int(a.i) for a in node.attribute if a.name == "to"), None)

    graph = proto.graph
    outputs = {o.name for o in graph.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    made_by = {out: node for node in graph.node for out in node.output}
    dropped: set[int] = set()
    for index, node in enumerate(graph.node):
        if cast_to(node) != TensorProto.FLOAT16 or node.output[0] in outputs:
            continue
        source = made_by.get(node.input[0])
        if source is None or cast_to(source) == TensorProto.FLOAT16:
            continue  # a graph input or initializer: its type is not known here
        back = readers.get(node.output[0], [])
        if not back or any(cast_to(b) != TensorProto.FLOAT for b in back):
            continue
        for cast in back:
            cast.op_type = "Identity"
            del cast.attribute[:]
            cast.input[:] = [node.input[0]]
        dropped.add(index)
    # by position: a repeated field's remove() matches by value, not by the node meant
    survivors = []
    for index, node in enumerate(graph.node):
        if index not in dropped:
            survivor = type(node)()
            survivor.CopyFrom(node)
            survivors.append(survivor)
    del graph.node[:]
    graph.node.extend(survivors)


def _big_constants(proto: Any) -> set[str]:
    """Float initializers and Constant outputs holding a value beyond float16's range (such
    Constant nodes become initializers)."""
    from onnx import TensorProto, numpy_helper

    def too_big(tensor: Any) -> bool:
        if tensor.data_type != TensorProto.FLOAT:
            return False
        values = numpy_helper.to_array(tensor)
        return bool(values.size) and float(np.nanmax(np.abs(values))) > FP16_MAX

    big = {init.name for init in proto.graph.initializer if too_big(init)}
    for node in list(proto.graph.node):
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and too_big(value):
            # as an initializer, so that it stays float32 for the nodes kept float32 (the
            # float16 converter sends a Constant's output through float16 on its way)
            value.name = node.output[0]
            proto.graph.initializer.append(value)
            proto.graph.node.remove(node)
            big.add(value.name)
    return big


def _big_activations(model: bytes, data: Dataset) -> set[str]:
    """Float tensors whose magnitude passes :data:`FP16_SAFE` on calibration samples."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    proto = onnx.load_model_from_string(model)
    inferred = onnx.shape_inference.infer_shapes(proto)
    have = {o.name for o in proto.graph.output}
    for info in inferred.graph.value_info:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT and info.name not in have:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(
                info.name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    peak = dict.fromkeys(names, 0.0)
    for sample in itertools.islice(_Reader(data, batch=fixed_batch_of(model)),
                                   FP16_PROBE_SAMPLES):
        for name, value in zip(names, session.run(None, sample), strict=True):
            if isinstance(value, np.ndarray) and value.dtype == np.float32 and value.size:
                peak[name] = max(peak[name], float(np.nanmax(np.abs(value))))
    return {name for name, value in peak.items() if value > FP16_SAFE}


def _name_readers_and_makers(proto: Any, tensors: set[str]) -> list[str]:
    """Names of the nodes that make or read one of ``tensors`` (unnamed ones are named
    here, so that the float16 converter can keep them)."""
    kept: list[str] = []
    for index, node in enumerate(proto.graph.node):
        if tensors.intersection(node.output) or tensors.intersection(node.input):
            if not node.name:
                node.name = f"edgefleet_fp32_{index}"
            kept.append(node.name)
    return kept


def sensitive_onnx_nodes(model: bytes, data: Dataset, quantized: bytes) -> list[str]:
    """Nodes ranked by the SQNR their QDQ versions in ``quantized`` lose (worst first)."""
    try:
        return _sensitive(model, data, quantized)
    except ConversionFailedError:
        raise
    except Exception as exc:  # ORT's debugging helpers raise many types
        raise ConversionFailedError(f"measuring per-node int8 error failed: "
                                    f"{type(exc).__name__}: {first_lines(exc)}",
                                    hint="use --quantize int8 or fp16 directly") from exc


def _sensitive(model: bytes, data: Dataset, quantized: bytes) -> list[str]:
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as dbg
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from edgefleet.converter.sensitivity import Node, rank_by_loss

    sample = data.take(16)
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, qdq = (Path(tmp) / n for n in ("src.onnx", "pre.onnx", "qdq.onnx"))
        src.write_bytes(model)
        _pre_process(quant_pre_process, src, pre)
        qdq.write_bytes(quantized)
        activations = []
        for path in (pre, qdq):
            augmented = Path(tmp) / f"aug-{path.name}"
            dbg.modify_model_output_intermediate_tensors(path, augmented)
            activations.append(dbg.collect_activations(
                str(augmented), _Reader(sample, batch=fixed_batch_of(model))))
        matched = dbg.create_activation_matching(activations[1], activations[0])
        errors = dbg.compute_activation_error(matched)
        graph = onnx.load(pre).graph
    nodes = [Node(n.name, tuple(n.input), tuple(n.output)) for n in graph.node if n.name]
    sqnr = {t: float(e["xmodel_err"]) for t, e in errors.items() if "xmodel_err" in e}
    return rank_by_loss(nodes, sqnr)


def stores_float16_onnx(model: bytes) -> bool:
    """Whether most of an ONNX model's weight bytes are float16 (a float16 export, or this
    converter's own fp16 result): the source is kept as it is for fp16."""
    import onnx

    proto = onnx.load_model_from_string(model)
    sizes: dict[int, int] = {}
    for tensor in proto.graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        sizes[tensor.data_type] = sizes.get(tensor.data_type, 0) + count
    half, full = sizes.get(onnx.TensorProto.FLOAT16, 0), sizes.get(onnx.TensorProto.FLOAT, 0)
    return half > 0 and half >= full


def _ml_only(model: Any) -> str:
    """An int8 refusal for a model of no standard ONNX operator set (a scikit-learn export
    importing only ai.onnx.ml): said as such, never as "opset 0"."""
    domains = sorted(f"{o.domain} v{o.version}" for o in model.opset_import) or ["none"]
    return (f"the model imports only the operator set{'s' if len(domains) > 1 else ''} "
            f"{', '.join(domains)} and no standard ONNX opset (the default domain): "
            "quantization finds no operator to quantize in it, and cannot upgrade its opset")
