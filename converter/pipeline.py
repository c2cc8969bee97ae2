"""Run a conversion: load, measure the source, try candidates, check budget and targets, package.

The path taken depends on (source kind, target format, mode); docs/converter.md
has the table:

- Keras, SavedModel -> tflite: the TFLite converter's post-training quantization;
- Keras, SavedModel -> onnx: Keras export / tf2onnx, then ONNX Runtime quantization;
- ONNX -> onnx: ONNX Runtime (fp16, dynamic, static QDQ per-channel int8 with a chosen
  calibration method and activation type, named nodes kept float);
- float TFLite -> tflite: ai-edge-quantizer recipes (int8, int8-a16, weight-only,
  dynamic, fp16; named operators kept float);
- ``auto``: the accuracy-aware search of :mod:`edgefleet.converter.search`;
- ONNX -> tflite and TFLite -> onnx are not offered (see ``_check_path``).
"""

from __future__ import annotations

import gzip
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefleet.agent.protocol.encryption import RecipientKey
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.manifest import Manifest, Optimization, RuntimeRequirement
from edgefleet.agent.protocol.signing import SigningKey
from edgefleet.agent.runtime.base import Array, Runtime, TensorInfo
from edgefleet.agent.runtime.inspect import ModelInfo, inspect_model
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter import onnx_backend, prune, shapes, tflite_backend
from edgefleet.converter.advice import failure
from edgefleet.converter.config import TFLITE_SOURCE_ONLY, ConvertConfig
from edgefleet.converter.data import DYNAMIC_SIDE, Dataset, load_dataset
from edgefleet.converter.errors import (
    DataError,
    NoResultError,
    UnsupportedPathError,
)
from edgefleet.converter.evaluate import (
    CLASS,
    Agreement,
    OutputKind,
    Predict,
    accuracy,
    agreement,
    batch_size,
    fixed_batch,
    labelled_output,
    latency_p50_ms,
    output_kinds,
    run_batched,
)
from edgefleet.converter.failures import result_refused
from edgefleet.converter.floatio import float_predict as _predict
from edgefleet.converter.floatio import input_map, quantize_input
from edgefleet.converter.lineage import lineage_of
from edgefleet.converter.names import output_order, rename_outputs
from edgefleet.converter.package import PackageSpec, package_bytes, tensor_spec
from edgefleet.converter.report import Attempt, ConversionReport, Verdict
from edgefleet.converter.search import Candidate, Search, auto_candidates, choose
from edgefleet.converter.sources import SourceModel, keras_source, load_source
from edgefleet.devices import DeviceProfile, check_model, load_profile

__all__ = ["HEALTH_ROWS", "SLOWER_MARGIN", "convert", "health_budget", "is_slower"]

ONNX_RUNTIME_FOR_OPSET = {13: "1.7.0", 14: "1.8.0", 15: "1.10.0", 16: "1.11.0", 17: "1.13.0",
                          18: "1.14.0", 19: "1.16.0", 20: "1.17.0", 21: "1.18.0", 22: "1.20.0",
                          23: "1.22.0"}
HEALTH_ATOL = {"none": 1e-4, "fp16": 5e-3, "dynamic": 2e-2, "int8": 2e-2}
HEALTH_ROWS = 8  # health-check inputs in a bundle, at most
HEALTH_MIN_BYTES = 64 * 1024  # what health data may take at least (see health_budget)
SLOWER_MARGIN = 0.03  # slower than the reference by more than 3 %, measured alternately
MIN_CALIBRATION = 100  # calibration samples below which ranges are a guess (a warning)
CALIBRATED = ("int8", "int8-a16", "auto")  # modes whose activations ranges come from data
QUANTIZED_SOURCE = "the source is quantized already (its weights are integers)"


class Step(Protocol):
    """Progress: a description, and how far along (``done`` of ``total``) when countable."""

    def __call__(self, text: str, done: int | None = None, total: int | None = None) -> None: ...


def _no_progress(text: str, done: int | None = None, total: int | None = None) -> None:
    return None


@dataclass
class _Context:
    config: ConvertConfig
    source: SourceModel  # what is converted (the pruned model when pruning)
    calibration: Dataset | None
    evaluation: Dataset
    source_outputs: list[Array]
    profiles: list[DeviceProfile]
    report: ConversionReport
    step: Step
    recipients: tuple[RecipientKey, ...] = ()
    reference: Predict | None = None  # what a result must not be slower than
    kinds: list[OutputKind] = field(default_factory=list)  # classifier or regression, why
    labelled: int = 0  # the output labels index (labelled_output)
    built: dict[str, bytes] = field(default_factory=dict)  # artifacts by attempt label


def convert(config: ConvertConfig, step: Step = _no_progress) -> ConversionReport:
    """Convert, measure and package; raise :class:`NoResultError` when nothing passes."""
    started = time.perf_counter()
    step("loading the source model")
    ctx = _context(config, step)
    built = ctx.built
    for number, candidate in enumerate(_candidates(ctx), start=1):
        ctx.step = _numbered(step, number)  # every stage of candidate n reads "[n] ..."
        attempt, artifact = _attempt(ctx, candidate)
        ctx.report.attempts.append(attempt)
        if artifact is not None:
            built[attempt.label] = artifact
    ctx.step = step
    chosen = choose(ctx.report.attempts)
    ctx.report.conversion_seconds = round(time.perf_counter() - started, 2)
    if chosen is None:
        raise NoResultError(failure(ctx.report, ctx.config), ctx.report)
    ctx.report.chosen = chosen.label
    step("writing the signed bundle")
    _package(ctx, chosen, built[chosen.label])
    ctx.report.conversion_seconds = round(time.perf_counter() - started, 2)
    return ctx.report


def _numbered(step: Step, number: int) -> Step:
    def numbered(text: str, done: int | None = None, total: int | None = None) -> None:
        step(f"[{number}] {text}", done, total)

    return numbered


def _context(config: ConvertConfig, step: Step) -> _Context:
    _check_output(config)  # fail before converting, not after
    recipients = tuple(RecipientKey.load(p) for p in config.encrypt_for)  # fail before converting
    source = _with_shapes(load_source(config.model), config)
    _check_batch_first(source)
    _check_path(source.kind, config.format)
    _check_mode(source.kind, config.quantize)
    calibration = _load(config.calibration, source, config)
    if calibration is not None:
        calibration = calibration.take(config.calibration_samples)
    evaluation = _load(config.eval, source, config) or calibration
    _enough_for_the_batch(source, ((config.calibration, calibration), (config.eval, evaluation)))
    report = ConversionReport(str(config.model), source.kind, config.format, config.quantize,
                              source.size_bytes, budget_points=config.budget_points,
                              input_shapes={i.name: list(i.shape) for i in source.inputs})
    report.warnings.extend(_size_warnings(source, config) + _few_samples(calibration, config))
    report.source_quantized = _quantized_source(source)
    if evaluation is None:
        evaluation = _synthetic(source)
        report.warnings.append("no --eval or --calibration data: agreement measured on 64 "
                               "uniform random inputs, accuracy not measured")
        report.eval_data = "random"
    else:
        report.eval_data = str(config.eval or config.calibration)
    report.eval_samples = len(evaluation)
    outputs = _source_outputs(source, evaluation, step)
    _check_finite_outputs(source, outputs, "evaluation" if config.eval else
                          "calibration" if config.calibration else "random")
    if calibration is not None and calibration is not evaluation:
        _check_finite_outputs(source, _source_outputs(source, calibration, step), "calibration")
    kinds = _output_kinds(config, source, outputs, evaluation.labels is not None)
    report.output_kinds = [k.as_dict() for k in kinds]
    labelled = _labelled(source, outputs, evaluation.labels)
    if evaluation.labels is not None:
        report.source_accuracy = round(accuracy(outputs, evaluation.labels, labelled), 6)
    report.source_latency_p50_ms = latency_p50_ms(source.predict,
                                                  _one_call(evaluation, source.inputs))
    profiles = [load_profile(t) for t in config.targets]
    ctx = _Context(config, source, calibration, evaluation, outputs, profiles, report, step,
                   recipients, kinds=kinds, labelled=labelled)
    if config.prune:
        ctx.source = _pruned(ctx, config.prune)
        if evaluation.labels is not None:  # labels judge the pruning (accuracy lost in all);
            # the outputs of what is converted judge the conversion's worst output
            ctx.source_outputs = run_batched(ctx.source.predict, evaluation,
                                             batch_size(ctx.source.inputs))
    # a Keras or SavedModel source runs on TensorFlow, not an edge runtime: no rival
    ctx.reference = source.predict if source.kind in ("onnx", "tflite") else None
    if source.kind in ("keras", "savedmodel") and config.quantize != "none":
        ctx.reference = _float_conversion(ctx)
        report.float_latency_p50_ms = latency_p50_ms(ctx.reference,
                                                     _one_call(evaluation, source.inputs))
    return ctx


def _source_outputs(source: SourceModel, evaluation: Dataset, step: Step) -> list[Array]:
    """The source's outputs on the evaluation data; data the source itself cannot run
    (token ids beyond its vocabulary, say) is refused naming the inputs and their values."""
    try:
        return run_batched(source.predict, evaluation, batch_size(source.inputs),
                           on_batch=lambda d, t: step("evaluating the source model", d, t))
    except EdgefleetError:
        raise
    except Exception as exc:  # ORT, LiteRT and TensorFlow raise their own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        seen = "; ".join(f"input {name!r} ({value.dtype}) holds {value.min()}..{value.max()}"
                         for name, value in evaluation.inputs.items() if value.size)
        raise DataError(f"the source model fails on the evaluation data ({seen}): {first}",
                        hint="give data the model takes: integer ids within its vocabulary, "
                             "values in the range it was trained on") from exc


def _enough_for_the_batch(source: SourceModel,
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


def _check_finite_outputs(source: SourceModel, outputs: list[Array], data: str) -> None:
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


def _check_batch_first(source: SourceModel) -> None:
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


def _check_output(config: ConvertConfig) -> None:
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


def _check_not_an_input(config: ConvertConfig) -> None:
    """``-o`` is none of the files the conversion reads (compared as resolved paths)."""
    target = config.output.resolve()
    inputs = [("the source model", config.model), ("the signing key (--sign-key)",
                                                   config.sign_key),
              ("the --calibration data", config.calibration), ("the --eval data", config.eval)]
    for what, path in inputs:
        if path is not None and path.resolve() == target:
            raise DataError(f"-o {config.output} is {what}: writing the bundle would replace it",
                            hint="write the bundle to a new file of its own, e.g. -o "
                                 f"{config.output.parent / (config.model.stem + '-int8.efb')}")


def _labelled(source: SourceModel, outputs: list[Array], labels: Array | None) -> int:
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


def _quantized_source(source: SourceModel) -> bool:
    from edgefleet.converter.tflite_graph import quantized_weights

    return source.kind == "tflite" and quantized_weights(source.path.read_bytes())


def _output_kinds(config: ConvertConfig, source: SourceModel, outputs: list[Array],
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


def _with_shapes(source: SourceModel, config: ConvertConfig) -> SourceModel:
    fixed = shapes.fix_inputs(source.inputs, config.input_shapes, config.input_size)
    _tflite_needs_static(source, fixed, config)
    return source if fixed == source.inputs else replace(source, inputs=fixed)


def _tflite_needs_static(source: SourceModel, fixed: list[TensorInfo],
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


def _size_warnings(source: SourceModel, config: ConvertConfig) -> list[str]:
    """A dynamic image input fed an image folder: say what size the images became."""
    dynamic = shapes.dynamic_image_inputs(source.inputs)
    folders = [p for p in (config.calibration, config.eval) if p is not None and p.is_dir()]
    if not dynamic or not folders:
        return []
    return [f"input {dynamic[0]!r} has a dynamic height or width: images were resized to "
            f"{DYNAMIC_SIDE}x{DYNAMIC_SIDE}; pass --input-size HEIGHTxWIDTH (or --input-shape) "
            "to calibrate and evaluate at the deployment size"]


def _few_samples(calibration: Dataset | None, config: ConvertConfig) -> list[str]:
    """Calibration of a few samples: ranges fitted to them clip what the others hold."""
    if calibration is None or config.quantize not in CALIBRATED or \
            len(calibration) >= MIN_CALIBRATION:
        return []
    return [f"calibration has {len(calibration)} sample{'s' if len(calibration) > 1 else ''}: "
            "quantization ranges fitted to so few miss the values other inputs reach, and "
            f"int8 loses accuracy; give {MIN_CALIBRATION} or more typical inputs "
            "(--calibration)"]


def _float_conversion(ctx: _Context) -> Predict:
    """The float conversion on the host: what a quantized result must beat."""
    ctx.step("measuring the float conversion")
    runtime = load_runtime(_build(ctx, Candidate("none", "none")), ctx.config.format)
    return _predict(runtime, ctx.source.inputs)


def _pruned(ctx: _Context, target: float) -> SourceModel:
    """Prune to ``target`` (fine-tuned when data is given), else the sparsest within budget."""
    cfg, source = ctx.config, ctx.source
    if source.kind != "keras":
        raise UnsupportedPathError(f"pruning needs a Keras model, got {source.kind}",
                                   hint="prune before exporting, or drop --prune")
    tune = _load(cfg.fine_tune_data, source, cfg)
    levels = [target] if tune is not None else [target * f for f in (1.0, 0.75, 0.5, 0.25)]
    pruned: SourceModel | None = None
    for level in levels:
        ctx.step(f"pruning to {level:.0%} sparsity" + (" and fine-tuning" if tune else ""))
        result = prune.prune_keras(source.handle, level, tune, cfg.fine_tune_epochs,
                                   lambda e, n, loss: ctx.step(f"fine-tuning (loss {loss:.4f})",
                                                               e, n))
        pruned = keras_source(source.path, source.inputs, result.model)
        drop = _pruned_drop(ctx, pruned)
        ctx.report.pruning = {**result.as_dict(), "target": target, "drop_points": drop}
        if drop <= cfg.budget_points:
            break
    assert pruned is not None
    return pruned


def _pruned_drop(ctx: _Context, pruned: SourceModel) -> float:
    outputs = run_batched(pruned.predict, ctx.evaluation, batch_size(pruned.inputs))
    labels, base = ctx.evaluation.labels, ctx.report.source_accuracy
    if labels is not None and base is not None:
        return round((base - accuracy(outputs, labels, ctx.labelled)) * 100, 4)
    return agreement_drop(agreement(ctx.source_outputs, outputs, pruned.output_names,
                                    ctx.kinds))


def _load(path: Path | None, source: SourceModel, config: ConvertConfig) -> Dataset | None:
    return load_dataset(path, source.inputs, config.scale) if path else None


def _synthetic(source: SourceModel) -> Dataset:
    rng = np.random.default_rng(0)
    inputs = {i.name: rng.random([64, *[d if d > 0 else 1 for d in i.shape[1:]]])
              .astype(i.dtype) for i in source.inputs}
    return Dataset(inputs)


def _check_mode(kind: str, mode: str) -> None:
    if mode in TFLITE_SOURCE_ONLY and kind != "tflite":
        raise UnsupportedPathError(
            f"--quantize {mode} is an ai-edge-quantizer recipe for float .tflite sources",
            hint="use int8, dynamic, fp16 or auto for this source")


def _check_path(kind: str, fmt: str) -> None:
    not_offered = {("onnx", "tflite"): "ONNX -> TFLite needs onnx2tf and TensorFlow op coverage "
                   "that edgefleet does not vouch for; export TFLite from the original framework",
                   ("tflite", "onnx"): "TFLite -> ONNX converters are unmaintained; convert the "
                   "original model with --format onnx"}
    if (kind, fmt) in not_offered:
        raise UnsupportedPathError(f"{kind} -> {fmt} is not offered",
                                   hint=not_offered[(kind, fmt)])


def _candidates(ctx: _Context) -> Iterator[Candidate]:
    cfg = ctx.config
    if cfg.quantize == "auto" and ctx.report.source_quantized:
        ctx.report.warnings.append(f"{QUANTIZED_SOURCE}: packaged as it is")
        yield Candidate("none", "none")
        return
    if cfg.quantize != "auto":
        yield Candidate(cfg.quantize, cfg.quantize, method=cfg.calibration_method,
                        activations=cfg.activations)
        return
    search = Search(ctx.source.kind, cfg.format, ctx.report.attempts,
                    lambda base: _ranking(ctx, base), cfg.search_budget)
    yield from auto_candidates(search)
    if search.stopped:
        ctx.report.warnings.append(search.stopped)
    ctx.report.warnings.extend(search.notes)


def _attempt(ctx: _Context, candidate: Candidate) -> tuple[Attempt, bytes | None]:
    ctx.step(f"converting: {candidate.label}")
    attempt = Attempt(candidate.label, candidate.mode, list(candidate.keep_float),
                      recipe=_recipe_name(ctx, candidate))
    try:
        artifact = _named_outputs(ctx, _build(ctx, candidate))
        attempt.kept_source = ctx.source.kind in ("onnx", "tflite") and \
            artifact == ctx.source.path.read_bytes()
        ctx.step(f"measuring: {candidate.label}")
        _measure(ctx, attempt, artifact)
    except (EdgefleetError, ValueError) as exc:  # conversion, or the result does not load
        # or run (LiteRT's set_tensor raises a bare ValueError on a dtype it does not take)
        attempt.verdict, attempt.reason = Verdict.FAILED, f"failed: {_message(exc)}"
        attempt.hint = getattr(exc, "hint", None) or ""
        return attempt, None
    _judge(ctx, attempt)
    return attempt, artifact


def _named_outputs(ctx: _Context, artifact: bytes) -> bytes:
    """The artifact's outputs in the source's order and under its names: which is which
    is measured on one call when there are several (a converter may reorder them)."""
    names, fmt = ctx.source.output_names, ctx.config.format
    if fmt == "tflite":  # one tensor returned twice: two outputs of one name otherwise
        from edgefleet.converter.tflite_graph import split_shared_outputs

        artifact = split_shared_outputs(artifact)
    order = None
    if len(names) > 1:
        try:
            predict = _predict(load_runtime(artifact, fmt), ctx.source.inputs)
            sample = _one_call(ctx.evaluation, ctx.source.inputs)
            rows = len(next(iter(sample.values())))
            order = output_order([o[:rows] for o in ctx.source_outputs], predict(sample))
        except (EdgefleetError, ValueError, RuntimeError):  # _measure says why it fails
            return artifact
    return rename_outputs(artifact, fmt, names, order)


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", exc))


def _ranking(ctx: _Context, base: Candidate) -> list[str]:
    """Operators of the model, the one whose quantization in ``base`` loses most first."""
    # measured where it is judged: an output clipped to the calibration range only shows
    # its error on the evaluation data (the calibration data when there is no --eval)
    data = ctx.evaluation.take(16)
    ctx.step(f"measuring per-operator error of {base.label}")
    quantized = ctx.built.get(base.label)
    try:
        if ctx.config.format == "onnx" and quantized is not None:
            return onnx_backend.sensitive_onnx_nodes(_float_onnx(ctx), data, quantized)
        if ctx.source.kind == "tflite" and quantized is not None:
            from edgefleet.converter import litert_quantizer, sensitivity

            prepared = litert_quantizer.prepare(ctx.source.path.read_bytes())
            return sensitivity.tflite_ranking(prepared, quantized, data)
        if ctx.config.format == "tflite":
            return tflite_backend.sensitive_nodes(ctx.source, data, count=1 << 16)
    except EdgefleetError as exc:  # no ranking: the mixed stage is skipped, and says why
        ctx.report.warnings.append(f"per-operator error not measured: {exc}")
    return []


def _recipe_name(ctx: _Context, candidate: Candidate) -> str:
    """The backend recipe behind a candidate, as the report names it."""
    if ctx.report.source_quantized and candidate.mode != "none":
        return "nothing to quantize (the source is quantized already)"
    if ctx.source.kind == "tflite":
        names = {"int8": "static_wi8_ai8", "int8-a16": "static_wi8_ai16",
                 "weight-only": "weight_only_wi8_afp32", "dynamic": "dynamic_wi8_afp32",
                 "fp16": "float16 (kept)" if _stores_float16(ctx) else "float_casting fp16"}
        return names.get(candidate.mode, candidate.mode)
    if ctx.config.format == "onnx" and candidate.mode == "int8":
        return (f"QDQ per-channel, {candidate.activations} activations, "
                f"{candidate.method} calibration")
    return candidate.mode


def _stores_float16(ctx: _Context) -> bool:
    from edgefleet.converter import litert_quantizer

    return litert_quantizer.stores_float16(ctx.source.path.read_bytes())


def _float_onnx(ctx: _Context) -> bytes:
    if ctx.source.kind == "onnx":
        return shapes.static_onnx(ctx.source.path.read_bytes(), ctx.source.inputs)
    return shapes.static_onnx(onnx_backend.export_onnx(ctx.source), ctx.source.inputs)


def _build(ctx: _Context, candidate: Candidate) -> bytes:
    cfg, source = ctx.config, ctx.source

    def calibrate(done: int, total: int) -> None:
        ctx.step(f"calibrating {candidate.label}", done, total)

    if cfg.format == "tflite" and source.kind in ("keras", "savedmodel"):
        return tflite_backend.to_tflite(source, candidate.mode, ctx.calibration, cfg.int8_io,
                                        candidate.keep_float, on_sample=calibrate)
    if cfg.format == "tflite" and source.kind == "tflite":
        from edgefleet.converter import litert_quantizer

        quantized: bytes = litert_quantizer.quantize_tflite(
            source.path.read_bytes(), candidate.mode, ctx.calibration, candidate.keep_float,
            int8_io=cfg.int8_io)
        return quantized
    return onnx_backend.quantize_onnx(_float_onnx(ctx), candidate.mode, ctx.calibration,
                                      candidate.keep_float, on_sample=calibrate,
                                      method=candidate.method, activations=candidate.activations)


def _measure(ctx: _Context, attempt: Attempt, artifact: bytes) -> None:
    """Load and run the result on the device runtime (what cannot, is a failed row), and
    measure it."""
    try:
        runtime = load_runtime(artifact, ctx.config.format)
        predict = _predict(runtime, ctx.source.inputs)
        outputs = run_batched(predict, ctx.evaluation, batch_size(runtime.inputs),
                              on_batch=lambda d, t: ctx.step(f"evaluating {attempt.label}",
                                                             d, t))
    except (EdgefleetError, ValueError, RuntimeError) as exc:  # LiteRT raises bare ones
        name = "LiteRT" if ctx.config.format == "tflite" else "ONNX Runtime"
        raise result_refused(attempt.label, attempt.recipe, name, exc) from exc
    attempt.size_bytes = len(artifact)
    attempt.gzip_bytes = len(gzip.compress(artifact, compresslevel=9))
    found = agreement(ctx.source_outputs, outputs, ctx.source.output_names, ctx.kinds)
    attempt.agreement = found.as_dict()
    labels = ctx.evaluation.labels
    if labels is not None:
        attempt.accuracy = round(accuracy(outputs, labels, ctx.labelled), 6)
    attempt.accuracy_drop_points = _drop(ctx, attempt, found)
    attempt.latency_p50_ms = latency_p50_ms(predict,
                                            _one_call(ctx.evaluation, runtime.inputs))
    info = inspect_model(artifact, ctx.config.format)
    attempt.ops, attempt.dtypes = dict(info.ops), sorted(info.dtypes)
    attempt.float_ops = _float_ops(ctx, attempt, artifact)
    attempt.violations = [_with_float_ops(v.as_dict(), attempt.float_ops) for p in ctx.profiles
                          for v in check_model(p, _probe_manifest(ctx, runtime, info), info,
                                               len(artifact))]
    _never_slower(ctx, attempt, predict)


def _float_ops(ctx: _Context, attempt: Attempt, artifact: bytes) -> list[str]:
    """Operators a full-integer TFLite result computes in float."""
    if ctx.config.format != "tflite" or attempt.mode != "int8":
        return []
    from edgefleet.converter.tflite_graph import float_ops

    return float_ops(artifact)


def _with_float_ops(violation: dict[str, Any], ops: list[str]) -> dict[str, Any]:
    """A tensor-type violation of an int8 result names the operators left in float."""
    if violation["kind"] != "dtype" or not ops or "float" not in violation["message"]:
        return violation
    return {**violation, "message": f"{violation['message']}; {', '.join(ops)} computes in "
                                    "float in this result"}


def _drop(ctx: _Context, attempt: Attempt, found: Agreement) -> float:
    """Accuracy points lost: with labels, the accuracy lost or ``100 x (1 - score)`` of the
    worst output, whichever is more (labels judge one output; every output must still
    agree with the source's); else from the worst output's score (and top-1 agreement for
    classifiers)."""
    if attempt.accuracy is not None and ctx.report.source_accuracy is not None:
        return round(max((ctx.report.source_accuracy - attempt.accuracy) * 100,
                         _worst_drop(found)), 4)
    return agreement_drop(found)


def _worst_drop(found: Agreement) -> float:
    """``100 x (1 - score)`` of the worst output (infinite when the score is not finite)."""
    score = found.worst.score
    return (1 - score) * 100 if math.isfinite(score) else math.inf


def agreement_drop(found: Agreement) -> float:
    """``100 x (1 - score)`` of the worst output, or of top-1 agreement when lower."""
    scores = [found.worst.score] + ([found.top1] if found.top1 is not None else [])
    return round((1 - min(scores)) * 100, 4)


def _never_slower(ctx: _Context, attempt: Attempt, predict: Predict) -> None:
    """Warn when a result is slower than what it replaces: the source when that runs on an
    edge runtime (ONNX, TFLite), else the float conversion to the same format.

    Both are measured in rounds that alternate between the two (a shared host drifts
    between measurements taken apart, either way); the result is called slower only
    beyond :data:`SLOWER_MARGIN`.
    """
    float_ms = ctx.report.float_latency_p50_ms
    reference = float_ms if float_ms is not None else ctx.report.source_latency_p50_ms
    what = "the float conversion" if float_ms is not None else "its source"
    if ctx.reference is not None:
        ctx.step(f"timing {attempt.label} against {what}")
        attempt.latency_p50_ms, reference = _alternating(predict, ctx.reference,
                                                         _one_call(ctx.evaluation,
                                                                   ctx.source.inputs))
    attempt.reference_latency_p50_ms = reference
    if attempt.latency_p50_ms is None or reference is None:
        return
    if not is_slower(attempt.latency_p50_ms, reference):
        return
    message = (f"converted model is slower than {what} on this host "
               f"({attempt.latency_p50_ms} ms vs {reference} ms at p50, "
               f"{attempt.latency_p50_ms / reference:.2f}x)")
    attempt.warnings.append(message)
    for profile in ctx.profiles:
        if profile.never_slower:
            attempt.violations.append({"kind": "slower", "message": f"{profile.name}: {message}",
                                       "nodes": []})


def _one_call(data: Dataset, inputs: Sequence[TensorInfo]) -> dict[str, Array]:
    """The inputs of one call for latency: one sample, or the model's fixed batch (a model
    exported with batch 3 refuses one row)."""
    return data.take(fixed_batch(inputs) or 1).inputs


def is_slower(latency_ms: float, reference_ms: float) -> bool:
    """Slower beyond the measurement margin (:data:`SLOWER_MARGIN`)."""
    return latency_ms > reference_ms * (1 + SLOWER_MARGIN)


def _alternating(predict: Predict, reference: Predict, sample: dict[str, Array],
                 rounds: int = 3) -> tuple[float, float]:
    """Best p50 of each over ``rounds`` rounds that alternate between the two."""
    mine, theirs = [], []
    for _ in range(rounds):
        mine.append(latency_p50_ms(predict, sample))
        theirs.append(latency_p50_ms(reference, sample))
    return min(mine), min(theirs)


def _judge(ctx: _Context, attempt: Attempt) -> None:
    budget = ctx.config.budget_points
    drop = attempt.accuracy_drop_points or 0.0
    if not math.isfinite(drop) or not _finite(attempt.agreement.get("worst_score", 1.0)):
        attempt.verdict = Verdict.NOT_FINITE
        attempt.reason = ("its outputs are not finite numbers (NaN or infinity) where they "
                          "should agree with the source's: values overflow this recipe")
        return
    source_bytes = ctx.source.size_bytes if ctx.source.kind in ("onnx", "tflite") else None
    if attempt.mode != "none" and ctx.report.source_quantized:
        attempt.verdict = Verdict.NOT_SMALLER
        attempt.reason = (f"{attempt.mode} did not make the model smaller: {QUANTIZED_SOURCE}, "
                          f"{attempt.mode} finds nothing left to quantize (the result is the "
                          "source unchanged)")
        attempt.hint = ("package it as it is with --quantize none, or convert the float model "
                        "it was made from")
    elif attempt.mode != "none" and source_bytes and (attempt.size_bytes or 0) >= source_bytes \
            and not attempt.kept_source:
        attempt.verdict = Verdict.NOT_SMALLER
        attempt.reason = (f"{attempt.mode} did not make the model smaller ({attempt.size_bytes} "
                          f"bytes, source {source_bytes}): nothing it quantizes was found, or the "
                          "source keeps its weights as small already (float16, sparse)")
    elif drop > budget:
        attempt.verdict = Verdict.OVER_BUDGET
        attempt.reason = _over_budget(ctx, attempt, drop, budget)
    elif attempt.violations:
        attempt.verdict = Verdict.OFF_TARGET
        attempt.reason = "; ".join(v["message"] for v in attempt.violations[:3])
    else:
        attempt.verdict, attempt.accepted = Verdict.ACCEPTED, True
        attempt.reason = "within budget and targets"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _over_budget(ctx: _Context, attempt: Attempt, drop: float, budget: float) -> str:
    default = " (the default: --max-drop sets it)" if ctx.config.max_drop is None else ""
    worst = f"; worst {attempt.agreement['worst']}"
    score = attempt.agreement.get("worst_score", 1.0)
    top1 = attempt.agreement.get("top1")
    which = f"output {attempt.agreement.get('worst_output')!r} agreement"
    if attempt.accuracy is not None and ctx.report.source_accuracy is not None:
        lost = (ctx.report.source_accuracy - attempt.accuracy) * 100
        which = "accuracy lost on the labels" if lost >= (1 - score) * 100 else which
        worst = (f"; labels: {lost:.2f} points of accuracy lost, worst output scores "
                 f"{score:.4f}{worst}")
    elif top1 is not None and top1 < score:
        which = "top-1 agreement"
    return (f"accuracy drop {points_above(drop, budget)} points exceeds the budget of "
            f"{budget} points"
            f"{default} (points are the worst of accuracy and output agreement: here "
            f"{which}){worst}{_top1_cause(ctx, attempt)}")


def points_above(drop: float, budget: float) -> str:
    """``drop`` with 2 decimals, or as many more as it takes to read above ``budget`` (a drop
    of 1.0004 over a budget of 1 read "1.00 points exceeds the budget of 1.0")."""
    for places in range(2, 7):
        text = f"{drop:.{places}f}"
        if float(text) > budget:
            return text
    return f"{drop!r}"


def _top1_cause(ctx: _Context, attempt: Attempt) -> str:
    """When top-1 agreement set the drop: on which output, and the rule that made it a
    classifier's (``--output-kind NAME=regression`` overrides it)."""
    top1, score = attempt.agreement.get("top1"), attempt.agreement.get("worst_score", 1.0)
    if attempt.accuracy is not None or top1 is None or top1 >= score:
        return ""
    kind = next(k for k in ctx.kinds if k.kind == CLASS)
    return (f"; top-1 agreement {top1:.4f} on {kind.name!r}, judged a classifier's "
            f"({kind.rule}; --output-kind {kind.name}=regression if it is not)")


def _min_runtime(fmt: str, info: ModelInfo) -> str:
    if fmt == "tflite":
        return info.min_runtime_version or "0"
    return ONNX_RUNTIME_FOR_OPSET.get(info.opset or 0, "0")


def _probe_manifest(ctx: _Context, runtime: Runtime, info: ModelInfo) -> Manifest:
    return Manifest(schema_version=1, name=ctx.config.model_name, version=ctx.config.version,
                    created="", format=ctx.config.format,
                    runtime=RuntimeRequirement(name="litert" if ctx.config.format == "tflite"
                                               else "onnxruntime",
                                               min_version=_min_runtime(ctx.config.format, info)),
                    inputs=[tensor_spec(t) for t in runtime.inputs],
                    outputs=[tensor_spec(t) for t in runtime.outputs], files={})


def _reference_data(ctx: _Context, runtime: Runtime) -> dict[str, Any]:
    """The drift reference's data: the evaluation set (or the calibration set it fell back
    to), as the converted model takes it; none when the data was synthetic."""
    cfg = ctx.config
    if cfg.eval is None and cfg.calibration is None:
        return {"reference_inputs": {}}
    feeds = {t.name: quantize_input(ctx.evaluation.inputs[name], t)
             for name, t in input_map(ctx.source.inputs, runtime.inputs).items()}
    return {"reference_inputs": feeds,
            "reference_source": "eval" if cfg.eval is not None else "calibration"}


def _health_inputs(ctx: _Context, runtime: Runtime, model_bytes: int) -> dict[str, Array]:
    """The health check's inputs: up to :data:`HEALTH_ROWS` rows, as many as fit in
    :func:`health_budget` with their outputs (one at least, or the model's fixed batch)."""
    feeds = {t.name: quantize_input(ctx.evaluation.inputs[name][:HEALTH_ROWS], t)
             for name, t in input_map(ctx.source.inputs, runtime.inputs).items()}
    per_row = sum(v[:1].nbytes for v in feeds.values()) + \
        sum(o[:1].astype(np.float32).nbytes for o in ctx.source_outputs)
    rows = max(1, fixed_batch(runtime.inputs) or 1,
               min(HEALTH_ROWS, health_budget(model_bytes) // max(per_row, 1)))
    return {name: value[:rows] for name, value in feeds.items()}


def health_budget(model_bytes: int) -> int:
    """Bytes the health data may take in a bundle: a tenth of the model, at least 64 KiB."""
    return max(HEALTH_MIN_BYTES, model_bytes // 10)


def _quantization_label(ctx: _Context, chosen: Attempt) -> str:
    """What the bundle says of its quantization: the recipe's label, or that the source's
    own quantization was kept."""
    return "source (quantized already)" if ctx.report.source_quantized else chosen.label


def _package(ctx: _Context, chosen: Attempt, artifact: bytes) -> None:
    cfg = ctx.config
    info = inspect_model(artifact, cfg.format)
    runtime = load_runtime(artifact, cfg.format)
    health = _health_inputs(ctx, runtime, len(artifact))
    spec = PackageSpec(
        cfg.model_name, cfg.version, health,
        task="classification" if ctx.kinds and ctx.kinds[0].kind == CLASS else "other",
        optimization=Optimization(quantization=_quantization_label(ctx, chosen),
                                  sparsity=float(ctx.report.pruning.get("sparsity", 0.0))),
        metrics=ctx.report.metrics(), targets=tuple(p.name for p in ctx.profiles),
        min_runtime_version=_min_runtime(cfg.format, info),
        atol=HEALTH_ATOL.get(chosen.mode, 2e-2),
        lineage=lineage_of(cfg, ctx.report.source_kind), encrypt_for=ctx.recipients,
        **_reference_data(ctx, runtime))
    package_bytes(artifact, cfg.format, cfg.output, spec, SigningKey.load(cfg.sign_key))
    ctx.report.output = str(cfg.output)
    ctx.report.encrypted_for = sorted({r.key_id for r in ctx.recipients})
    ctx.report.bundle_bytes = cfg.output.stat().st_size
