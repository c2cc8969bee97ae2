"""Drift statistics on the request path, within a CPU budget.

:class:`DriftSampler` feeds a :class:`agent.protocol.drift.DriftWindow` with a sample of
the requests the active model answers. Which requests: a token bucket earns 0.5 % of every
inference's own time plus 5 ms per second of wall time, and a request is summarised when
the bucket holds what the last summary cost (in the thread's CPU time), and at most one
request in four (so the median request never carries a summary). A slow model or a quiet
device is summarised on one request in four; a model serving flat out is summarised on a
small fraction of its requests and spends well under 1 % of its time on it. The window
says how many requests it summarised (``samples``) and out of how many (``requests``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from agent.protocol.drift import DriftWindow, Monitoring, Scale
from agent.protocol.manifest import Manifest, TensorSpec
from agent.runtime.base import Array

__all__ = ["DriftSampler", "scales_of"]

INFERENCE_BUDGET = 0.005  # of each inference's time
WALL_BUDGET = 0.005  # of wall time, so a quiet device summarises everything
# at most one request in SPACING is summarised, so the median request never carries it
SPACING = 4
_MAX_TOKENS_NS = 50_000_000  # never a burst of more than 50 ms of summaries
_BUSY = INFERENCE_BUDGET / WALL_BUDGET  # an inference's ns earn what 1 ns of wall time does


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
    """Summarises a budgeted sample of one model version's requests; drained per window.

    The bucket is kept as a deadline: tokens earned by wall time need no bookkeeping
    per request, so a request that is not summarised costs one subtraction and one
    comparison. With ``B`` the tokens and ``C`` the last summary's cost after a
    summary at ``t``, the bucket holds ``C`` again at the first ``now`` with
    ``B + INFERENCE_BUDGET * busy + WALL_BUDGET * (now - t) >= C``, that is
    ``now >= due`` with ``due = t + (C - B) / WALL_BUDGET - busy * INFERENCE_BUDGET /
    WALL_BUDGET``: every inference moves ``due`` earlier by its time times ``_BUSY``.
    """

    def __init__(self, manifest: Manifest,
                 clock: Callable[[], int] = time.perf_counter_ns,
                 cpu_clock: Callable[[], int] = time.thread_time_ns) -> None:
        """``clock`` (ns) must be the one the request path's timestamps come from; a
        summary's cost is read on ``cpu_clock`` (the calling thread's CPU time, so a
        thread kept waiting by a busy machine does not count its wait as cost)."""
        reference: Monitoring | None = manifest.monitoring
        self._window = DriftWindow(reference, scales_of([*manifest.inputs, *manifest.outputs]),
                                   classifier=manifest.task == "classification")
        self._first = manifest.inputs[0].name
        self._lock, self._cpu_clock = threading.Lock(), cpu_clock
        self._cost = 0
        self._due = clock() - _MAX_TOKENS_NS / WALL_BUDGET  # a full bucket
        self._requests = 0
        self._since = SPACING  # requests since the last summary

    def offer(self, inputs: Mapping[str, Array] | Array, outputs: Mapping[str, Array],
              started_ns: int, ended_ns: int) -> None:
        """Called on the request path after a successful inference (a bare array stands
        for the model's first input)."""
        self._requests += 1
        self._since += 1
        self._due -= (ended_ns - started_ns) * _BUSY
        if ended_ns >= self._due and self._since >= SPACING:
            self._since = 0
            self._summarise(inputs, outputs, ended_ns)

    def _summarise(self, inputs: Mapping[str, Array] | Array, outputs: Mapping[str, Array],
                   ended_ns: int) -> None:
        tokens = self._cost + (ended_ns - self._due) * WALL_BUDGET  # what the bucket holds
        feeds = {self._first: inputs} if isinstance(inputs, np.ndarray) else inputs
        began = self._cpu_clock()
        with self._lock:
            self._window.add(feeds, outputs)
        cost = self._cpu_clock() - began
        tokens = min(tokens - cost, _MAX_TOKENS_NS)
        self._cost = cost
        self._due = ended_ns + (cost - tokens) / WALL_BUDGET

    def drain(self) -> dict[str, Any] | None:
        """The window that ends now (None when no request was summarised)."""
        with self._lock:
            window = self._window.drain()
            requests, self._requests = self._requests, 0
        if window is not None:
            window["requests"] = requests
        return window
