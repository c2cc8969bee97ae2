"""Drift windows of simulated devices, drawn from the bundle's reference statistics.

A simulated device runs no model per request, so it has no inputs to summarise; it
draws the counts a real device's :class:`edgefleet.agent.protocol.drift.DriftWindow` would report
from the reference distributions in the manifest (``monitoring``): multinomial counts
over the reference's bins, so a device that sees the reference's world reports windows
whose PSI is the sampling noise a real one shows. A ``drifting`` device (its camera sees
another world) draws from shifted distributions: input summaries moved up
:data:`SHIFT_BINS` bins, half its answers collapsed on the reference's commonest
class, and its confidence moved down :data:`SHIFT_BINS` bins, the way washed-out
images move a real classifier.

As on a real device, one request in :data:`edgefleet.agent.drift.SPACING` at most is summarised,
and :data:`edgefleet.agent.drift.MAX_RATE` a second at most.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edgefleet.agent.drift import MAX_RATE, SPACING
from edgefleet.agent.protocol.drift import Monitoring

__all__ = ["SHIFT_BINS", "DriftDraw"]

SHIFT_BINS = 3  # how far a drifting device's histograms move
_Probabilities = npt.NDArray[np.float64]


def _normalised(p: list[float] | _Probabilities) -> _Probabilities:
    values = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    total = values.sum()
    return values / total if total > 0 else np.full(values.size, 1.0 / max(values.size, 1))


def _shifted(p: _Probabilities, bins: int) -> _Probabilities:
    """``p`` moved ``bins`` bins up (negative: down); mass past the end stays in the end bin."""
    moved = np.zeros_like(p)
    for i, mass in enumerate(p):
        moved[min(max(i + bins, 0), p.size - 1)] += mass
    return moved


class _Feature:
    """One histogram a window reports: calm and drifting bin probabilities."""

    __slots__ = ("calm", "drifting")

    def __init__(self, calm: _Probabilities, drifting: _Probabilities) -> None:
        self.calm, self.drifting = calm, drifting

    def draw(self, rng: np.random.Generator, n: int, drifting: bool) -> list[int]:
        counts: list[int] = rng.multinomial(n, self.drifting if drifting else self.calm).tolist()
        return counts


class DriftDraw:
    """Windows of one model version, from its manifest's reference statistics."""

    def __init__(self, reference: Monitoring) -> None:
        self.reference = reference
        self._inputs = {name: _Feature(p := _normalised(ref.hist), _shifted(p, SHIFT_BINS))
                        for name, ref in reference.inputs.items()}
        self._outputs: dict[str, dict[str, _Feature]] = {}
        for name, out in reference.outputs.items():
            if out.kind == "classes" and out.classes and out.confidence_hist:
                classes = _normalised(out.classes)
                collapsed = np.zeros_like(classes)
                collapsed[int(classes.argmax())] = 1.0
                confidence = _normalised(out.confidence_hist)
                self._outputs[name] = {
                    "classes": _Feature(classes, 0.5 * classes + 0.5 * collapsed),
                    "confidence_hist": _Feature(confidence, _shifted(confidence, -SHIFT_BINS))}
            elif out.values is not None:
                p = _normalised(out.values.hist)
                self._outputs[name] = {"hist": _Feature(p, _shifted(p, SHIFT_BINS))}

    def window(self, rng: np.random.Generator, requests: int, drifting: bool,
               seconds: float) -> dict[str, Any] | None:
        """The window of ``requests`` answered in ``seconds`` (None when none is
        summarised)."""
        n = min(requests // SPACING, int(MAX_RATE * seconds))
        if n < 1:
            return None
        inputs = {}
        for name, feature in self._inputs.items():
            ref = self.reference.inputs[name]
            shift = ref.std if drifting else 0.0
            inputs[name] = {"n": n, "mean": round(ref.mean + shift, 6), "std": ref.std,
                            "min": ref.min, "max": ref.max,
                            "hist": feature.draw(rng, n, drifting)}
        outputs: dict[str, dict[str, Any]] = {}
        for name, features in self._outputs.items():
            drawn: dict[str, Any] = {"n": n}
            for key, feature in features.items():
                drawn[key] = feature.draw(rng, n, drifting)
            if "confidence_hist" in drawn:  # the mean of the drawn bins' centres
                hist = drawn["confidence_hist"]
                drawn["confidence_mean"] = round(
                    sum(c * (i + 0.5) for i, c in enumerate(hist)) / (len(hist) * n), 6)
            outputs[name] = drawn
        return {"samples": n, "requests": requests, "inputs": inputs, "outputs": outputs}
