"""The health check a bundle must pass on this device before it serves."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgefleet.agent.errors import AgentError
from edgefleet.agent.protocol.health import HealthData
from edgefleet.agent.runtime.base import Array, Runtime
from edgefleet.agent.runtime.errors import InferenceError

__all__ = ["HealthCheckError", "HealthResult", "run_health_check"]


class HealthCheckError(AgentError):
    """The model loads but its outputs (or latency) on this device are out of tolerance."""


@dataclass(frozen=True)
class HealthResult:
    max_abs_error: float
    latency_ms: float


def run_health_check(runtime: Runtime, health: HealthData,
                     latency_budget_ms: float | None = None) -> HealthResult:
    """Run the bundle's health inputs; raise :class:`HealthCheckError` naming what failed."""
    started = time.perf_counter()
    try:
        outputs = runtime.run(health.inputs)
    except (ValueError, RuntimeError, InferenceError) as exc:
        raise HealthCheckError(f"health check inputs do not run: {exc}",
                               hint="the bundle's health.npz does not fit its model; rebuild it"
                               ) from exc
    latency_ms = (time.perf_counter() - started) * 1e3 / max(_rows(health), 1)
    worst = 0.0
    for name, expected in health.outputs.items():
        worst = max(worst, _compare(name, outputs.get(name), expected, health))
    if latency_budget_ms is not None and latency_ms > latency_budget_ms:
        raise HealthCheckError(f"health check latency {latency_ms:.2f} ms per sample exceeds "
                               f"the budget of {latency_budget_ms:.2f} ms",
                               hint="use a smaller or quantized model for this device")
    return HealthResult(worst, latency_ms)


def _rows(health: HealthData) -> int:
    first = next(iter(health.inputs.values()))
    return int(first.shape[0]) if first.ndim else 1


def _compare(name: str, got: Array | None, expected: Array,
             health: HealthData) -> float:
    if got is None:
        raise HealthCheckError(f"health check: model has no output {name!r}",
                               hint="rebuild the bundle from this model")
    if got.shape != expected.shape:
        raise HealthCheckError(f"health check: output {name!r} has shape {list(got.shape)}, "
                               f"expected {list(expected.shape)}", hint="rebuild the bundle")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    limit = health.atol + health.rtol * np.abs(expected.astype(np.float64))
    if np.any(diff > limit):
        raise HealthCheckError(
            f"health check: output {name!r} differs by up to {float(diff.max()):.4g} "
            f"(tolerance atol={health.atol:g}, rtol={health.rtol:g})",
            hint="the model computes differently on this device; do not deploy it here")
    return float(diff.max()) if diff.size else 0.0
