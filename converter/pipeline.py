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
- ONNX -> tflite and TFLite -> onnx are not offered
  (:func:`edgefleet.converter.checks.check_path`).

The stages live in their own modules: the checks made up front (:mod:`.checks`), one
candidate built, measured and judged (:mod:`.attempt`, :mod:`.judge`, :mod:`.slower`),
and the bundle of the chosen one (:mod:`.bundle`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgefleet.agent.protocol.encryption import RecipientKey
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.signing import SigningKey
from edgefleet.agent.runtime.base import Array
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter import onnx_backend, prune, shapes, tflite_backend
from edgefleet.converter.advice import failure
from edgefleet.converter.attempt import build, float_onnx, try_candidate
from edgefleet.converter.bundle import write_bundle
from edgefleet.converter.checks import (
    check_batch_first,
    check_finite_outputs,
    check_mode,
    check_numeric_results,
    check_output,
    check_path,
    checked_output_kinds,
    enough_for_the_batch,
    few_samples,
    labelled_index,
    size_warnings,
    tflite_needs_static,
)
from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.context import Context, Step
from edgefleet.converter.data import DYNAMIC_SIDE, Dataset, load_dataset
from edgefleet.converter.errors import (
    ConversionFailedError,
    DataError,
    NoResultError,
    UnsupportedPathError,
)
from edgefleet.converter.evaluate import (
    Predict,
    accuracy,
    agreement,
    batch_size,
    latency_p50_ms,
    run_batched,
)
from edgefleet.converter.failures import first_lines, out_of_memory
from edgefleet.converter.floatio import float_predict as _predict
from edgefleet.converter.judge import agreement_drop
from edgefleet.converter.quantized_source import quantized_source
from edgefleet.converter.report import ConversionReport
from edgefleet.converter.search import Candidate, Search, auto_candidates, choose
from edgefleet.converter.slower import one_call
from edgefleet.converter.sources import SourceModel, keras_source, load_source
from edgefleet.devices import load_profile

__all__ = ["Step", "convert"]


def _no_progress(text: str, done: int | None = None, total: int | None = None) -> None:
    return None


def convert(config: ConvertConfig, step: Step = _no_progress) -> ConversionReport:
    """Convert, measure and package; raise :class:`NoResultError` when nothing passes."""
    started = time.perf_counter()
    step("loading the source model")
    ctx = _context(config, step)
    built = ctx.built
    for number, candidate in enumerate(_candidates(ctx), start=1):
        ctx.step = _numbered(step, number)  # every stage of candidate n reads "[n] ..."
        attempt, artifact = try_candidate(ctx, candidate)
        ctx.report.attempts.append(attempt)
        if artifact is not None:
            built[attempt.label] = artifact
    ctx.step = step
    chosen = choose(ctx.report.attempts)
    ctx.report.conversion_seconds = round(time.perf_counter() - started, 2)
    if chosen is None:
        raise NoResultError(failure(ctx.report, ctx.config), ctx.report)
    ctx.report.chosen = chosen.label
    ctx.report.warnings.extend(_float_io_kept(config, chosen.label, built[chosen.label]))
    step("writing the signed bundle")
    try:
        write_bundle(ctx, chosen, built[chosen.label])
    except EdgefleetError:
        raise
    except Exception as exc:  # the runtime's own types, running the health inputs
        raise ConversionFailedError(
            "writing the bundle failed running the model on its health inputs"
            + (" (out of memory)" if out_of_memory(exc) else "") + f": {first_lines(exc)}",
            hint="give a smaller --input-size / --input-shape" if out_of_memory(exc) else
            "see the report; the chosen result ran during the conversion") from exc
    ctx.report.conversion_seconds = round(time.perf_counter() - started, 2)
    return ctx.report


def _float_io_kept(config: ConvertConfig, label: str, artifact: bytes) -> list[str]:
    """``--int8-io`` asked for, and the chosen result has float inputs or outputs (``auto``
    chose a recipe other than full int8): said, never silently ignored."""
    if not config.int8_io or config.format != "tflite":
        return []
    from edgefleet.converter.tflite_graph import float_io

    floats = float_io(artifact)
    if not floats:
        return []
    return [f"--int8-io: the chosen result {label} has float inputs/outputs "
            f"({', '.join(floats[:6])}): only a full-integer int8 result takes and gives int8; "
            "--quantize int8 --int8-io makes one (or says why it cannot)"]


def _numbered(step: Step, number: int) -> Step:
    def numbered(text: str, done: int | None = None, total: int | None = None) -> None:
        step(f"[{number}] {text}", done, total)

    return numbered


def _context(config: ConvertConfig, step: Step) -> Context:
    check_output(config)  # fail before converting, not after
    key = SigningKey.load(config.sign_key)  # the keys too: a wrong path fails at once
    recipients = tuple(RecipientKey.load(p) for p in config.encrypt_for)
    source = _with_shapes(load_source(config.model), config)
    check_batch_first(source)
    check_path(source.kind, config.format)
    check_mode(source.kind, config.quantize)
    calibration = _load(config.calibration, source, config, config.calibration_samples)
    evaluation = _load(config.eval, source, config) or calibration
    enough_for_the_batch(source, ((config.calibration, calibration), (config.eval, evaluation)))
    report = ConversionReport(str(config.model), source.kind, config.format, config.quantize,
                              source.size_bytes, budget_points=config.budget_points,
                              input_shapes={i.name: list(i.shape) for i in source.inputs})
    report.warnings.extend(size_warnings(source, config) + few_samples(calibration, config))
    quantized = quantized_source(source)
    report.source_quantized = bool(quantized)
    if evaluation is None:
        evaluation = _synthetic(source)
        sized = {i.name: [n, *_synthetic_dims(i.shape)] for i in source.inputs
                 for n in [len(evaluation)] if any(d < 0 for d in i.shape[1:])}
        report.warnings.append(f"no --eval or --calibration data: agreement measured on "
                               f"{len(evaluation)} uniform random inputs, accuracy not "
                               "measured" + (f" (dynamic dims given sizes: {sized}; pass "
                                             "--input-size or --input-shape for the "
                                             "deployment size)" if sized else ""))
        report.eval_data = "random"
    else:
        report.eval_data = str(config.eval or config.calibration)
    report.eval_samples = len(evaluation)
    check_numeric_results(source, one_call(evaluation, source.inputs))
    outputs = _source_outputs(source, evaluation, step)
    check_finite_outputs(source, outputs, "evaluation" if config.eval else
                         "calibration" if config.calibration else "random")
    if calibration is not None and calibration is not evaluation:
        check_finite_outputs(source, _source_outputs(source, calibration, step), "calibration")
    kinds = checked_output_kinds(config, source, outputs, evaluation.labels is not None)
    report.output_kinds = [k.as_dict() for k in kinds]
    labelled = labelled_index(source, outputs, evaluation.labels)
    if evaluation.labels is not None:
        report.source_accuracy = round(accuracy(outputs, evaluation.labels, labelled), 6)
    report.source_latency_p50_ms = latency_p50_ms(source.predict,
                                                  one_call(evaluation, source.inputs))
    profiles = [load_profile(t) for t in config.targets]
    ctx = Context(config, source, calibration, evaluation, outputs, profiles, report, step,
                  key, recipients, kinds=kinds, labelled=labelled, quantized=quantized)
    if config.prune:
        ctx.source = _pruned(ctx, config.prune)
        if evaluation.labels is not None:  # labels judge the pruning (accuracy lost in all);
            # the outputs of what is converted judge the conversion's worst output
            ctx.source_outputs = run_batched(ctx.source.predict, evaluation,
                                             batch_size(ctx.source.inputs, evaluation))
    # a Keras or SavedModel source runs on TensorFlow, not an edge runtime: no rival
    ctx.reference = source.predict if source.kind in ("onnx", "tflite") else None
    if source.kind in ("keras", "savedmodel") and config.quantize != "none":
        ctx.reference = _float_conversion(ctx)
        report.float_latency_p50_ms = latency_p50_ms(ctx.reference,
                                                     one_call(evaluation, source.inputs))
    return ctx


def _source_outputs(source: SourceModel, evaluation: Dataset, step: Step) -> list[Array]:
    """The source's outputs on the evaluation data; data the source itself cannot run
    (token ids beyond its vocabulary, say) is refused naming the inputs and their values."""
    try:
        return run_batched(source.predict, evaluation, batch_size(source.inputs, evaluation),
                           on_batch=lambda d, t: step("evaluating the source model", d, t))
    except EdgefleetError:
        raise
    except Exception as exc:  # ORT, LiteRT and TensorFlow raise their own types
        first = first_lines(exc, count=2)  # Keras: "Exception encountered when calling ..."
        if out_of_memory(exc):
            shapes = ", ".join(f"{n} {list(v.shape[1:])}" for n, v in evaluation.inputs.items())
            raise DataError(f"the source model runs out of memory on inputs of {shapes} "
                            f"a sample: {first}",
                            hint="give a smaller --input-size / --input-shape") from exc
        seen = "; ".join(f"input {name!r} ({value.dtype}) holds {value.min()}..{value.max()}"
                         for name, value in evaluation.inputs.items() if value.size)
        raise DataError(f"the source model fails on the evaluation data ({seen}): {first}",
                        hint="give data the model takes: integer ids within its vocabulary, "
                             "values in the range it was trained on") from exc


def _with_shapes(source: SourceModel, config: ConvertConfig) -> SourceModel:
    fixed = shapes.fix_inputs(source.inputs, config.input_shapes, config.input_size)
    tflite_needs_static(source, fixed, config)
    return source if fixed == source.inputs else replace(source, inputs=fixed)


def _float_conversion(ctx: Context) -> Predict:
    """The float conversion on the host: what a quantized result must beat."""
    ctx.step("measuring the float conversion")
    runtime = load_runtime(build(ctx, Candidate("none", "none")), ctx.config.format)
    return _predict(runtime, ctx.source.inputs)


def _pruned(ctx: Context, target: float) -> SourceModel:
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


def _pruned_drop(ctx: Context, pruned: SourceModel) -> float:
    outputs = run_batched(pruned.predict, ctx.evaluation,
                          batch_size(pruned.inputs, ctx.evaluation))
    labels, base = ctx.evaluation.labels, ctx.report.source_accuracy
    if labels is not None and base is not None:
        return round((base - accuracy(outputs, labels, ctx.labelled)) * 100, 4)
    return agreement_drop(agreement(ctx.source_outputs, outputs, pruned.output_names,
                                    ctx.kinds))


def _load(path: Path | None, source: SourceModel, config: ConvertConfig,
          limit: int | None = None) -> Dataset | None:
    if path is None:
        return None
    try:
        return load_dataset(path, source.inputs, config.scale, limit)
    except MemoryError as exc:  # the data's own size, not the model's inputs
        raise DataError(f"reading {path} ran out of memory", hint="give a file of fewer or smaller "
                        "samples (calibration reads the first 200)") from exc


SYNTHETIC_ROWS = 64
SYNTHETIC_BYTES = 256 << 20  # random inputs when no data is given: fewer rows for large ones


def _synthetic(source: SourceModel) -> Dataset:
    """Uniform random inputs, drawn in float32 (not float64) and at most
    :data:`SYNTHETIC_BYTES` of them (one row at least)."""
    rng = np.random.default_rng(0)
    shapes = {i.name: _synthetic_dims(i.shape) for i in source.inputs}
    per_row = sum(math.prod(shape) * max(np.dtype(i.dtype).itemsize, 4)
                  for i, shape in zip(source.inputs, shapes.values(), strict=True))
    rows = max(1, min(SYNTHETIC_ROWS, SYNTHETIC_BYTES // max(per_row, 1)))
    return Dataset({i.name: rng.random([rows, *shapes[i.name]], dtype=np.float32)
                    .astype(i.dtype, copy=False) for i in source.inputs})


def _synthetic_dims(shape: tuple[int, ...]) -> list[int]:
    """An input's dims after the batch for random inputs: an image input's (4 dims, its
    channels fixed) dynamic height and width at :data:`DYNAMIC_SIDE`, as for an image
    folder (at 1, two 3x3 convolutions failed on the source itself); other dynamic dims 1."""
    image = len(shape) == 4 and (shape[1] > 0 or shape[3] > 0)
    return [d if d > 0 else (DYNAMIC_SIDE if image else 1) for d in shape[1:]]


def _candidates(ctx: Context) -> Iterator[Candidate]:
    cfg = ctx.config
    if cfg.quantize == "auto" and ctx.report.source_quantized:
        ctx.report.warnings.append(f"{ctx.quantized}: packaged as it is")
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


def _ranking(ctx: Context, base: Candidate) -> list[str]:
    """Operators of the model, the one whose quantization in ``base`` loses most first."""
    # measured where it is judged: an output clipped to the calibration range only shows
    # its error on the evaluation data (the calibration data when there is no --eval)
    data = ctx.evaluation.take(16)
    ctx.step(f"measuring per-operator error of {base.label}")
    quantized = ctx.built.get(base.label)
    try:
        if ctx.config.format == "onnx" and quantized is not None:
            return onnx_backend.sensitive_onnx_nodes(float_onnx(ctx), data, quantized)
        if ctx.source.kind == "tflite" and quantized is not None:
            from edgefleet.converter import litert_quantizer, sensitivity

            prepared = litert_quantizer.prepare(ctx.source.path.read_bytes())
            return sensitivity.tflite_ranking(prepared, quantized, data)
        if ctx.config.format == "tflite":
            return tflite_backend.sensitive_nodes(ctx.source, data, count=1 << 16)
    except Exception as exc:  # LiteRT and ONNX Runtime raise their own types too: a ranking
        # that fails in any way skips the mixed stage, and the report says why (the search
        # goes on to fp16 and float)
        reason = exc.message if isinstance(exc, EdgefleetError) else \
            first_lines(exc)
        ctx.report.warnings.append(f"per-operator error not measured ({reason}): the mixed "
                                   "stage is skipped")
    return []
