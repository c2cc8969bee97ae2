"""What the fleet's telemetry says: the latest point of every device, and per-version quality.

Fed from the MQTT thread (``add``), read by the rollout loop and the API. Each point's
``versions`` map gives, per model version, the window's inferences, errors and latency
percentiles; the controller keeps a short history of those per device and version and
sums them into a :class:`fleet.rollout.executor.Quality`: counts add up, p95 is the
inference-weighted mean of the devices' window p95s, agreement the sample-weighted mean
of the devices' latest top-1 agreement.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fleet.rollout.executor import Quality

__all__ = ["TelemetryBook", "VersionKey"]

VersionKey = tuple[str, str]  # (model name, version)
_MAX_POINTS = 120  # per device and version


@dataclass(frozen=True)
class _Window:
    ts_ms: int
    inferences: int
    errors: int
    p95_ms: float | None


class TelemetryBook:
    """Latest values per device and a bounded history per (device, model version)."""

    def __init__(self, window_ms: int = 300_000) -> None:
        self.window_ms = window_ms
        self.latest: dict[str, dict[str, Any]] = {}
        self.latest_ts: dict[str, int] = {}
        self.points = 0  # ingested points, for the ingest counter
        self._history: dict[tuple[str, VersionKey], deque[_Window]] = {}
        self._agreement: dict[tuple[str, VersionKey], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def add(self, device: str, ts_ms: int, values: dict[str, Any]) -> None:
        model = str(values.get("model") or "")
        versions = values.get("versions")
        with self._lock:
            self.points += 1
            if ts_ms >= self.latest_ts.get(device, 0):
                self.latest[device], self.latest_ts[device] = values, ts_ms
            if not model or not isinstance(versions, dict):
                return
            for version, stats in versions.items():
                if isinstance(stats, dict):
                    self._add_version(device, (model, str(version)), ts_ms, stats)

    def _add_version(self, device: str, key: VersionKey, ts_ms: int,
                     stats: dict[str, Any]) -> None:
        inferences, errors = _int(stats.get("inferences")), _int(stats.get("errors"))
        if inferences or errors:
            history = self._history.setdefault((device, key), deque(maxlen=_MAX_POINTS))
            history.append(_Window(ts_ms, inferences, errors, _float(stats.get("latency_p95_ms"))))
        agreement = stats.get("agreement")
        if isinstance(agreement, dict) and agreement.get("top1") is not None:
            self._agreement[(device, key)] = (float(agreement["top1"]),
                                              _int(agreement.get("samples")))

    def quality(self, devices: Iterable[str], key: VersionKey, since_ms: int) -> Quality:
        """``key``'s telemetry on ``devices`` since ``since_ms``."""
        inferences = errors = agreement_samples = 0
        weighted_p95 = p95_weight = agreeing = 0.0
        with self._lock:
            for device in devices:
                for window in self._history.get((device, key), ()):
                    if window.ts_ms < since_ms:
                        continue
                    inferences += window.inferences
                    errors += window.errors
                    if window.p95_ms is not None and window.inferences:
                        weighted_p95 += window.p95_ms * window.inferences
                        p95_weight += window.inferences
                top1, samples = self._agreement.get((device, key), (0.0, 0))
                agreeing += top1 * samples
                agreement_samples += samples
        return Quality(inferences, errors, weighted_p95 / p95_weight if p95_weight else None,
                       agreeing / agreement_samples if agreement_samples else None,
                       agreement_samples)

    def running(self, key: VersionKey) -> list[str]:
        """Devices whose latest point says they serve ``key``."""
        with self._lock:
            return [device for device, values in self.latest.items()
                    if (values.get("model"), values.get("model_version")) == key]

    def forget_agreement(self, devices: Iterable[str], key: VersionKey) -> None:
        with self._lock:
            for device in devices:
                self._agreement.pop((device, key), None)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None
