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
UNUSABLE_POINTS = 50.0  # a result this far off is not one to accept with --max-drop
# an output this far off is noise, whatever points its score costs (a small output's score
# reads its error against its range and costs at most about 20 points for pure noise)
NOISE_REL_RMS = 0.5
NOISE_CENTERED_COSINE = 0.5


def failure(report: ConversionReport, config: ConvertConfig) -> ConverterError:
    """The error for a conversion where no candidate was accepted; fills
    ``report.suggestions``."""
    reasons = "; ".join(f"{a.label}: {_why(a)}" for a in report.attempts)
    report.suggestions = suggestions(report, config)
    hint = "; or ".join(f"{s['option']} ({s['why']})" for s in report.suggestions)
    backend = "; ".join(dict.fromkeys(a.hint for a in report.attempts if a.hint))
    if any(a.verdict is Verdict.OVER_BUDGET for a in report.attempts):
        return BudgetExceededError(f"no result within the accuracy budget ({reasons})",
                                   hint="; or ".join(filter(None, [_unusable(report), hint]))
                                   or backend or "see the report")
    if any(a.verdict is Verdict.OFF_TARGET for a in report.attempts):
        fixed = unliftable(report.attempts)
        if fixed:  # no recipe changes these: say what does, and offer no recipe
            report.suggestions = []
            return TargetViolationError(
                f"no result fits the targets ({reasons})",
                hint="no --quantize option lifts " + "; nor ".join(fixed) +
                     f"; or drop --target {' / '.join(config.targets)}")
        stuck = _stuck_float(report.attempts)
        return TargetViolationError(f"no result fits the targets ({reasons})",
                                    hint="; or ".join(filter(None, [
                                        _replace_ops(stuck, report.source_kind, config),
                                        hint])) or
                                    "no option of the converter lifts these limits: drop the "
                                    "--target or change the model")
    return ConverterError(f"conversion failed ({reasons})",
                          hint=backend or hint or "see the report")


# operators a recipe adds or removes (float16 and int8 conversions bring these): a limit on
# any other operator holds for every recipe
RECIPE_OPS = {"QUANTIZE", "DEQUANTIZE", "CAST", "QuantizeLinear", "DequantizeLinear",
              "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "Cast"}


def unliftable(attempts: list[Attempt]) -> list[str]:
    """Device limits that every refused-for-the-targets attempt breaks and no recipe
    changes: a device without a runtime for the format, an ONNX opset above the device's,
    an operator the device lacks (other than the ones quantization adds). Each comes with
    what lifts it instead."""
    off = [a for a in attempts if a.verdict is Verdict.OFF_TARGET]
    if not off:
        return []
    common = set.intersection(*[{(v["kind"], v["message"]) for v in a.violations
                                 if _fixed_by_model(v)} for a in off])
    if any(kind == "runtime" for kind, _ in common):  # no runtime for the format: its
        # operators and opset do not matter on that device
        common = {(kind, message) for kind, message in common if kind == "runtime"}
    return [f"{message} ({_what_lifts(kind)})" for kind, message in sorted(common)]


def _fixed_by_model(violation: dict[str, Any]) -> bool:
    if violation["kind"] in ("runtime", "opset"):
        return True
    if violation["kind"] != "op":
        return False
    op = str(violation["message"]).removeprefix("op ").split(" ", 1)[0]
    return op not in RECIPE_OPS


def _what_lifts(kind: str) -> str:
    return {"runtime": "convert to the format the device runs: --format tflite from a Keras "
                       "or SavedModel source",
            "opset": "re-export the model at an opset the device loads",
            "op": "replace the operator in the model, or export it without it (a fixed "
                  "batch removes the SHAPE a dynamic Flatten or Reshape adds)"}[kind]


def _unusable(report: ConversionReport) -> str:
    """Every over-budget result unusable (:func:`_unusable_why`): say so rather than offer
    a --max-drop that would accept it."""
    over = _over(report.attempts)
    if not over or any(not _unusable_why(a) for a in over):
        return ""
    best = min(over, key=lambda a: a.accuracy_drop_points or 0.0)
    return (f"the closest result is unusable ({_unusable_why(best)}), not a budget to "
            "raise; check the calibration data is like the evaluation data (the same "
            "scaling, --scale, and range)")


def _over(attempts: list[Attempt]) -> list[Attempt]:
    return [a for a in attempts if a.verdict is Verdict.OVER_BUDGET and not a.violations]


def _unusable_why(attempt: Attempt) -> str:
    """Why a result is unusable, or "": an output that is noise (relative RMS error of
    :data:`NOISE_REL_RMS` or more, for a small output also against its variation around its
    mean, or centered cosine below :data:`NOISE_CENTERED_COSINE`),
    or :data:`UNUSABLE_POINTS` or more off."""
    for output in attempt.agreement.get("outputs") or []:
        rel_rms, centered = output.get("rel_rms", 0.0), output.get("centered_cosine", 1.0)
        if output.get("judged_by") == "range":  # a small output: its variation is the signal
            rel_rms = max(rel_rms, output.get("centered_rel_rms", 0.0))
        if rel_rms >= NOISE_REL_RMS or centered < NOISE_CENTERED_COSINE:
            return (f"output {output.get('name')!r} has a relative RMS error of {rel_rms:.2f} "
                    f"and a centered cosine of {centered:.2f}: noise, not a small loss")
    drop = attempt.accuracy_drop_points or 0.0
    return f"{drop:.1f} points off" if drop >= UNUSABLE_POINTS else ""


def _why(attempt: Attempt) -> str:
    """The reason, with what kind of failure it was (device limit or accuracy)."""
    if attempt.verdict is Verdict.OFF_TARGET:
        kinds = sorted({LIMITS.get(v["kind"], v["kind"]) for v in attempt.violations})
        return f"device limit ({', '.join(kinds)}): {attempt.reason}"
    if attempt.verdict is Verdict.OVER_BUDGET:
        return f"accuracy: {attempt.reason}"
    return attempt.reason


# an operator the quantizer of float .tflite sources leaves float (and the TFLite converter
# makes int8) -> one the quantizer makes integer
REPLACEMENTS = {"PRELU": "ReLU", "LEAKY_RELU": "ReLU"}


def suggestions(report: ConversionReport, config: ConvertConfig) -> list[dict[str, Any]]:
    """Options that change the outcome: ``{"option", "config", "why"}`` each."""
    attempts = report.attempts
    if report.source_quantized and config.quantize != "none":
        return [{"option": "--quantize none", "config": {"quantize": "none"},
                 "why": "the source is quantized already: it is packaged as it is"}]
    out = _budget(attempts) + _limits(attempts, config, report.source_kind)
    tried = {a.mode for a in attempts}
    only_failed = all(a.verdict is Verdict.FAILED for a in attempts)
    if config.quantize not in ("auto", "none") and not only_failed and \
            not _stuck_float(attempts):  # auto keeps more in float, never less
        out.append({"option": "--quantize auto", "config": {"quantize": "auto"},
                    "why": "searches recipes, keeping the most sensitive operators in float"})
    if "fp16" not in tried and config.quantize != "none" and not only_failed and \
            not _kinds(attempts) - {"slower"}:
        out.append({"option": "--quantize fp16", "config": {"quantize": "fp16"},
                    "why": "float16 weights, half the float32 size"})
    return _unique(out)


def _budget(attempts: list[Attempt]) -> list[dict[str, Any]]:
    usable = [a for a in _over(attempts) if not _unusable_why(a)]
    if not usable:
        return []  # no --max-drop: such a result is unusable, not a little off (failure())
    best = min(usable, key=lambda a: a.accuracy_drop_points or 0.0)
    points = min(100.0, math.ceil((best.accuracy_drop_points or 0.0) * 10 + 1) / 10)
    return [{"option": f"--max-drop {points:g}", "config": {"max_drop": points},
             "why": f"accepts {best.label}, {best.accuracy_drop_points:.2f} points lost"}]


def _stuck_float(attempts: list[Attempt]) -> list[str]:
    """Operators a full int8 result (none kept float on purpose) still computes in float on
    a device that takes integer tensors only: no recipe makes them integer, and every other
    recipe keeps more in float."""
    return sorted({op for a in attempts if a.verdict is Verdict.OFF_TARGET
                   and a.mode == "int8" and not a.keep_float
                   and any(v["kind"] == "dtype" for v in a.violations) for op in a.float_ops})


def _replace_ops(ops: list[str], kind: str, config: ConvertConfig) -> str:
    """The hint for operators no option makes integer: change the model."""
    if not ops:
        return ""
    names = ", ".join(ops)
    swaps = [f"{op} by {REPLACEMENTS[op]}" for op in ops if op in REPLACEMENTS]
    by = f" ({', '.join(swaps)}, say)" if swaps else ""
    converted = [op for op in ops if op in REPLACEMENTS]  # TFLite has int8 kernels for them
    original = (", or convert the model's Keras or SavedModel original, whose TFLite "
                f"converter makes {', '.join(converted)} integer") \
        if kind == "tflite" and converted == ops else ""
    return (f"{names} stays float under every --quantize option (the quantizer has no "
            f"integer {names}), so no converter option lifts it: replace {names} in the "
            f"model{by} and convert again{original}; or drop --target "
            f"{' / '.join(config.targets)}")


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
            and kind in ("keras", "savedmodel", "tflite") and not _stuck_float(attempts):
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
