"""Read the source model: Keras (.keras, .h5), a SavedModel folder, ONNX, or float TFLite.

A :class:`SourceModel` describes its inputs and runs itself on the host, so
every converted result can be measured against it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefleet.agent.runtime.base import Array, TensorInfo
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter._tf import keras, tensorflow
from edgefleet.converter.errors import SourceModelError
from edgefleet.converter.failures import source_unreadable
from edgefleet.converter.floatio import dequantize_output, quantize_input
from edgefleet.converter.onnx_source import onnx_source_bytes

__all__ = ["SourceKind", "SourceModel", "keras_output_names", "keras_source", "load_source"]

SourceKind = Literal["keras", "savedmodel", "onnx", "tflite"]
Predict = Callable[[Mapping[str, Array]], list[Array]]


@dataclass(frozen=True)
class SourceModel:
    """The model to convert: kind, path, inputs, and a host predict (outputs in order)."""

    kind: SourceKind
    path: Path
    inputs: list[TensorInfo]
    predict: Predict
    handle: Any = None
    output_names: tuple[str, ...] = ()
    embedded: bytes | None = None  # an ONNX model's bytes with its external data read in

    def model_bytes(self) -> bytes:
        """The model file's bytes (an ONNX model's external data carried inside)."""
        return self.embedded if self.embedded is not None else self.path.read_bytes()

    @property
    def size_bytes(self) -> int:
        if self.embedded is not None:
            return len(self.embedded)
        if self.path.is_dir():
            return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return self.path.stat().st_size


def source_kind(path: Path) -> SourceKind:
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "savedmodel"
        raise SourceModelError(f"{path} is a folder without saved_model.pb",
                               hint="pass a SavedModel folder, .keras, .h5, .onnx or .tflite")
    kinds: dict[str, SourceKind] = {".keras": "keras", ".h5": "keras", ".onnx": "onnx",
                                    ".tflite": "tflite"}
    if path.suffix.lower() not in kinds:
        raise SourceModelError(f"cannot tell the model type of {path.name}",
                               hint="use .keras, .h5, .onnx, .tflite or a SavedModel folder")
    return kinds[path.suffix.lower()]


MAX_MODEL_FILE = (1 << 31) - 1  # protobuf and flatbuffers hold at most 2 GiB


def load_source(path: Path) -> SourceModel:
    if not path.exists():
        raise SourceModelError(f"model {path} does not exist", hint="check the path")
    if not (path.is_file() or path.is_dir()):  # a FIFO would block the read for ever
        raise SourceModelError(f"model {path} is not a regular file (a FIFO, socket or "
                               "device)", hint="give the model file saved on disk")
    if path.is_file() and path.stat().st_size > MAX_MODEL_FILE:  # read whole otherwise
        raise SourceModelError(f"model {path} is {path.stat().st_size / 2**30:.1f} GiB: "
                               "above the 2 GiB one .onnx or .tflite file can hold",
                               hint="check the file; an ONNX model this large keeps its "
                                    "weights as external data next to it")
    if path.is_file() and path.stat().st_size == 0:  # an empty protobuf parses as a model
        raise SourceModelError(f"model {path} is empty (0 bytes)",
                               hint="download or export the model again")
    kind = source_kind(path)
    loader = {"keras": _keras, "savedmodel": _savedmodel, "onnx": _runtime,
              "tflite": _runtime}[kind]
    try:
        return loader(path, kind)
    except SourceModelError:
        raise
    except Exception as exc:  # Keras/TF/ORT raise many unrelated types on bad files
        raise source_unreadable(kind, path, exc) from exc


def _keras(path: Path, kind: SourceKind) -> SourceModel:
    model = keras().models.load_model(path, compile=False)
    inputs = [TensorInfo(name=_clean(t.name), shape=_shape(t.shape),
                         dtype=np.dtype(t.dtype).name) for t in model.inputs]
    return keras_source(path, inputs, model)


def keras_source(path: Path, inputs: list[TensorInfo], model: Any) -> SourceModel:
    """A Keras model in memory (loaded, or pruned from one) as a :class:`SourceModel`."""

    def predict(feeds: Mapping[str, Array]) -> list[Array]:
        values = [feeds[i.name] for i in inputs]
        out = model(values[0] if len(values) == 1 else values, training=False)
        if isinstance(out, dict):  # a dict of outputs: in the model's order of its keys
            out = [out[key] for key in _dict_order(model, out)]
        return [np.asarray(o) for o in (out if isinstance(out, list | tuple) else [out])]

    return SourceModel("keras", path, inputs, predict, model, keras_output_names(model))


def _dict_order(model: Any, out: Mapping[str, Any]) -> list[str]:
    """A dict output's keys in the model's order (``output_names``, the order of
    ``model.outputs`` and of the converted model's outputs), else sorted."""
    declared = getattr(model, "output_names", None)
    if isinstance(declared, list | tuple) and sorted(map(str, declared)) == sorted(out):
        return [str(name) for name in declared]
    return sorted(out)


def keras_output_names(model: Any) -> tuple[str, ...]:
    """The Keras model's output names: its ``output_names`` (a functional model's), else
    the names of the layers that make the outputs ("probs"), never the internal tensor
    names (``keras_tensor_19``); made unique."""
    declared = getattr(model, "output_names", None)
    if isinstance(declared, list | tuple) and len(declared) == len(model.outputs) and \
            all(isinstance(n, str) and n for n in declared):
        return _unique(list(declared))
    return _unique([_layer_name(o, i) for i, o in enumerate(model.outputs)])


def _layer_name(tensor: Any, position: int) -> str:
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(getattr(history, "operation", None), "name", None)
    return str(layer) if layer else _clean(str(getattr(tensor, "name", position)))


def _unique(names: list[str]) -> tuple[str, ...]:
    if len(set(names)) == len(names):
        return tuple(names)
    return tuple(f"{name}_{i}" for i, name in enumerate(names))


def _savedmodel(path: Path, kind: SourceKind) -> SourceModel:
    tf = tensorflow()
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise SourceModelError(f"{path} has no serving_default signature",
                               hint="export the SavedModel with a serving signature")
    spec = signature.structured_input_signature[1]
    inputs = [TensorInfo(name=name, shape=_shape(t.shape),
                         dtype=np.dtype(t.dtype.as_numpy_dtype).name)
              for name, t in sorted(spec.items())]

    def predict(feeds: Mapping[str, Array]) -> list[Array]:
        out = signature(**{k: tf.constant(v) for k, v in feeds.items()})
        return [np.asarray(out[k]) for k in sorted(out)]

    return SourceModel(kind, path, inputs, predict, loaded, tuple(sorted(
        signature.structured_outputs)))


def _runtime(path: Path, kind: SourceKind) -> SourceModel:
    """An ONNX or TFLite source, run in the real domain: an int8 / uint8 input takes real
    values, quantized with the source's own scale and zero point, and a quantized output
    is dequantized, so a conversion is compared with it number for number. An ONNX source
    is checked first (:func:`onnx_source_bytes`: numeric outputs only, external data read
    from the model's own folder and carried inside)."""
    embedded = None
    if kind == "onnx":
        model, external = onnx_source_bytes(path)
        embedded = model if external else None
    else:
        model = path.read_bytes()
    runtime = load_runtime(model, kind, memory_arena=False)  # see attempt.py
    ins = {t.name: t for t in runtime.inputs}
    outs = runtime.outputs

    def predict(feeds: Mapping[str, Array]) -> list[Array]:
        out = runtime.run({k: quantize_input(v, ins[k]) for k, v in feeds.items()})
        return [dequantize_output(out[t.name], t) for t in outs]

    inputs = [replace(t, dtype="float32", scales=(), zero_points=()) if _quantized(t) else t
              for t in runtime.inputs]
    return SourceModel(kind, path, inputs, predict, runtime, tuple(t.name for t in outs),
                       embedded)


def _quantized(info: TensorInfo) -> bool:
    return bool(info.scales) and info.dtype in ("int8", "uint8", "int16")


def _shape(shape: Any) -> tuple[int, ...]:
    return tuple(-1 if d is None else int(d) for d in shape)


def _clean(name: str) -> str:
    return name.split(":")[0]
