"""The conversion report: every attempt, what was measured, what was chosen and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from edgefleet.agent.protocol.schema import finite

__all__ = ["Attempt", "ConversionReport", "Verdict"]


class Verdict(Enum):
    """What judging an attempt concluded; code branches on this, people read ``reason``."""

    UNJUDGED = "unjudged"
    FAILED = "failed"  # the backend failed, or the result does not load or run
    NOT_SMALLER = "not_smaller"  # quantizing found nothing to quantize
    OVER_BUDGET = "over_budget"  # the accuracy drop is over --max-drop
    NOT_FINITE = "not_finite"  # outputs NaN or infinite where the source's are finite
    OFF_TARGET = "off_target"  # it breaks a --target device profile
    ACCEPTED = "accepted"


@dataclass
class Attempt:
    """One candidate conversion and its measurements."""

    label: str
    mode: str
    keep_float: list[str] = field(default_factory=list)
    recipe: str = ""  # the backend recipe, named as the backend names it
    kept_source: bool = False  # the result is the source itself (fp16 of a float16 source)
    size_bytes: int | None = None
    gzip_bytes: int | None = None
    accuracy: float | None = None
    accuracy_drop_points: float | None = None
    agreement: dict[str, Any] = field(default_factory=dict)
    latency_p50_ms: float | None = None
    # the p50 of what it replaces (source or float conversion), from the same comparison
    reference_latency_p50_ms: float | None = None
    ops: dict[str, int] = field(default_factory=dict)
    dtypes: list[str] = field(default_factory=list)
    # operators a full-integer result still computes in float (the backend has no integer
    # kernel for them, or they were kept float)
    float_ops: list[str] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    accepted: bool = False
    reason: str = ""
    hint: str = ""  # what to do about a failure, when the backend said
    verdict: Verdict = Verdict.UNJUDGED


@dataclass
class ConversionReport:
    """What ``edgefleet convert`` did; stored (minus bulky parts) in the manifest's metrics."""

    source: str
    source_kind: str
    format: str
    quantize: str
    source_bytes: int
    source_accuracy: float | None = None
    source_latency_p50_ms: float | None = None
    float_latency_p50_ms: float | None = None
    eval_samples: int = 0
    eval_data: str = "none"
    attempts: list[Attempt] = field(default_factory=list)
    chosen: str | None = None
    output: str | None = None
    bundle_bytes: int | None = None
    conversion_seconds: float = 0.0
    pruning: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    encrypted_for: list[str] = field(default_factory=list)  # recipient key ids
    budget_points: float | None = None  # the accuracy budget the attempts were judged by
    input_shapes: dict[str, list[int]] = field(default_factory=dict)  # as converted
    source_quantized: bool = False  # its weights are integers already: nothing to quantize
    # per output: {"name", "kind" (class or regression), "rule" (why)}
    output_kinds: list[dict[str, str]] = field(default_factory=list)
    # when nothing passed: options that change the outcome ({"option", "config", "why"})
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def chosen_attempt(self) -> Attempt | None:
        return next((a for a in self.attempts if a.label == self.chosen), None)

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON data; an attempt's ``verdict`` stays inside the converter
        (``accepted`` and ``reason`` tell it)."""
        data = asdict(self)
        for attempt in data["attempts"]:
            del attempt["verdict"]
        return dict(finite(data))  # strict JSON: a NaN measured becomes null

    def metrics(self) -> dict[str, Any]:
        """The manifest's ``metrics``: the chosen result and a one-line summary per attempt."""
        chosen = self.chosen_attempt
        result: dict[str, Any] = {
            "source_bytes": self.source_bytes, "source_accuracy": self.source_accuracy,
            "source_latency_p50_ms": self.source_latency_p50_ms,
            "float_latency_p50_ms": self.float_latency_p50_ms,
            "eval_samples": self.eval_samples, "eval_data": self.eval_data,
            "conversion_seconds": self.conversion_seconds, "pruning": self.pruning,
            "budget_points": self.budget_points, "input_shapes": self.input_shapes,
            "output_kinds": self.output_kinds,
            "attempts": [{"label": a.label, "recipe": a.recipe, "accepted": a.accepted,
                          "reason": a.reason, "size_bytes": a.size_bytes,
                          "accuracy": a.accuracy, "keep_float": len(a.keep_float),
                          "worst": a.agreement.get("worst"),
                          "latency_p50_ms": a.latency_p50_ms}
                         for a in self.attempts]}
        if chosen is not None:
            result.update(model_bytes=chosen.size_bytes, gzip_bytes=chosen.gzip_bytes,
                          accuracy=chosen.accuracy,
                          accuracy_drop_points=chosen.accuracy_drop_points,
                          agreement=chosen.agreement, latency_p50_ms=chosen.latency_p50_ms,
                          keep_float=chosen.keep_float, warnings=chosen.warnings)
        return dict(finite(result))
