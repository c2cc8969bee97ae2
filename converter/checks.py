"""Checks made before anything is converted: the output path, the source's shape and
path, the data against the model, and the warnings that the data invites."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgefleet.agent.runtime.base import Array, TensorInfo
from edgefleet.converter import shapes
from edgefleet.converter.config import TFLITE_SOURCE_ONLY, ConvertConfig
from edgefleet.converter.data import DYNAMIC_SIDE, Dataset
from edgefleet.converter.destination import check_writable
from edgefleet.converter.errors import DataError, SourceModelError, UnsupportedPathError
from edgefleet.converter.evaluate import OutputKind, fixed_batch, labelled_output, output_kinds
from edgefleet.converter.failures import first_lines
from edgefleet.converter.onnx_source import external_data_files
from edgefleet.converter.sources import SourceModel

__all__ = ["check_batch_first", "check_finite_outputs", "check_mode", "check_output",
           "check_path", "checked_output_kinds", "enough_for_the_batch", "few_samples",
           "labelled_index", "size_warnings", "tflite_needs_static"]

MIN_CALIBRATION = 100  # calibration samples below which ranges are a guess (a warning)
CALIBRATED = ("int8", "int8-a16", "auto")  # modes whose activations ranges come from data


def check_output(config: ConvertConfig) -> None:
    """The bundle's path can be written: not a folder, in a folder that exists, not a file
    the conversion reads (the model, the signing key, the data) and not a device or pipe:
    each would be silently replaced by the bundle."""
    path = config.output
    _check_not_an_input(config)
    if path.exists() and not path.is_dir() and not path.is_file():
        raise DataError(f"-o {path} is not a regular file (a device, pipe or socket): the "
                        "bundle would be written into it and lost",
                        hint="name a regular file to write, e.g. -o model.efb")
    if path.is_dir():
        raise DataError(f"-o {path} is a folder, not a bundle file",
                        hint=f"name the file to write, e.g. -o {path / 'model.efb'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DataError(f"-o {path}: the folder {parent} does not exist",
                        hint=f"create it first (mkdir -p {parent}) or write elsewhere")
    check_writable(path)  # no permission, a read-only file system: said before converting


def _check_not_an_input(config: ConvertConfig) -> None:
    """``-o`` is none of the files the conversion reads: the model (every file of a
    SavedModel folder), the keys, the data (every file of an image folder), compared as
    resolved paths and, where ``-o`` exists, as the same file (a hard or symbolic link)."""
    target = config.output
    for what, path in _inputs(config):
        clash = _clash(what, path, target)
        if clash:
            raise DataError(f"-o {target} is {clash}: writing the bundle would replace it",
                            hint="write the bundle to a new file of its own, e.g. -o "
                                 f"{_elsewhere(config)}")


def _inputs(config: ConvertConfig) -> list[tuple[str, Path]]:
    named = [("the source model", config.model),
             ("the signing key (--sign-key)", config.sign_key),
             ("the --calibration data", config.calibration), ("the --eval data", config.eval),
             ("the --fine-tune-data", config.fine_tune_data)]
    keys = [(f"the --encrypt-for key {p}", p) for p in config.encrypt_for]
    profiles = [(f"the --target profile {t}", Path(t)) for t in config.targets
                if Path(t).suffix]  # a path; a bare name is a built-in profile
    external = [(f"the source model's external data {p.name}", p)
                for p in external_data_files(config.model)]
    return [(what, path) for what, path in named + keys + profiles + external
            if path is not None]


def _clash(what: str, path: Path, target: Path) -> str:
    """"" when writing ``target`` leaves ``path`` (``what``) alone; else what of it
    ``target`` is: ``path`` itself, or a file in the folder ``path``."""
    if path.resolve() == target.resolve() or _same_file(path, target):
        return what
    if not path.is_dir() or not target.is_file():
        return ""
    if target.resolve().is_relative_to(path.resolve()):
        return f"a file of {what} ({path})"
    found = target.stat()
    inside = (p for p in path.rglob("*") if p.is_file())
    return next((f"{p}, a file of {what} ({path})" for p in inside
                 if os.path.samestat(p.stat(), found)), "")


def _same_file(path: Path, target: Path) -> bool:
    try:
        return os.path.samefile(path, target)
    except OSError:  # either does not exist (yet): not the same file
        return False


def _elsewhere(config: ConvertConfig) -> Path:
    """A bundle path beside the model (outside a data or SavedModel folder)."""
    return config.model.parent / (config.model.stem + "-int8.efb")


def check_batch_first(source: SourceModel) -> None:
    """Samples go along dim 0: an ONNX input whose dims name the batch elsewhere (time-major
    ``[seq, batch, feat]``) would be measured along its sequence, so it is refused."""
    if source.kind != "onnx":
        return
    found = shapes.batch_not_first(source.path.read_bytes())
    if found:
        name, dims = found[0]
        raise UnsupportedPathError(
            f"input {name!r} has dims {dims}: its batch is not dim 0, and edgefleet feeds "
            "samples along dim 0 (it would calibrate and measure along the first dim)",
            hint="export the model batch-first ([batch, seq, ...]; batch_first=True for a "
                 "PyTorch LSTM)")


def check_path(kind: str, fmt: str) -> None:
    not_offered = {("onnx", "tflite"): "ONNX -> TFLite needs onnx2tf and TensorFlow op coverage "
                   "that edgefleet does not vouch for; export TFLite from the original framework",
                   ("tflite", "onnx"): "TFLite -> ONNX converters are unmaintained; convert the "
                   "original model with --format onnx"}
    if (kind, fmt) in not_offered:
        raise UnsupportedPathError(f"{kind} -> {fmt} is not offered",
                                   hint=not_offered[(kind, fmt)])


def check_mode(kind: str, mode: str) -> None:
    if mode in TFLITE_SOURCE_ONLY and kind != "tflite":
        raise UnsupportedPathError(
            f"--quantize {mode} is an ai-edge-quantizer recipe for float .tflite sources",
            hint="use int8, dynamic, fp16 or auto for this source")


def tflite_needs_static(source: SourceModel, fixed: list[TensorInfo],
                        config: ConvertConfig) -> None:
    """TensorFlow -> TFLite needs every dim but the batch fixed: a model left dynamic comes
    out as a file LiteRT cannot run at any real size. One Keras input is fixed by
    ``--input-size`` / ``--input-shape``; other models go through ONNX, which keeps them."""
    if source.kind not in ("keras", "savedmodel") or config.format != "tflite":
        return
    dynamic = [i for i in source.inputs if any(d <= 0 for d in i.shape[1:])]
    if not dynamic:
        return
    one_keras = source.kind == "keras" and len(fixed) == 1
    if one_keras and all(d > 0 for d in fixed[0].shape[1:]):
        return  # traced at the given dims (tflite_backend)
    ignored = "" if one_keras or not (config.input_shapes or config.input_size) else (
        f" (--input-shape / --input-size is not applied to a {source.kind} model of "
        f"{len(fixed)} input{'s' if len(fixed) > 1 else ''} converted to TFLite: only a "
        "one-input Keras model is traced at the given dims)")
    raise DataError(
        f"input {dynamic[0].name!r} has dynamic dims {list(dynamic[0].shape)}: a TFLite model "
        f"needs them fixed{ignored}",
        hint=("pass --input-size HEIGHTxWIDTH or --input-shape NAME=DIMS (the deployment size), "
              "or --format onnx, which keeps them dynamic") if one_keras else
             "use --format onnx, which keeps them dynamic")


def enough_for_the_batch(source: SourceModel,
                         data: Sequence[tuple[Path | None, Dataset | None]]) -> None:
    """A model of a fixed batch above 1 is run (timed, calibrated) a whole batch a call: data
    of fewer samples than that is refused up front (ONNX Runtime failed on the short call)."""
    batch = fixed_batch(source.inputs) or 1
    for path, dataset in data:
        if path is not None and dataset is not None and len(dataset) < batch:
            raise DataError(f"{path.name} has {len(dataset)} sample"
                            f"{'s' if len(dataset) != 1 else ''}: the model needs at least "
                            f"{batch} samples (the batch is fixed at {batch})",
                            hint=f"give {batch} or more samples, or export the model with a "
                                 "dynamic batch")


def check_finite_outputs(source: SourceModel, outputs: list[Array], data: str) -> None:
    """The source's own outputs are finite numbers: where they overflow (NaN or infinity)
    there is nothing to calibrate to or agree with (int8 conversion of such a model crashed
    the process), so the model is refused up front naming the output and the count."""
    names = list(source.output_names) if len(source.output_names) == len(outputs) else \
        [str(i) for i in range(len(outputs))]
    for name, output in zip(names, outputs, strict=True):
        if output.dtype.kind not in "fc" or not len(output):
            continue
        rows = output.reshape(len(output), -1)
        bad = int(np.count_nonzero(~np.all(np.isfinite(rows), axis=1)))
        if bad:
            raise DataError(f"the source model gives NaN/inf on {bad} of {len(output)} {data} "
                            f"samples (output {name!r}): there is nothing to calibrate to or "
                            "compare with",
                            hint="check the model (an exp or a division overflowing float32) "
                                 "or scale the inputs to the range it was trained on")


def labelled_index(source: SourceModel, outputs: list[Array], labels: Array | None) -> int:
    """The output the labels index (:func:`labelled_output`), checked: a model with no
    vector of scores, or labels beyond its width, is refused before any conversion."""
    if labels is None:
        return 0
    index = labelled_output(outputs)
    names = list(source.output_names) or [str(i) for i in range(len(outputs))]
    if index is None:
        shapes_seen = [list(o.shape[1:]) for o in outputs]
        raise DataError(f"the evaluation data has labels, but no output of the model is a "
                        f"vector of class scores (output shapes {shapes_seen} a sample)",
                        hint="drop 'labels' from the --eval data: outputs are then compared "
                             "with the source's")
    width = int(outputs[index].shape[1])
    name = names[index] if index < len(names) else str(index)
    bad = int(np.count_nonzero((labels < 0) | (labels >= width)))
    if bad:
        raise DataError(f"{bad} of {len(labels)} labels are outside 0..{width - 1}, the classes "
                        f"of output {name!r} ({width} scores); labels seen "
                        f"{int(labels.min())}..{int(labels.max())}",
                        hint="give class indices the model's output has (0-based)")
    return index


def checked_output_kinds(config: ConvertConfig, source: SourceModel, outputs: list[Array],
                         labels: bool) -> list[OutputKind]:
    """Classifier or regression, per output (:func:`output_kinds`); ``--output-kind`` names
    an output the model has."""
    names = list(source.output_names) if len(source.output_names) == len(outputs) else \
        [str(i) for i in range(len(outputs))]
    unknown = sorted({name for name, _ in config.output_kinds} - set(names))
    if unknown:
        raise DataError(f"--output-kind names {unknown}, the model's outputs are {names}",
                        hint="use NAME=class or NAME=regression with an output's name")
    return output_kinds(outputs, names, labels, dict(config.output_kinds))


def size_warnings(source: SourceModel, config: ConvertConfig) -> list[str]:
    """A dynamic image input fed an image folder: say what size the images became."""
    dynamic = shapes.dynamic_image_inputs(source.inputs)
    folders = [p for p in (config.calibration, config.eval) if p is not None and p.is_dir()]
    if not dynamic or not folders:
        return []
    return [f"input {dynamic[0]!r} has a dynamic height or width: images were resized to "
            f"{DYNAMIC_SIDE}x{DYNAMIC_SIDE}; pass --input-size HEIGHTxWIDTH (or --input-shape) "
            "to calibrate and evaluate at the deployment size"]


def few_samples(calibration: Dataset | None, config: ConvertConfig) -> list[str]:
    """Calibration of a few samples: ranges fitted to them clip what the others hold."""
    if calibration is None or config.quantize not in CALIBRATED or \
            len(calibration) >= MIN_CALIBRATION:
        return []
    return [f"calibration has {len(calibration)} sample{'s' if len(calibration) > 1 else ''}: "
            "quantization ranges fitted to so few miss the values other inputs reach, and "
            f"int8 loses accuracy; give {MIN_CALIBRATION} or more typical inputs "
            "(--calibration)"]


def check_numeric_results(source: SourceModel, sample: dict[str, Array]) -> None:
    """Outputs whose type the model leaves undeclared are what the runtime makes of them:
    one call shows a string, a sequence or a bfloat16 output, refused naming it before
    anything else runs it (they crashed the packaging, or were blamed on the data)."""
    try:
        results = source.predict(sample)
    except Exception as exc:  # a type numpy cannot hold is ONNX Runtime's own error
        if "No corresponding Numpy type" not in str(exc):
            return  # the evaluation's run says what else went wrong, with the data
        raise SourceModelError(f"{source.path.name}: an output is of a type numpy cannot "
                               f"hold ({first_lines(exc, limit=200)})",
                               hint="cast it to float32 in the graph, or remove it from the "
                                    "graph's outputs") from exc
    for name, value in zip(source.output_names, results, strict=False):
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            kind = f"{type(value).__name__}" + (f" of {value.dtype}" if isinstance(
                value, np.ndarray) else "")
            raise SourceModelError(
                f"{source.path.name}: output {name!r} is a {kind} when the model runs: "
                "edgefleet takes numeric tensor outputs only",
                hint=f"remove {name!r} from the graph's outputs, or declare and cast it as a "
                     "float tensor")
