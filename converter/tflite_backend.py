"""Keras / SavedModel -> ``.tflite`` with the TFLite converter's post-training quantization.

Modes: ``none`` (float32), ``fp16`` (float16 weights), ``dynamic`` (int8
weights, float activations), ``int8`` (full-integer with a representative
dataset; float I/O unless ``int8_io``). ``int8`` may keep named nodes in float
(``keep_float``), found by :func:`sensitive_nodes`.
"""

from __future__ import annotations

import atexit
import csv
import io
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.converter._tf import quiet_stdout, tensorflow
from edgefleet.converter.data import Dataset
from edgefleet.converter.errors import DataError, UnsupportedPathError
from edgefleet.converter.failures import tflite_conversion
from edgefleet.converter.sources import SourceModel

__all__ = ["sensitive_nodes", "to_tflite"]


def _converter(source: SourceModel) -> Any:
    tf = tensorflow()
    if source.kind == "keras":
        fixed = _fixed_export(source)
        if fixed is not None:
            return tf.lite.TFLiteConverter.from_saved_model(str(fixed))
        return tf.lite.TFLiteConverter.from_keras_model(source.handle)
    if source.kind == "savedmodel":
        return tf.lite.TFLiteConverter.from_saved_model(str(source.path))
    raise UnsupportedPathError(f"the TFLite converter does not read {source.kind} models",
                               hint="float .tflite sources go through ai-edge-quantizer")


def _fixed_export(source: SourceModel) -> Path | None:
    """A one-input Keras model whose dynamic dims ``--input-size`` / ``--input-shape`` fixed:
    exported as a SavedModel at those dims (batch left free), so that the TFLite inputs
    carry them.
    None when nothing beyond the batch dim was dynamic, or it was left so. (A traced
    concrete function of a Keras 3 model converted to outputs of NaN; the export is the
    documented path.) The folder goes with the process's temporary files."""
    tf = tensorflow()
    model = source.handle
    declared = [tuple(tensor.shape) for tensor in model.inputs]
    wanted = [info.shape for info in source.inputs]
    if len(declared) != 1 or None not in declared[0][1:] or \
            any(dim <= 0 for dim in wanted[0][1:]):
        return None
    specs = [tf.TensorSpec((None, *shape[1:]), tensor.dtype, name=info.name)
             for shape, tensor, info in zip(wanted, model.inputs, source.inputs, strict=True)]
    folder = Path(tempfile.mkdtemp(prefix="edgefleet-export-"))
    atexit.register(shutil.rmtree, folder, True)
    model.export(str(folder / "saved_model"), format="tf_saved_model", input_signature=specs,
                 verbose=False)
    return folder / "saved_model"


Progress = Callable[[int, int], None]


def _representative(source: SourceModel, data: Dataset | None,
                    on_sample: Progress = lambda done, total: None) -> Any:
    if data is None:
        raise DataError("int8 quantization needs calibration data",
                        hint="pass --calibration PATH (.npy, .npz or an image folder)")
    names = [i.name for i in source.inputs]

    def gen() -> Iterator[list[np.ndarray[Any, Any]] | dict[str, np.ndarray[Any, Any]]]:
        for i in range(len(data)):
            on_sample(i + 1, len(data))
            if len(names) == 1:
                yield [data.inputs[names[0]][i:i + 1]]
            else:  # by signature input name: the converter orders its inputs its own way
                yield {n: data.inputs[n][i:i + 1] for n in names}

    return gen


def _configure(converter: Any, source: SourceModel, mode: str, data: Dataset | None,
               int8_io: bool, on_sample: Progress) -> None:
    tf = tensorflow()
    if mode == "none":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif mode == "int8":
        converter.representative_dataset = _representative(source, data, on_sample)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8


def to_tflite(source: SourceModel, mode: str, data: Dataset | None = None,
              int8_io: bool = False, keep_float: tuple[str, ...] = (),
              on_sample: Progress = lambda done, total: None) -> bytes:
    """Convert ``source`` with quantization ``mode``; ``keep_float`` nodes stay float."""
    try:
        with quiet_stdout():
            converter = _converter(source)
            if keep_float:
                return _selective_int8(converter, source, data, keep_float)
            _configure(converter, source, mode, data, int8_io, on_sample)
            return bytes(converter.convert())
    except (DataError, UnsupportedPathError):
        raise
    except Exception as exc:  # the TFLite converter raises ConverterError, ValueError, ...
        raise tflite_conversion(mode, exc) from exc


def _debugger(converter: Any, source: SourceModel, data: Dataset | None,
              denylist: tuple[str, ...]) -> Any:
    tf = tensorflow()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(source, data)
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(denylist))
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=_representative(source, data), debug_options=options)


def _selective_int8(converter: Any, source: SourceModel, data: Dataset | None,
                    keep_float: tuple[str, ...]) -> bytes:
    debugger = _debugger(converter, source, data, keep_float)
    return bytes(debugger.get_nondebug_quantized_model())


def sensitive_nodes(source: SourceModel, data: Dataset | None, count: int = 2) -> list[str]:
    """The ``count`` nodes whose int8 outputs err most (RMSE over the quantization scale)."""
    buffer = io.StringIO()
    with quiet_stdout():
        debugger = _debugger(_converter(source), source, data.take(64) if data else None, ())
        debugger.run()
        debugger.layer_statistics_dump(buffer)
    buffer.seek(0)
    scored = []
    for row in csv.DictReader(buffer):
        scale = float(row.get("scale") or 0) or 1.0
        error = math.sqrt(max(float(row.get("mean_squared_error") or 0), 0.0)) / scale
        scored.append((error, row["tensor_name"]))
    return [name for _, name in sorted(scored, reverse=True)[:count]]
