"""Per-version inference counters and latency samples, drained once per telemetry window.

Recording a latency is one ``list.append`` on the caller's thread (the list is
never replaced, so a caller may keep its bound ``append``), an error a counter
bump under a lock: nothing here blocks inference. Percentiles are computed when
a window is drained, on the telemetry thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["VersionStats", "WindowSummary"]


@dataclass(frozen=True)
class WindowSummary:
    inferences: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    throughput_rps: float

    def as_values(self) -> dict[str, float | int | None]:
        return {"inferences": self.inferences, "errors": self.errors,
                "latency_p50_ms": self.p50_ms, "latency_p95_ms": self.p95_ms,
                "latency_p99_ms": self.p99_ms, "throughput_rps": self.throughput_rps}


class VersionStats:
    """Latency samples (ns) and error count of one model version in the current window."""

    __slots__ = ("_errors", "_lock", "_started", "samples", "total_errors", "total_inferences")

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._errors = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self.total_inferences = 0
        self.total_errors = 0

    def error(self) -> None:
        with self._lock:
            self._errors += 1

    @property
    def pending_errors(self) -> int:
        """Errors in the current (not yet drained) window."""
        return self._errors

    def drain(self) -> WindowSummary:
        """Summarise the window that ends now and start a new one."""
        # Take the window's samples in place: appends racing with this land after them.
        samples = self.samples[:]
        del self.samples[:len(samples)]
        with self._lock:
            errors, self._errors = self._errors, 0
        now = time.monotonic()
        elapsed, self._started = max(now - self._started, 1e-9), now
        self.total_inferences += len(samples)
        self.total_errors += errors
        if not samples:
            return WindowSummary(0, errors, None, None, None, 0.0)
        p50, p95, p99 = np.percentile(np.asarray(samples, dtype=np.float64) / 1e6, [50, 95, 99])
        return WindowSummary(len(samples), errors, round(float(p50), 4), round(float(p95), 4),
                             round(float(p99), 4), round(len(samples) / elapsed, 2))
