"""Drift statistics: what a model sees and says, summarised one way everywhere.

The converter summarises its evaluation (else calibration) data through the converted
model into a :class:`Monitoring` reference carried in the signed manifest; the agent
summarises what it serves into windows with :class:`DriftWindow`; the controller
compares the two with the population stability index (:func:`psi`).

Per input tensor: mean, standard deviation, minimum and maximum of the values, and a
histogram of each sample's *summary value* (the mean of its elements) over bins whose
inner edges are the reference's deciles, so every reference bin holds a tenth of the
reference samples and the two outer bins are open-ended. Per output: for classifiers,
the distribution of the top-1 class, the mean confidence (the top-1 probability) and a
histogram of it over ten fixed bins on [0, 1]; for other models, the same summary-value
histogram as the inputs. Integer tensors with quantization parameters are summarised in
real values (``scale * (q - zero_point)``), so an int8 model is compared with its float
reference on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CONFIDENCE_EDGES",
    "DEFAULT_PSI_THRESHOLD",
    "DriftWindow",
    "InputReference",
    "Monitoring",
    "OutputReference",
    "compare",
    "psi",
    "reference_from",
    "window_counts",
]

Array = npt.NDArray[Any]
BINS = 10
CONFIDENCE_EDGES: tuple[float, ...] = tuple(i / BINS for i in range(BINS + 1))
DEFAULT_PSI_THRESHOLD = 0.2  # the usual "significant shift" line for PSI
_EPS = 1e-4  # an empty bin counts as this fraction, so PSI stays finite
Scale = tuple[float, int] | None  # (scale, zero point) of a per-tensor quantized tensor


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class InputReference(_Frozen):
    """One tensor's reference: value moments and the summary-value histogram."""

    mean: float
    std: float
    min: float
    max: float
    edges: list[float] = Field(min_length=1)  # inner bin edges, ascending
    hist: list[float]  # fraction of reference samples per bin (len(edges) + 1)


class OutputReference(_Frozen):
    """One output's reference: classes and confidence for classifiers, else a histogram."""

    kind: Literal["classes", "values"]
    classes: list[float] = Field(default_factory=list)  # top-1 fraction per class
    confidence_mean: float | None = None
    confidence_hist: list[float] = Field(default_factory=list)  # over CONFIDENCE_EDGES
    values: InputReference | None = None


class Monitoring(_Frozen):
    """The manifest's ``monitoring`` section: reference statistics and where they came from."""

    source: Literal["eval", "calibration", "health"]
    samples: int = Field(ge=1)
    inputs: dict[str, InputReference]
    outputs: dict[str, OutputReference]


# --- summaries --------------------------------------------------------------------------


def real_values(x: Array, scale: Scale) -> npt.NDArray[np.floating[Any]]:
    """``x`` as real values: float tensors as they are (no copy), integer ones as float64
    (dequantized when ``scale`` is given)."""
    values = np.asarray(x)
    if scale is None and values.dtype.kind == "f":
        return values
    values = values.astype(np.float64)
    if scale is not None:
        values = (values - scale[1]) * scale[0]
    return values


def sample_summary(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float64]:
    """One number per sample (the mean of its elements); a 0-d or 1-d tensor is one sample
    per element."""
    if x.ndim <= 1:
        return np.asarray(x.reshape(-1), dtype=np.float64)
    rows = x.reshape(x.shape[0], -1)
    return np.asarray(rows.sum(axis=1), dtype=np.float64) / rows.shape[1]


def probabilities(x: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.floating[Any]]:
    """Rows of class probabilities: kept when they already are, else a softmax of logits."""
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    sums = rows.sum(axis=1)
    if rows.size and rows.min() >= 0 and float(np.abs(sums - 1.0).max()) <= 1e-2:
        return rows
    shifted = np.exp(rows - rows.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float64)


def _fractions(counts: Sequence[float] | Array) -> list[float]:
    total = float(np.sum(counts))
    return [round(float(c) / total, 6) if total else 0.0 for c in counts]


def _deciles(summary: npt.NDArray[np.float64]) -> list[float]:
    edges = np.unique(np.quantile(summary, np.linspace(0, 1, BINS + 1)[1:-1]))
    return [float(e) for e in edges] or [float(summary.mean())]


def _bin_counts(summary: npt.NDArray[np.float64], edges: Sequence[float]) -> Array:
    return np.bincount(np.searchsorted(np.asarray(edges), summary, side="right"),
                       minlength=len(edges) + 1)


def _input_reference(values: npt.NDArray[np.floating[Any]]) -> InputReference:
    summary = sample_summary(values)
    edges = _deciles(summary)
    return InputReference(mean=float(values.mean()), std=float(values.std()),
                          min=float(values.min()), max=float(values.max()), edges=edges,
                          hist=_fractions(_bin_counts(summary, edges)))


def reference_from(inputs: Mapping[str, Array], outputs: Mapping[str, Array], *,
                   classifier: bool, source: Literal["eval", "calibration", "health"],
                   scales: Mapping[str, Scale] | None = None) -> Monitoring:
    """The reference statistics of ``inputs`` and the model's ``outputs`` on them."""
    scales = scales or {}
    rows = min((len(v) for v in inputs.values()), default=0)
    if rows < 1:
        raise ValueError("reference statistics need at least one sample")
    refs = {name: _input_reference(real_values(x, scales.get(name)))
            for name, x in inputs.items()}
    outs: dict[str, OutputReference] = {}
    for name, y in outputs.items():
        values = real_values(y, scales.get(name))
        if classifier:
            probs = probabilities(values)
            top, confidence = probs.argmax(axis=1), probs.max(axis=1)
            outs[name] = OutputReference(
                kind="classes",
                classes=_fractions(np.bincount(top, minlength=probs.shape[1])),
                confidence_mean=float(confidence.mean()),
                confidence_hist=_fractions(_bin_counts(confidence, CONFIDENCE_EDGES[1:-1])))
        else:
            outs[name] = OutputReference(kind="values", values=_input_reference(values))
    return Monitoring(source=source, samples=rows, inputs=refs, outputs=outs)


# --- windows (device side) ----------------------------------------------------------------


class _Moments:
    __slots__ = ("count", "hist", "maximum", "minimum", "samples", "total", "total_sq")

    def __init__(self, bins: int) -> None:
        self.count = self.samples = 0
        self.total = self.total_sq = 0.0
        self.minimum, self.maximum = math.inf, -math.inf
        self.hist = np.zeros(bins, dtype=np.int64)

    def add(self, values: npt.NDArray[np.floating[Any]], edges: Sequence[float] | None) -> None:
        if not values.size:
            return
        flat = values.reshape(-1)
        self.count += values.size
        self.total += float(flat.sum())  # pairwise summation: accurate in float32 too
        self.total_sq += float(np.dot(flat, flat))  # no temporary array
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))
        summary = sample_summary(values)
        self.samples += summary.size
        if edges is not None:
            self.hist += _bin_counts(summary, edges)

    def as_dict(self) -> dict[str, Any]:
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        return {"n": self.samples, "mean": round(mean, 6), "std": round(math.sqrt(var), 6),
                "min": round(self.minimum, 6), "max": round(self.maximum, 6),
                "hist": [int(c) for c in self.hist]}


class _Classes:
    __slots__ = ("classes", "confidence", "hist", "samples")

    def __init__(self, classes: int) -> None:
        self.classes = np.zeros(classes, dtype=np.int64)
        self.hist = np.zeros(BINS, dtype=np.int64)
        self.confidence, self.samples = 0.0, 0

    def add(self, values: npt.NDArray[np.floating[Any]]) -> None:
        probs = probabilities(values)
        if probs.shape[1] != self.classes.size:
            self.classes = np.zeros(probs.shape[1], dtype=np.int64)  # reference disagrees
        top, confidence = probs.argmax(axis=1), probs.max(axis=1)
        self.classes += np.bincount(top, minlength=self.classes.size)
        self.hist += _bin_counts(confidence, CONFIDENCE_EDGES[1:-1])
        self.confidence += float(confidence.sum())
        self.samples += int(top.size)

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.samples, "classes": [int(c) for c in self.classes],
                "confidence_mean": round(self.confidence / self.samples, 6),
                "confidence_hist": [int(c) for c in self.hist]}


class DriftWindow:
    """Running statistics of what one model version sees and says, drained per window.

    ``add`` takes a batch of feeds and the outputs the model gave; ``drain`` returns the
    window as JSON-ready counts (``None`` when nothing was added) and starts a new one.
    Not thread-safe: the caller serialises ``add`` and ``drain``.
    """

    def __init__(self, reference: Monitoring | None, scales: Mapping[str, Scale] | None = None,
                 classifier: bool = False) -> None:
        self.reference, self.scales, self.classifier = reference, dict(scales or {}), classifier
        self._inputs: dict[str, _Moments] = {}
        self._outputs: dict[str, _Moments | _Classes] = {}

    def _edges(self, name: str, output: bool) -> list[float] | None:
        ref = self.reference
        if ref is None:
            return None
        if output:
            out = ref.outputs.get(name)
            return out.values.edges if out is not None and out.values is not None else None
        found = ref.inputs.get(name)
        return found.edges if found is not None else None

    def _is_classes(self, name: str) -> bool:
        ref = self.reference.outputs.get(name) if self.reference is not None else None
        return ref.kind == "classes" if ref is not None else self.classifier

    def add(self, feeds: Mapping[str, Array], outputs: Mapping[str, Array]) -> None:
        for name, x in feeds.items():
            edges = self._edges(name, False)
            moments = self._inputs.get(name)
            if moments is None:
                moments = self._inputs[name] = _Moments(len(edges) + 1 if edges else 0)
            moments.add(real_values(x, self.scales.get(name)), edges)
        for name, y in outputs.items():
            values = real_values(y, self.scales.get(name))
            stats = self._outputs.get(name)
            if self._is_classes(name):
                if stats is None:
                    stats = self._outputs[name] = _Classes(values.shape[-1] if values.ndim else 1)
                assert isinstance(stats, _Classes)
                stats.add(values)
            else:
                edges = self._edges(name, True)
                if stats is None:
                    stats = self._outputs[name] = _Moments(len(edges) + 1 if edges else 0)
                assert isinstance(stats, _Moments)
                stats.add(values, edges)

    def drain(self) -> dict[str, Any] | None:
        inputs, self._inputs = self._inputs, {}
        outputs, self._outputs = self._outputs, {}
        inputs = {k: v for k, v in inputs.items() if v.count}
        outputs = {k: v for k, v in outputs.items() if v.samples}
        if not inputs and not outputs:
            return None
        samples = max((m.samples for m in inputs.values()), default=0)
        return {"samples": samples,
                "inputs": {k: v.as_dict() for k, v in inputs.items()},
                "outputs": {k: v.as_dict() for k, v in outputs.items()}}


# --- comparison (controller side) ---------------------------------------------------------


def psi(expected: Sequence[float], actual_counts: Sequence[float]) -> float | None:
    """Population stability index of observed counts against expected fractions.

    ``sum((a - e) * ln(a / e))`` over bins, each fraction floored at 1e-4 so an empty bin
    stays finite. ``None`` when the two do not have the same bins or nothing was observed.
    """
    if len(expected) != len(actual_counts) or not len(expected):
        return None
    total = float(sum(actual_counts))
    if total <= 0:
        return None
    value = 0.0
    for e, count in zip(expected, actual_counts, strict=True):
        e_frac, a_frac = max(float(e), _EPS), max(float(count) / total, _EPS)
        value += (a_frac - e_frac) * math.log(a_frac / e_frac)
    return round(value, 6)


def compare(reference: Monitoring, window: Mapping[str, Any]) -> dict[str, float]:
    """PSI per feature of one window against the reference: ``input:NAME`` (summary-value
    histogram), ``output:NAME:classes`` and ``output:NAME:confidence`` for classifiers,
    ``output:NAME`` otherwise. Features a window does not carry (or carries with other
    bins) are left out; malformed windows raise ``ValueError``."""
    found: dict[str, float] = {}
    inputs, outputs = window.get("inputs", {}), window.get("outputs", {})
    if not isinstance(inputs, Mapping) or not isinstance(outputs, Mapping):
        raise ValueError("a drift window's inputs and outputs must be objects")
    for name, ref in reference.inputs.items():
        _put(found, f"input:{name}", ref.hist, window_counts(inputs.get(name), "hist"))
    for name, out in reference.outputs.items():
        seen = outputs.get(name)
        if out.kind == "classes":
            _put(found, f"output:{name}:classes", out.classes, window_counts(seen, "classes"))
            _put(found, f"output:{name}:confidence", out.confidence_hist,
                 window_counts(seen, "confidence_hist"))
        elif out.values is not None:
            _put(found, f"output:{name}", out.values.hist, window_counts(seen, "hist"))
    return found


def window_counts(stats: Any, key: str) -> list[float] | None:
    """One count list of a window's per-tensor statistics, checked (None when absent)."""
    if stats is None:
        return None
    if not isinstance(stats, Mapping):
        raise ValueError("a drift window's per-tensor statistics must be objects")
    counts = stats.get(key)
    if counts is None:
        return None
    if not isinstance(counts, list) or not all(
            isinstance(c, int | float) and not isinstance(c, bool) and c >= 0 and math.isfinite(c)
            for c in counts):
        raise ValueError(f"a drift window's {key} must be a list of non-negative counts")
    return [float(c) for c in counts]


def _put(found: dict[str, float], feature: str, expected: Sequence[float],
         counts: list[float] | None) -> None:
    if counts is None:
        return
    value = psi(expected, counts)
    if value is not None:
        found[feature] = value
