"""The never-slower guard: a result is timed against what it replaces, in alternating
rounds, and called slower only beyond :data:`SLOWER_MARGIN`."""

from __future__ import annotations

from collections.abc import Sequence

from edgefleet.agent.runtime.base import Array, TensorInfo
from edgefleet.converter.context import Context
from edgefleet.converter.data import Dataset
from edgefleet.converter.evaluate import Predict, fixed_batch, latency_p50_ms
from edgefleet.converter.report import Attempt

__all__ = ["SLOWER_MARGIN", "is_slower", "never_slower", "one_call"]

SLOWER_MARGIN = 0.03  # slower than the reference by more than 3 %, measured alternately


def never_slower(ctx: Context, attempt: Attempt, predict: Predict) -> None:
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
                                                         one_call(ctx.evaluation,
                                                                  ctx.source.inputs))
    attempt.reference_latency_p50_ms = reference
    if attempt.latency_p50_ms is None or reference is None:
        return
    if not is_slower(attempt.latency_p50_ms, reference) or attempt.kept_source:
        return  # (the source itself: any difference is the host's noise)
    message = (f"converted model is slower than {what} on this host "
               f"({attempt.latency_p50_ms} ms vs {reference} ms at p50, "
               f"{attempt.latency_p50_ms / reference:.2f}x)")
    attempt.warnings.append(message)
    for profile in ctx.profiles:
        if profile.never_slower:
            attempt.violations.append({"kind": "slower", "message": f"{profile.name}: {message}",
                                       "nodes": []})


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


def one_call(data: Dataset, inputs: Sequence[TensorInfo]) -> dict[str, Array]:
    """The inputs of one call for latency: one sample, or the model's fixed batch (a model
    exported with batch 3 refuses one row)."""
    return data.take(fixed_batch(inputs) or 1).inputs
