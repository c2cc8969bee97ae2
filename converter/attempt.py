"""One candidate of a conversion: build it, load and measure it on the device runtime,
and judge it (a build or run that fails is a failed row, not a crash)."""

from __future__ import annotations

import gzip
from typing import Any

from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.runtime.inspect import inspect_model
from edgefleet.agent.runtime.select import load_runtime
from edgefleet.converter import onnx_backend, shapes, tflite_backend
from edgefleet.converter.bundle import probe_manifest
from edgefleet.converter.context import Context
from edgefleet.converter.errors import ConversionFailedError
from edgefleet.converter.evaluate import (
    accuracy,
    agreement,
    batch_size,
    latency_p50_ms,
    run_batched,
)
from edgefleet.converter.failures import (
    first_lines,
    onnx_graph_fault,
    out_of_memory,
    result_refused,
)
from edgefleet.converter.floatio import float_predict as _predict
from edgefleet.converter.judge import drop_points, judge
from edgefleet.converter.names import output_order, rename_inputs, rename_outputs
from edgefleet.converter.report import Attempt, Verdict
from edgefleet.converter.search import Candidate
from edgefleet.converter.slower import never_slower, one_call
from edgefleet.devices import check_model

__all__ = ["build", "float_onnx", "try_candidate"]


def try_candidate(ctx: Context, candidate: Candidate) -> tuple[Attempt, bytes | None]:
    ctx.step(f"converting: {candidate.label}")
    attempt = Attempt(candidate.label, candidate.mode, list(candidate.keep_float),
                      recipe=_recipe_name(ctx, candidate))
    try:
        artifact = _named_outputs(ctx, build(ctx, candidate))
        attempt.kept_source = ctx.source.kind in ("onnx", "tflite") and \
            artifact == ctx.source.model_bytes()
        ctx.step(f"measuring: {candidate.label}")
        _measure(ctx, attempt, artifact)
    except (EdgefleetError, ValueError) as exc:  # conversion, or the result does not load
        # or run (LiteRT's set_tensor raises a bare ValueError on a dtype it does not take)
        attempt.verdict, attempt.reason = Verdict.FAILED, f"failed: {_message(exc)}"
        attempt.hint = getattr(exc, "hint", None) or ""
        if isinstance(exc, ConversionFailedError):
            attempt.hint = _remaining(ctx, candidate, attempt.hint)
        return attempt, None
    except Exception as exc:  # a runtime's own exception types (ONNX Runtime's Fail,
        # RuntimeException: a kernel that refuses the size, memory running out): the
        # candidate failed, said as such, and the search goes on
        first = first_lines(exc, limit=200)
        memory = out_of_memory(exc)
        attempt.verdict = Verdict.FAILED
        attempt.reason = f"failed: {'out of memory: ' if memory else ''}{first}"
        attempt.hint = "give a smaller --input-size / --input-shape" if memory else \
            "the runtime could not run this result; another recipe may"
        return attempt, None
    judge(ctx, attempt)
    return attempt, artifact


def _named_outputs(ctx: Context, artifact: bytes) -> bytes:
    """The artifact's inputs and outputs in the source's order and under its names: inputs
    matched by name, outputs by what they hold, measured on one call when there are
    several (a converter may reorder them)."""
    names, fmt = ctx.source.output_names, ctx.config.format
    artifact = rename_inputs(artifact, fmt, [i.name for i in ctx.source.inputs])
    if fmt == "tflite":  # one tensor returned twice: two outputs of one name otherwise
        from edgefleet.converter.tflite_graph import split_shared_outputs

        artifact = split_shared_outputs(artifact)
    order = None
    if len(names) > 1:
        try:
            predict = _predict(load_runtime(artifact, fmt), ctx.source.inputs)
            sample = one_call(ctx.evaluation, ctx.source.inputs)
            rows = len(next(iter(sample.values())))
            order = output_order([o[:rows] for o in ctx.source_outputs], predict(sample))
        except (EdgefleetError, ValueError, RuntimeError):  # _measure says why it fails
            return artifact
    return rename_outputs(artifact, fmt, names, order)


def _remaining(ctx: Context, candidate: Candidate, hint: str) -> str:
    """A recipe that failed, asked for by name: what else there is. The float model when it
    works (the source loads and ran here; a Keras model's float conversion was built and
    measured before any recipe); another recipe only when the cause is not known (a
    known one, ``hint``, is the model's and holds for every recipe). ``auto`` tries them
    all itself: nothing added."""
    if ctx.config.quantize == "auto" or candidate.mode == "none":
        return hint
    none_works = ctx.source.kind in ("onnx", "tflite") or ctx.reference is not None
    float_model = ("the model as it is" if ctx.source.kind in ("onnx", "tflite") else
                   "its float32 conversion")
    options = [] if hint else ["another --quantize recipe may convert it (--quantize auto "
                               "measures each)"]
    if none_works:
        options.append(f"--quantize none packages {float_model}")
    return "; or ".join([hint, *options] if hint else options)


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", exc))


def _recipe_name(ctx: Context, candidate: Candidate) -> str:
    """The backend recipe behind a candidate, as the report names it."""
    if ctx.report.source_quantized and candidate.mode != "none":
        return "nothing to quantize (the source is quantized already)"
    if ctx.source.kind == "tflite":
        names = {"int8": "static_wi8_ai8", "int8-a16": "static_wi8_ai16",
                 "weight-only": "weight_only_wi8_afp32", "dynamic": "dynamic_wi8_afp32",
                 "fp16": "float16 (kept)" if _stores_float16(ctx) else "float_casting fp16"}
        return names.get(candidate.mode, candidate.mode)
    if ctx.source.kind == "onnx" and candidate.mode == "fp16" and \
            onnx_backend.stores_float16_onnx(ctx.source.path.read_bytes()):
        return "float16 (kept)"
    if ctx.config.format == "onnx" and candidate.mode == "int8":
        return (f"QDQ per-channel, {candidate.activations} activations, "
                f"{candidate.method} calibration")
    return candidate.mode


def _stores_float16(ctx: Context) -> bool:
    from edgefleet.converter import litert_quantizer

    return litert_quantizer.stores_float16(ctx.source.path.read_bytes())


def build(ctx: Context, candidate: Candidate) -> bytes:
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
    return onnx_backend.quantize_onnx(float_onnx(ctx), candidate.mode, ctx.calibration,
                                      candidate.keep_float, on_sample=calibrate,
                                      method=candidate.method, activations=candidate.activations)


def float_onnx(ctx: Context) -> bytes:
    if ctx.source.kind == "onnx":
        return shapes.static_onnx(ctx.source.model_bytes(), ctx.source.inputs)
    return shapes.static_onnx(onnx_backend.export_onnx(ctx.source), ctx.source.inputs)


def _measure(ctx: Context, attempt: Attempt, artifact: bytes) -> None:
    """Load and run the result on the device runtime (what cannot, is a failed row), and
    measure it."""
    try:
        # no arena: at large inputs it kept GBs a session (7.2 GB at 4096x4096, 1.7 without)
        runtime = load_runtime(artifact, ctx.config.format, memory_arena=False)
        predict = _predict(runtime, ctx.source.inputs)
        outputs = run_batched(predict, ctx.evaluation, batch_size(runtime.inputs, ctx.evaluation),
                              on_batch=lambda d, t: ctx.step(f"evaluating {attempt.label}",
                                                             d, t))
    except (EdgefleetError, ValueError, RuntimeError) as exc:  # LiteRT raises bare ones
        onnx = ctx.config.format == "onnx"
        name = "ONNX Runtime" if onnx else "LiteRT"
        fault = onnx_graph_fault(artifact) if onnx else ""
        raise result_refused(attempt.label, attempt.recipe, name, exc, fault) from exc
    attempt.size_bytes = len(artifact)
    attempt.gzip_bytes = len(gzip.compress(artifact, compresslevel=9))
    found = agreement(ctx.source_outputs, outputs, ctx.source.output_names, ctx.kinds)
    attempt.agreement = found.as_dict()
    labels = ctx.evaluation.labels
    if labels is not None:
        attempt.accuracy = round(accuracy(outputs, labels, ctx.labelled), 6)
    attempt.accuracy_drop_points = drop_points(ctx, attempt, found)
    attempt.latency_p50_ms = latency_p50_ms(predict,
                                            one_call(ctx.evaluation, runtime.inputs))
    info = inspect_model(artifact, ctx.config.format)
    attempt.ops, attempt.dtypes = dict(info.ops), sorted(info.dtypes)
    attempt.float_ops = _float_ops(ctx, attempt, artifact)
    attempt.violations = [_with_float_ops(v.as_dict(), attempt.float_ops) for p in ctx.profiles
                          for v in check_model(p, probe_manifest(ctx, runtime, info), info,
                                               len(artifact))]
    never_slower(ctx, attempt, predict)


def _float_ops(ctx: Context, attempt: Attempt, artifact: bytes) -> list[str]:
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
