"""Measure a converted model against its source: accuracy, agreement, latency, size."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.runtime.base import Array
from converter.data import Dataset

__all__ = ["Agreement", "accuracy", "agreement", "is_classifier", "latency_p50_ms", "run_batched"]

Predict = Callable[[Mapping[str, Array]], list[Array]]


@dataclass(frozen=True)
class Agreement:
    """Per output: cosine similarity and max abs error; top-1 agreement for classifiers."""

    cosine: list[float]
    max_abs_error: list[float]
    top1: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"cosine": self.cosine, "max_abs_error": self.max_abs_error, "top1": self.top1}


def run_batched(predict: Predict, data: Dataset, batch: int = 64,
                on_batch: Callable[[int, int], None] = lambda done, total: None) -> list[Array]:
    parts = []
    for feeds in data.batches(batch):
        parts.append(predict(feeds))
        on_batch(min(len(parts) * batch, len(data)), len(data))
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def is_classifier(outputs: Sequence[Array]) -> bool:
    first = outputs[0]
    return first.ndim == 2 and first.shape[1] > 1


def accuracy(outputs: Sequence[Array], labels: Array) -> float:
    return float((np.asarray(outputs[0]).argmax(axis=1) == labels.reshape(-1)).mean())


def agreement(source: Sequence[Array], converted: Sequence[Array]) -> Agreement:
    pairs = _match(source, converted)
    cosine = [_cosine(a, b) for a, b in pairs]
    max_abs = [float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) for a, b in pairs]
    top1 = None
    if is_classifier(source):
        a, b = pairs[0]
        top1 = float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
    return Agreement([round(c, 6) for c in cosine], [round(m, 6) for m in max_abs],
                     None if top1 is None else round(top1, 6))


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


def latency_p50_ms(predict: Predict, sample: Mapping[str, Array], runs: int = 50) -> float:
    for _ in range(5):
        predict(sample)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        predict(sample)
        times.append(time.perf_counter() - started)
    return round(float(np.median(times)) * 1e3, 4)
