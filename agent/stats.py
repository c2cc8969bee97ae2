"""Per-version inference counters and latency samples, drained once per telemetry window.

Recording a latency is one ``list.append`` on the caller's thread (the list is
never replaced, so a caller may keep its bound ``append``), an error a counter
bump under a lock: nothing here blocks inference. Percentiles are computed when
a window is drained, on the telemetry thread.

The list is bounded off the request path: once ``CAP`` latencies wait in it,
:meth:`VersionStats.trim` (run by the agent's background worker, see
``agent.drift.DriftWorker``) folds them into a reservoir of ``RESERVOIR`` latencies,
a uniform random sample of the window so far (Vitter's algorithm R). A window
that was folded publishes the percentiles of that sample (estimates: the rank error
of a percentile is about ``sqrt(p * (1 - p) / RESERVOIR)``, under 0.1 % of the window
at p99); a window that was not, the exact ones. Counts are always exact.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["CAP", "RESERVOIR", "VersionStats", "WindowSummary"]

CAP = 100_000  # latencies kept as they come (~3.6 MB) before they are folded
RESERVOIR = 16_384  # latencies a folded window keeps: a uniform sample of it

Latencies = npt.NDArray[np.int64]


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
    """Latency samples (ns) and error count of one model version in the current window.

    ``total_inferences`` counts the drained and the folded latencies, so
    ``total_inferences + len(samples)`` is every inference recorded so far.
    """

    __slots__ = ("_errors", "_folded", "_kept", "_lock", "_rng", "_started", "samples",
                 "total_errors", "total_inferences")

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._errors = 0
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._kept: Latencies = np.empty(0, np.int64)  # the reservoir of a folded window
        self._folded = 0  # latencies of this window the reservoir stands for
        self._rng: np.random.Generator | None = None
        self.total_inferences = 0
        self.total_errors = 0

    def error(self) -> None:
        with self._lock:
            self._errors += 1

    @property
    def pending_errors(self) -> int:
        """Errors in the current (not yet drained) window."""
        return self._errors

    def trim(self) -> None:
        """Fold the waiting latencies into the reservoir once ``CAP`` of them wait."""
        if len(self.samples) >= CAP:
            with self._lock:
                self._fold(self._take())

    def drain(self) -> WindowSummary:
        """Summarise the window that ends now and start a new one."""
        with self._lock:
            taken = self._take()
            errors, self._errors = self._errors, 0
            self.total_errors += errors
            folded: Latencies | None = None
            if self._folded:  # a folded window: its reservoir, with what came since
                self._fold(taken)
                count, folded = self._folded, self._kept
                self._folded, self._kept = 0, np.empty(0, np.int64)
            else:
                count = len(taken)
                self.total_inferences += count
        latencies = folded if folded is not None else np.asarray(taken, dtype=np.int64)
        now = time.monotonic()
        elapsed, self._started = max(now - self._started, 1e-9), now
        if not count:
            return WindowSummary(0, errors, None, None, None, 0.0)
        p50, p95, p99 = np.percentile(latencies.astype(np.float64) / 1e6, [50, 95, 99])
        return WindowSummary(count, errors, round(float(p50), 4), round(float(p95), 4),
                             round(float(p99), 4), round(count / elapsed, 2))

    def _take(self) -> list[int]:
        # Take the waiting samples in place: appends racing with this land after them.
        taken = self.samples[:]
        del self.samples[:len(taken)]
        return taken

    def _fold(self, taken: list[int]) -> None:
        """Algorithm R over ``taken``: latency ``i`` of the window (0-based) replaces a
        uniform slot ``j`` in ``[0, i]`` when ``j < RESERVOIR``, later ones winning."""
        values = np.asarray(taken, dtype=np.int64)
        seen, room = self._folded, max(RESERVOIR - self._folded, 0)
        kept = np.concatenate([self._kept, values[:room]])
        rest = values[room:]
        if len(rest):
            rng = self._rng = self._rng or np.random.default_rng()
            index = np.arange(seen + room, seen + len(values), dtype=np.float64)
            slot = (rng.random(len(rest)) * (index + 1)).astype(np.int64)
            hit = np.flatnonzero(slot < RESERVOIR)[::-1]  # latest first
            slots, first = np.unique(slot[hit], return_index=True)  # the latest per slot
            kept[slots] = rest[hit[first]]
        self._kept, self._folded = kept, seen + len(values)
        self.total_inferences += len(values)
