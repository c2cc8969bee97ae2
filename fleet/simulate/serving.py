"""A simulated device's synthetic requests, counted the way
:class:`edgefleet.agent.core.Agent` counts them.

Requests are not run one by one: when a telemetry window closes, the device
draws how many arrived (Poisson at ``rate``), which health input each one was
(uniformly), which failed, and gives each success the latency measured for its
input row times the device's latency factor (with a little log-normal jitter).
The values have the exact shape of ``Agent.telemetry_values``: flat figures of
the active version, a ``versions`` map with every version the device served,
and during probation ``agreement`` from every ``sample_every``-th success, as
``agent.shadow.Shadow`` samples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.agent.update.device import UpdateSettings
from edgefleet.fleet.simulate.agreement import AgreementTable, ShadowTally
from edgefleet.fleet.simulate.models import ModelProfile

__all__ = ["Load", "Serving"]

JITTER = 0.15  # sigma of the log-normal noise on each request's latency


@dataclass(frozen=True)
class Load:
    """How the active model is used in a window: rate, latency factor, wrong answers, errors."""

    rate: float
    latency_factor: float = 1.0
    wrong_rate: float = 0.0
    error_rate: float = 0.0
    sample_every: int = 10
    drifting: bool = False  # the inputs come from another world than the reference's


class Serving:
    """The active model, per-version totals and the probation shadow of one device."""

    __slots__ = ("_count", "_last", "active", "cpu_percent", "shadow", "totals")

    def __init__(self) -> None:
        self.active: ModelProfile | None = None
        self.totals: dict[str, list[int]] = {}  # version -> [inferences_total, errors_total]
        self.shadow: ShadowTally | None = None
        self.cpu_percent = 0.0
        self._count = 0  # successes on the active model since the shadow started
        self._last = time.monotonic()

    def activate(self, profile: ModelProfile) -> None:
        self.active = profile
        self.totals.setdefault(profile.version, [0, 0])

    def start_shadow(self, against: str, table: AgreementTable | None) -> None:
        self.shadow, self._count = ShadowTally(against, table), 0

    def stop_shadow(self) -> None:
        self.shadow = None

    def window(self, rng: np.random.Generator, load: Load) -> dict[str, Any]:
        """Serve the window that ends now; return ``Agent.telemetry_values()``'s dict."""
        now = time.monotonic()
        elapsed, self._last = max(now - self._last, 1e-9), now
        versions: dict[str, dict[str, Any]] = {v: _summary(0, 0, None, elapsed)
                                               for v in self.totals}
        values: dict[str, Any] = {"versions": versions}
        active = self.active
        if active is None:
            self.cpu_percent = 0.0
            return values
        current = self._serve(rng, load, active, elapsed)
        versions[active.version] = current
        totals = self.totals[active.version]
        values.update(model=active.ref.name, model_version=active.version, **current,
                      inferences_total=totals[0], errors_total=totals[1])
        if active.drift is not None:
            window = active.drift.window(rng, current["inferences"], load.drifting, elapsed)
            if window is not None:
                values["drift"] = window
        if self.shadow is not None:
            agreement = self.shadow.values()
            values["agreement"] = current["agreement"] = agreement
        return values

    def gate_failed(self, target_version: str, settings: UpdateSettings) -> bool:
        """``DeviceEffects._gate_failed``: the agreement or the error-rate gate fires."""
        if self.active is None or self.active.version != target_version:
            return False
        if self.shadow is not None and settings.min_agreement is not None:
            top1, samples = self.shadow.values()["top1"], self.shadow.samples
            if (top1 is not None and samples >= settings.min_agreement_samples
                    and top1 < settings.min_agreement):
                return True
        inferences, errors = self.totals[self.active.version]
        total = inferences + errors
        return total >= settings.min_requests and errors / total > settings.max_error_rate

    def _serve(self, rng: np.random.Generator, load: Load, active: ModelProfile,
               elapsed: float) -> dict[str, Any]:
        n = int(rng.poisson(load.rate * elapsed)) if load.rate else 0
        errors = int(rng.binomial(n, load.error_rate)) if n and load.error_rate else 0
        ok = n - errors
        rows = rng.integers(0, active.latency_ms.size, ok)
        latency = active.latency_ms[rows] * load.latency_factor * rng.lognormal(0.0, JITTER, ok)
        totals = self.totals[active.version]
        totals[0] += ok
        totals[1] += errors
        self.cpu_percent = round(min(100.0, float(latency.sum()) / (elapsed * 10.0)), 1)
        if self.shadow is not None:
            self._sample(rng, load, rows)
        return _summary(ok, errors, latency, elapsed)

    def _sample(self, rng: np.random.Generator, load: Load, rows: np.ndarray[Any, Any]) -> None:
        """Every ``sample_every``-th success goes to the shadow (``Shadow.offer``)."""
        every = max(1, load.sample_every)
        first = every - 1 - self._count % every
        self._count += rows.size
        sampled = rows[first::every]
        assert self.shadow is not None
        self.shadow.record(sampled, rng.random(sampled.size) < load.wrong_rate)


def _summary(ok: int, errors: int, latency: np.ndarray[Any, Any] | None,
             elapsed: float) -> dict[str, Any]:
    """``WindowSummary.as_values()`` of one version's window."""
    if latency is None or not latency.size:
        p50 = p95 = p99 = None
    else:
        ordered = np.sort(latency).tolist()
        p50, p95, p99 = (round(_percentile(ordered, q), 4) for q in (0.50, 0.95, 0.99))
    return {"inferences": ok, "errors": errors, "latency_p50_ms": p50,
            "latency_p95_ms": p95, "latency_p99_ms": p99,
            "throughput_rps": round(ok / elapsed, 2)}


def _percentile(ordered: list[float], q: float) -> float:
    """``np.percentile``'s default (linear) on sorted values, without its overhead."""
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
