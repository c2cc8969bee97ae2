"""Probation agreement from cached outputs, computed as :mod:`edgefleet.agent.shadow` computes it.

For a pair (new model, previous model) and the new bundle's health inputs, one
:class:`AgreementTable` holds, per input row, whether the top-1 classes agree
and the cosine of the two outputs, both for the new model's real answer and
for a wrong answer (the output rotated by one class, what ``disagree`` devices
send). A device's shadow then only sums table entries for its sampled requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["AgreementTable", "ShadowTally", "compare", "wrong_answer"]

Array = npt.NDArray[Any]


def wrong_answer(output: Array) -> Array:
    """A wrong answer of the same shape: the scores moved one class along."""
    return np.roll(output, 1, axis=-1)


def compare(new: Array, old: Array) -> tuple[bool, float]:
    """Top-1 agreement and cosine of one request's outputs (``agent.shadow.Shadow._record``)."""
    a, b = np.asarray(new, np.float64), np.asarray(old, np.float64)
    agree = a.shape == b.shape and a.ndim == 2 and a.shape[1] > 1 and bool(
        np.all(a.argmax(1) == b.argmax(1)))
    x, y = a.reshape(-1), b.reshape(-1)
    denom = float(np.linalg.norm(x) * np.linalg.norm(y)) if x.size == y.size else 0.0
    return agree, float(np.dot(x, y) / denom) if denom else 0.0


@dataclass(frozen=True)
class AgreementTable:
    """Per input row: agreement and cosine of the right (index 0) and wrong (1) answer."""

    top1: npt.NDArray[np.bool_]  # shape (2, rows)
    cosine: npt.NDArray[np.float64]  # shape (2, rows)

    @classmethod
    def build(cls, new: list[Array], old: list[Array]) -> AgreementTable:
        pairs = [[compare(n, o) for n, o in zip(new, old, strict=True)],
                 [compare(wrong_answer(n), o) for n, o in zip(new, old, strict=True)]]
        return cls(np.array([[p[0] for p in row] for row in pairs], dtype=bool),
                   np.array([[p[1] for p in row] for row in pairs], dtype=np.float64))


class ShadowTally:
    """One device's running agreement since its switch (``agent.shadow.Shadow.values``)."""

    __slots__ = ("against", "agreeing", "cosine_sum", "samples", "table")

    def __init__(self, against: str, table: AgreementTable | None) -> None:
        self.against = against  # the previous model's version
        self.table = table  # None: the previous model refuses the new inputs (no samples)
        self.samples = self.agreeing = 0
        self.cosine_sum = 0.0

    def record(self, rows: npt.NDArray[np.int64], wrong: npt.NDArray[np.bool_]) -> None:
        """Sampled requests: which input rows, and which were answered wrongly."""
        if self.table is None or not rows.size:
            return
        kind = wrong.astype(np.int64)
        self.samples += int(rows.size)
        self.agreeing += int(self.table.top1[kind, rows].sum())
        self.cosine_sum += float(self.table.cosine[kind, rows].sum())

    def values(self) -> dict[str, Any]:
        n = self.samples
        return {"against": self.against, "samples": n,
                "dropped": 0, "top1": round(self.agreeing / n, 6) if n else None,
                "cosine": round(self.cosine_sum / n, 6) if n else None}
