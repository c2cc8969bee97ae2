"""Judging a measured result: not finite, not smaller, over the accuracy budget, off a
target, or accepted; and the reason given for each."""

from __future__ import annotations

import math

from edgefleet.converter.context import Context
from edgefleet.converter.evaluate import CLASS, Agreement
from edgefleet.converter.report import Attempt, Verdict

__all__ = ["agreement_drop", "drop_points", "judge", "points_above"]


def judge(ctx: Context, attempt: Attempt) -> None:
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
        attempt.reason = (f"{attempt.mode} did not make the model smaller: {ctx.quantized}, "
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


def _over_budget(ctx: Context, attempt: Attempt, drop: float, budget: float) -> str:
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


def _top1_cause(ctx: Context, attempt: Attempt) -> str:
    """When top-1 agreement set the drop: on which output, and the rule that made it a
    classifier's (``--output-kind NAME=regression`` overrides it)."""
    top1, score = attempt.agreement.get("top1"), attempt.agreement.get("worst_score", 1.0)
    if attempt.accuracy is not None or top1 is None or top1 >= score:
        return ""
    kind = next(k for k in ctx.kinds if k.kind == CLASS)
    return (f"; top-1 agreement {top1:.4f} on {kind.name!r}, judged a classifier's "
            f"({kind.rule}; --output-kind {kind.name}=regression if it is not)")


def drop_points(ctx: Context, attempt: Attempt, found: Agreement) -> float:
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
