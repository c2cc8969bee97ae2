"""Drift statistics on the request path, within a CPU budget.

:class:`DriftSampler` feeds a :class:`agent.protocol.drift.DriftWindow` with a sample of
the requests the active model answers. Which requests: a token bucket earns 2 % of every
inference's own time plus 5 ms per second of wall time, and a request is summarised when
the bucket holds what the last summary cost. A slow model or a quiet device is summarised
on every request; a 10 µs model serving flat out is summarised on about one request in
a hundred and never spends more than a few percent of its time on it. The window says
how many requests it summarised (``samples``) and out of how many (``requests``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from agent.protocol.drift import DriftWindow, Monitoring, Scale
from agent.protocol.manifest import Manifest, TensorSpec
from agent.runtime.base import Array

__all__ = ["DriftSampler", "scales_of"]

INFERENCE_BUDGET = 0.02  # of each inference's time
WALL_BUDGET = 0.005  # of wall time, so a quiet device summarises everything
_MAX_TOKENS_NS = 50_000_000  # never a burst of more than 50 ms of summaries


def scales_of(specs: list[TensorSpec]) -> dict[str, Scale]:
    """(scale, zero point) of every per-tensor quantized integer tensor."""
    found: dict[str, Scale] = {}
    for spec in specs:
        q = spec.quantization
        if q is not None and len(q.scale) == 1 and q.scale[0] and spec.dtype.startswith(
                ("int", "uint")):
            found[spec.name] = (float(q.scale[0]), int(q.zero_point[0] if q.zero_point else 0))
    return found


class DriftSampler:
    """Summarises a budgeted sample of one model version's requests; drained per window."""

    def __init__(self, manifest: Manifest) -> None:
        reference: Monitoring | None = manifest.monitoring
        self._window = DriftWindow(reference, scales_of([*manifest.inputs, *manifest.outputs]),
                                   classifier=manifest.task == "classification")
        self._lock = threading.Lock()
        self._tokens = float(_MAX_TOKENS_NS)
        self._cost = 0.0
        self._last_ns = time.perf_counter_ns()
        self._requests = 0

    def offer(self, feeds: Mapping[str, Array], outputs: Mapping[str, Array],
              started_ns: int, ended_ns: int) -> None:
        """Called on the request path after a successful inference."""
        self._requests += 1
        tokens = (self._tokens + (ended_ns - started_ns) * INFERENCE_BUDGET
                  + (ended_ns - self._last_ns) * WALL_BUDGET)
        self._last_ns = ended_ns
        if tokens < self._cost:
            self._tokens = tokens
            return
        with self._lock:
            self._window.add(feeds, outputs)
        cost = time.perf_counter_ns() - ended_ns
        self._cost = float(cost)
        self._tokens = min(tokens - cost, _MAX_TOKENS_NS)

    def drain(self) -> dict[str, Any] | None:
        """The window that ends now (None when no request was summarised)."""
        with self._lock:
            window = self._window.drain()
            requests, self._requests = self._requests, 0
        if window is not None:
            window["requests"] = requests
        return window
