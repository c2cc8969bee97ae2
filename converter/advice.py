"""When nothing passed: why each candidate failed (accuracy, a device limit, the backend)
and the options that would change it, each one offered on this source and format.

Pure: it reads the report and the config and returns the error to raise.
"""

from __future__ import annotations

import math
from typing import Any

from edgefleet.converter.config import ConvertConfig
from edgefleet.converter.errors import (
    BudgetExceededError,
    ConverterError,
    TargetViolationError,
)
from edgefleet.converter.report import Attempt, ConversionReport, Verdict

__all__ = ["failure", "suggestions"]

# a device limit (a violation's kind) -> what it is, for people
LIMITS = {"dtype": "tensor types", "op": "operators", "op_version": "operator versions",
          "runtime_version": "runtime version", "opset": "ONNX opset", "size": "model size",
          "runtime": "runtime", "slower": "never slower"}


def failure(report: ConversionReport, config: ConvertConfig) -> ConverterError:
    """The error for a conversion where no candidate was accepted; fills
    ``report.suggestions``."""
    reasons = "; ".join(f"{a.label}: {_why(a)}" for a in report.attempts)
    report.suggestions = suggestions(report, config)
    hint = "; or ".join(f"{s['option']} ({s['why']})" for s in report.suggestions)
    backend = "; ".join(dict.fromkeys(a.hint for a in report.attempts if a.hint))
    if any(a.verdict is Verdict.OVER_BUDGET for a in report.attempts):
        return BudgetExceededError(f"no result within the accuracy budget ({reasons})",
                                   hint=hint or backend or "see the report")
    if any(a.verdict is Verdict.OFF_TARGET for a in report.attempts):
        return TargetViolationError(f"no result fits the targets ({reasons})",
                                    hint=hint or "no option of the converter lifts these "
                                                 "limits: drop the --target or change the model")
    return ConverterError(f"conversion failed ({reasons})",
                          hint=backend or hint or "see the report")


def _why(attempt: Attempt) -> str:
    """The reason, with what kind of failure it was (device limit or accuracy)."""
    if attempt.verdict is Verdict.OFF_TARGET:
        kinds = sorted({LIMITS.get(v["kind"], v["kind"]) for v in attempt.violations})
        return f"device limit ({', '.join(kinds)}): {attempt.reason}"
    if attempt.verdict is Verdict.OVER_BUDGET:
        return f"accuracy: {attempt.reason}"
    return attempt.reason


def suggestions(report: ConversionReport, config: ConvertConfig) -> list[dict[str, Any]]:
    """Options that change the outcome: ``{"option", "config", "why"}`` each."""
    attempts = report.attempts
    out = _budget(attempts) + _limits(attempts, config, report.source_kind)
    tried = {a.mode for a in attempts}
    only_failed = all(a.verdict is Verdict.FAILED for a in attempts)
    if config.quantize not in ("auto", "none") and not only_failed:
        out.append({"option": "--quantize auto", "config": {"quantize": "auto"},
                    "why": "searches recipes, keeping the most sensitive operators in float"})
    if "fp16" not in tried and config.quantize != "none" and not only_failed and \
            not _kinds(attempts) - {"slower"}:
        out.append({"option": "--quantize fp16", "config": {"quantize": "fp16"},
                    "why": "float16 weights, half the float32 size"})
    return _unique(out)


def _budget(attempts: list[Attempt]) -> list[dict[str, Any]]:
    over = [a for a in attempts if a.verdict is Verdict.OVER_BUDGET and not a.violations]
    if not over:
        return []
    best = min(over, key=lambda a: a.accuracy_drop_points or 0.0)
    points = math.ceil((best.accuracy_drop_points or 0.0) * 10 + 1) / 10
    return [{"option": f"--max-drop {points:g}", "config": {"max_drop": points},
             "why": f"accepts {best.label}, {best.accuracy_drop_points:.2f} points lost"}]


def _kinds(attempts: list[Attempt]) -> set[str]:
    return {v["kind"] for a in attempts if a.verdict is Verdict.OFF_TARGET for v in a.violations}


def _limits(attempts: list[Attempt], config: ConvertConfig, kind: str) -> list[dict[str, Any]]:
    """Device limits an option lifts: float I/O on a full-integer device (--int8-io), a
    model too large (int8), a result slower than its source (float16 or none)."""
    out: list[dict[str, Any]] = []
    kinds = _kinds(attempts)
    float_io = any("float" in v["message"] for a in attempts for v in a.violations
                   if v["kind"] == "dtype")
    if "dtype" in kinds and float_io and config.format == "tflite" and not config.int8_io \
            and kind in ("keras", "savedmodel", "tflite"):
        lifts = "lifts the float inputs and outputs" + (
            "; the other limits stay" if kinds - {"dtype"} else "")
        out.append({"option": "--quantize int8 --int8-io",
                    "config": {"quantize": "int8", "int8_io": True}, "why": lifts})
    if "size" in kinds and config.quantize not in ("int8", "auto"):
        out.append({"option": "--quantize auto", "config": {"quantize": "auto"},
                    "why": "the smallest recipe within the budget, for the size limit"})
    if "slower" in kinds and config.quantize != "none":
        out.append({"option": "--quantize none", "config": {"quantize": "none"},
                    "why": "the float model, never slower than its source"})
    return out


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item["option"] not in seen:
            seen.add(item["option"])
            out.append(item)
    return out
