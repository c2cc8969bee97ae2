"""Measure a converted model against its source: accuracy, agreement, latency, size."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgefleet.agent.runtime.base import Array, TensorInfo
from edgefleet.converter.data import Dataset

__all__ = [
    "CLASS",
    "OUTPUT_KINDS",
    "REGRESSION",
    "SMALL_OUTPUT",
    "Agreement",
    "OutputError",
    "OutputKind",
    "accuracy",
    "agreement",
    "batch_size",
    "is_classifier",
    "labelled_output",
    "latency_p50_ms",
    "output_error",
    "output_kinds",
    "run_batched",
]

Predict = Callable[[Mapping[str, Array]], list[Array]]


SMALL_OUTPUT = 8  # outputs of fewer numbers a sample are judged by error against their range
RANGE_WEIGHT = 0.2  # a small output's score: 1 - 0.2 x (max abs error / range)
RANGE_FLOOR = 0.1  # a small output in [0, 1] (a probability) is judged against a range of
# at least 0.1 x its largest value; any other against at least OFFSET_FLOOR x its largest
# magnitude: a reading around an offset (1000 +- 3) is judged on its own spread
OFFSET_FLOOR = 0.001


@dataclass(frozen=True)
class OutputError:
    """How far one converted output is from the source's, measured several ways.

    ``score`` is what the budget reads, on a cosine's scale: for outputs of at least
    :data:`SMALL_OUTPUT` numbers a sample, the **centered** cosine (both outputs less the
    source's mean: a constant offset, which the plain cosine hides under a large mean,
    counts); for smaller ones (a score, a flag), where a cosine says nothing,
    ``1 - RANGE_WEIGHT * max_abs_error / range``, the range being at least
    :data:`RANGE_FLOOR` of the output's largest value for an output in [0, 1] (one nearly
    constant on the evaluation data, a confident probability, is not judged against a
    range of nothing), and at least :data:`OFFSET_FLOOR` of its largest magnitude for any
    other (a tenth of it hid an output of 1000 +- 3 reduced to noise). An error of 5 % of
    the range scores 0.99.
    """

    index: int
    name: str
    numbers: int  # per sample
    cosine: float  # plain (uncentered), for reference
    centered_cosine: float  # what the budget reads for outputs of SMALL_OUTPUT numbers or more
    rel_rms: float  # RMS of the error over the RMS of the source output
    sqnr_db: float | None  # 10 log10(signal power / error power); None when exact
    max_abs_error: float
    range: float  # max - min of the source output over the evaluation data
    judged_range: float  # the range a small output is judged against (RANGE_FLOOR applied)
    judged_by: str  # "centered cosine" or "range"
    score: float
    # RMS of the error over the RMS of the source's variation around its mean: 1 or more is
    # an output whose error is as large as its signal (read for small outputs, whose range
    # score alone let an output of 1000 +- 3 turned to noise pass within a few points)
    centered_rel_rms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.judged_by == "range":
            return (f"output {self.name!r} ({self.numbers} numbers): max error "
                    f"{self.max_abs_error:.4g} = "
                    f"{self.max_abs_error / (self.judged_range or 1):.1%} of its range "
                    f"{self.judged_range:.4g}")
        return (f"output {self.name!r}: centered cosine {self.centered_cosine:.4f}, "
                f"rel RMS {self.rel_rms:.4f}, "
                f"SQNR {'exact' if self.sqnr_db is None else f'{self.sqnr_db:.1f} dB'}")


CLASS, REGRESSION = "class", "regression"
OUTPUT_KINDS = (CLASS, REGRESSION)
PROBABILITY_TOLERANCE = 0.01  # a row of probabilities sums to 1 within this


@dataclass(frozen=True)
class OutputKind:
    """Whether an output is a classifier's (judged by top-1 agreement too) or a regression's
    (landmarks, boxes, masks, logits without labels: judged by its error alone), and the
    rule that said so."""

    name: str
    kind: str  # CLASS or REGRESSION
    rule: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def output_kinds(outputs: Sequence[Array], names: Sequence[str] = (), labels: bool = False,
                 overrides: Mapping[str, str] | None = None) -> list[OutputKind]:
    """Each output's kind, from what is known: ``overrides`` (``--output-kind``) first; an
    output that is not one vector of scores a sample is a regression; with ``labels`` the
    first output is a classifier's (the labels index it); else an output whose every row
    is a probability vector (in [0, 1], summing to 1: a softmax) is a classifier's, and
    real values are a regression's."""
    labelled = list(names) if len(names) == len(outputs) else [str(i) for i in
                                                                range(len(outputs))]
    given = dict(overrides or {})
    indexed = labelled_output(outputs) if labels else None
    return [OutputKind(name, *_kind(i == indexed, value, given.get(name)))
            for i, (name, value) in enumerate(zip(labelled, outputs, strict=True))]


def labelled_output(outputs: Sequence[Array]) -> int | None:
    """The output labels index: the first that is one vector of scores a sample (a model
    whose first output is a map or a scalar may have its scores second); None if none is."""
    return next((i for i, o in enumerate(outputs) if _scores(np.asarray(o))), None)


def _scores(value: Array) -> bool:
    return value.ndim == 2 and value.shape[1] >= 2


def _kind(indexed: bool, value: Array, override: str | None) -> tuple[str, str]:
    if override is not None:
        return override, "set by --output-kind"
    if not _scores(value):
        return REGRESSION, f"not one vector of scores a sample (shape {list(value.shape[1:])})"
    if indexed:
        return CLASS, "labels were given: they index this output"
    if _probabilities(value):
        return CLASS, "every row is a probability vector (in [0, 1], summing to 1)"
    return REGRESSION, "real values, not probability vectors, and no labels given"


def _probabilities(value: Array) -> bool:
    rows = value.astype(np.float64)
    if not rows.size or not np.all(np.isfinite(rows)):
        return False
    inside = bool(rows.min() >= -PROBABILITY_TOLERANCE and rows.max() <= 1 + PROBABILITY_TOLERANCE)
    return inside and bool(np.all(np.abs(rows.sum(axis=1) - 1) <= PROBABILITY_TOLERANCE))


@dataclass(frozen=True)
class Agreement:
    """Per output errors (:class:`OutputError`), the worst of them; top-1 agreement on the
    first classifier output (:class:`OutputKind`), when there is one."""

    outputs: list[OutputError]
    top1: float | None
    kinds: list[OutputKind] = field(default_factory=list)

    @property
    def cosine(self) -> list[float]:
        return [o.cosine for o in self.outputs]

    @property
    def worst(self) -> OutputError:
        return min(self.outputs, key=lambda o: o.score)

    def as_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {"cosine": self.cosine, "max_abs_error": [o.max_abs_error for o in self.outputs],
                "top1": self.top1, "outputs": [o.as_dict() for o in self.outputs],
                "output_kinds": [k.as_dict() for k in self.kinds],
                "worst_output": worst.name, "worst_score": worst.score,
                "worst": worst.describe()}


BATCH = 64


def fixed_batch(inputs: Sequence[TensorInfo]) -> int | None:
    """The model's fixed leading dimension, if every input has the same one (a model
    exported with batch 1 refuses 64 rows); None when it takes any batch."""
    leading = {info.shape[0] for info in inputs if len(info.shape) > 0}
    if len(leading) == 1 and all(n > 0 for n in leading):
        return leading.pop()
    return None


CALL_BYTES = 16 << 20  # inputs of one call of a model of a dynamic batch: large inputs
# get fewer rows a call, so activations stay in proportion to one sample's


def batch_size(inputs: Sequence[TensorInfo], data: Dataset | None = None) -> int:
    """How many samples a call takes: the model's fixed batch; else :data:`BATCH`, fewer
    when the samples of ``data`` are large (at most :data:`CALL_BYTES` of inputs a call) or
    few (no call is padded beyond the samples there are)."""
    fixed = fixed_batch(inputs)
    if fixed:
        return fixed
    if data is None:
        return BATCH
    per_sample = sum(value[:1].nbytes for value in data.inputs.values())
    return max(1, min(BATCH, CALL_BYTES // max(per_sample, 1), len(data)))


def run_batched(predict: Predict, data: Dataset, batch: int = BATCH,
                on_batch: Callable[[int, int], None] = lambda done, total: None) -> list[Array]:
    """``predict`` over ``data`` in calls of ``batch`` rows (the last one padded with its own
    last row when it is short, and the padding's outputs dropped, so a model of a fixed
    batch gets exactly that many rows)."""
    parts: list[list[Array]] = []
    done = 0
    for feeds in data.batches(batch):
        rows = len(next(iter(feeds.values())))
        outputs = predict(_padded(feeds, batch) if rows < batch else feeds)
        parts.append([_rows(o)[:rows] for o in outputs])
        done += rows
        on_batch(done, len(data))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def _rows(value: Array) -> Array:
    """An output as rows: a scalar (rank 0) output, one number a call, is one of shape [1]."""
    array = np.asarray(value)
    return array.reshape(1) if array.ndim == 0 else array


def _padded(feeds: Mapping[str, Array], batch: int) -> dict[str, Array]:
    return {name: np.concatenate([value, np.repeat(value[-1:], batch - len(value), axis=0)])
            for name, value in feeds.items()}


def is_classifier(outputs: Sequence[Array], labels: bool = False) -> bool:
    """Whether the first output is a classifier's (:func:`output_kinds`)."""
    return output_kinds(outputs[:1], labels=labels)[0].kind == CLASS


def accuracy(outputs: Sequence[Array], labels: Array, index: int = 0) -> float:
    """Top-1 accuracy of output ``index`` (:func:`labelled_output`) against ``labels``."""
    return float((np.asarray(outputs[index]).argmax(axis=1) == labels.reshape(-1)).mean())


def agreement(source: Sequence[Array], converted: Sequence[Array],
              names: Sequence[str] = (), kinds: Sequence[OutputKind] | None = None
              ) -> Agreement:
    """Compare outputs pairwise (by position, or by shape when reordered); ``kinds`` (by
    default :func:`output_kinds` without labels) says which outputs get top-1 agreement."""
    pairs = _match(source, converted)
    labels = list(names) if len(names) == len(pairs) else [str(i) for i in range(len(pairs))]
    errors = [output_error(i, labels[i], a, b) for i, (a, b) in enumerate(pairs)]
    found = list(kinds) if kinds is not None else output_kinds(source, labels)
    top1 = None
    classes = [i for i, k in enumerate(found) if k.kind == CLASS and i < len(pairs)]
    if classes:
        a, b = pairs[classes[0]]
        top1 = round(float((a.argmax(axis=1) == b.argmax(axis=1)).mean()), 6)
    return Agreement(errors, top1, found)


def output_error(index: int, name: str, source: Array, converted: Array) -> OutputError:
    a, b = source.astype(np.float64), converted.astype(np.float64)
    error = a - b
    signal, noise = float(np.mean(a * a)), float(np.mean(error * error))
    numbers = int(a.size // max(a.shape[0], 1)) if a.ndim else 1
    span = float(a.max() - a.min()) if a.size else 0.0
    max_abs = float(np.abs(error).max()) if a.size else 0.0
    mean = float(a.mean()) if a.size else 0.0
    centered = _cosine(a - mean, b - mean) if span > 0 else (1.0 if max_abs == 0 else 0.0)
    small = numbers < SMALL_OUTPUT
    probability = bool(a.size) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    floor = RANGE_FLOOR if probability else OFFSET_FLOOR
    judged = max(span, floor * float(np.abs(a).max())) if a.size else 0.0
    score = (1.0 - RANGE_WEIGHT * min(max_abs / judged, 5.0) if judged > 0 else
             (1.0 if max_abs == 0 else 0.0)) if small else centered
    return OutputError(index, name, numbers, round(_cosine(a, b), 6), round(centered, 6),
                       round(math.sqrt(noise / signal), 6) if signal > 0 else
                       (0.0 if noise == 0 else 1.0),
                       _sqnr(signal, noise), round(max_abs, 6), round(span, 6),
                       round(judged, 6), "range" if small else "centered cosine",
                       round(score, 6), _centered_rel_rms(a, noise))


def _centered_rel_rms(a: Array, noise: float) -> float:
    variation = float(np.mean((a - a.mean()) ** 2)) if a.size else 0.0
    if variation > 0:
        return round(min(math.sqrt(noise / variation), 1e6), 6)
    return 0.0 if noise == 0 else 1e6


def _sqnr(signal: float, noise: float) -> float | None:
    if noise == 0:
        return None
    return round(10 * math.log10(signal / noise), 2) if signal > 0 else -100.0  # all-zero source


def _match(source: Sequence[Array], converted: Sequence[Array]) -> list[tuple[Array, Array]]:
    """Pair outputs by position, or by shape when the converter reordered them."""
    if [s.shape for s in source] == [c.shape for c in converted]:
        return list(zip(source, converted, strict=True))
    remaining = list(converted)
    pairs = []
    for s in source:
        match = next((c for c in remaining if c.shape == s.shape), None)
        if match is None:
            match = next(c for c in remaining if c.size == s.size).reshape(s.shape)
        remaining = [c for c in remaining if c is not match]
        pairs.append((s, match))
    return pairs


def _cosine(a: Array, b: Array) -> float:
    x, y = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return 1.0 if denom == 0.0 else float(np.dot(x, y) / denom)


LATENCY_SECONDS = 2.0  # timed calls of one measurement, at most (MIN_RUNS at least)
MIN_RUNS = 5


def latency_p50_ms(predict: Predict, sample: Mapping[str, Array], runs: int = 50) -> float:
    """The median of ``runs`` timed calls after 5 warm-up calls; a slow model (seconds a
    call at large inputs) gets fewer: warm-up and timed calls stop after
    :data:`LATENCY_SECONDS` each, with :data:`MIN_RUNS` timed calls at least."""
    begun = time.perf_counter()
    for _ in range(5):
        predict(sample)
        if time.perf_counter() - begun > LATENCY_SECONDS:
            break
    times: list[float] = []
    begun = time.perf_counter()
    while len(times) < runs and (len(times) < MIN_RUNS or
                                 time.perf_counter() - begun < LATENCY_SECONDS):
        started = time.perf_counter()
        predict(sample)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1e3, 4)
