"""The agent: serve the active bundle in-process and count what it does.

``Agent.predict`` is the in-process API. A model swap replaces one reference,
so a request in flight finishes on the model it started on and the next one
uses the new model. A failed load never replaces what is serving. One background
thread per agent (``agent.drift.DriftWorker``, started with the first model)
summarises the drift samples and keeps the latency lists bounded; ``close`` ends it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.drift import DriftSampler, DriftWorker
from edgefleet.agent.errors import AgentError
from edgefleet.agent.loader import LoadedModel, load_bundle
from edgefleet.agent.protocol.encryption import DecryptionKeys
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.runtime.base import Array, check_feeds
from edgefleet.agent.runtime.errors import InferenceError, ModelClosedError
from edgefleet.agent.shadow import Shadow
from edgefleet.agent.stats import VersionStats

__all__ = ["Agent", "NotReadyError"]

_clock = time.perf_counter_ns


class NotReadyError(AgentError):
    """The agent has no model to serve yet."""

    transient = True


class _Serving:
    """The active model, its version's stats and its drift sampler, swapped as one
    reference; the request path's callables are bound here once per loaded model."""

    __slots__ = ("drift", "input_name", "model", "offer", "record", "run_array", "run_feeds",
                 "stats")

    def __init__(self, model: LoadedModel, stats: VersionStats, worker: DriftWorker) -> None:
        runtime = model.runtime
        self.model, self.stats, self.input_name = model, stats, runtime.inputs[0].name
        self.run_array, self.run_feeds = runtime.run_array, runtime.run
        self.record = stats.samples.append  # the list is never replaced (VersionStats)
        self.drift = DriftSampler(model.bundle.manifest, worker=worker)
        self.offer = self.drift.offer

    def single(self, feeds: Mapping[str, Array]) -> Array | None:
        """The array of a request feeding only the first input (``run_array``'s case)."""
        if len(feeds) == 1:
            value = feeds.get(self.input_name)
            if isinstance(value, np.ndarray):
                return value
        return None

    def feeds(self, inputs: Mapping[str, Array] | Array) -> Mapping[str, Array]:
        return {self.input_name: inputs} if isinstance(inputs, np.ndarray) else inputs

    def run(self, inputs: Mapping[str, Array] | Array) -> dict[str, Array]:
        return self.run_feeds(self.feeds(inputs))


class Agent:
    """Serves one active model; thread-safe; loading is verified and never destructive."""

    def __init__(self, trusted: TrustedKeys, *, threads: int = 1,
                 keys: DecryptionKeys | None = None) -> None:
        self.trusted, self.threads = trusted, threads
        self.keys = keys if keys is not None else DecryptionKeys()  # for encrypted models
        self._serving: _Serving | None = None
        self._stats: dict[str, VersionStats] = {}
        # the thread holds the stats map, never the agent: a dropped agent ends it
        self._worker = DriftWorker(upkeep=partial(_trim, self._stats))
        self._swap_lock = threading.Lock()
        self._listeners: list[Callable[[LoadedModel], None]] = []
        self._shadow: Shadow | None = None
        self.started = time.time()

    @property
    def model(self) -> LoadedModel | None:
        serving = self._serving
        return serving.model if serving else None

    @property
    def ready(self) -> bool:
        return self._serving is not None

    def on_change(self, listener: Callable[[LoadedModel], None]) -> None:
        self._listeners.append(listener)

    def trust(self, trusted: TrustedKeys) -> None:
        """Verify bundles against ``trusted`` from now on (a new fleet keyring). Every check
        reads ``self.trusted`` when it runs: the model being served stays."""
        self.trusted = trusted

    def load(self, source: Path | bytes) -> LoadedModel:
        """Verify, load and health-check ``source``, then make it the active model."""
        loaded = load_bundle(source, self.trusted, threads=self.threads, keys=self.keys)
        self.activate(loaded)
        return loaded

    def activate(self, loaded: LoadedModel) -> None:
        with self._swap_lock:
            stats = self._stats.setdefault(loaded.version, VersionStats())
            # The replaced runtime is freed when the last request holding it returns.
            self._serving = _Serving(loaded, stats, self._worker.start())
        for listener in self._listeners:
            listener(loaded)

    def predict(self, inputs: Mapping[str, Array] | Array) -> dict[str, Array]:
        """Run the active model; a bare array feeds the first input.

        The request path is kept to what it must do (it is most of the overhead of a
        model that answers in microseconds): the runtime's ``run_array``, two clock
        reads, a latency ``append``, the drift sampler's deadline check, the shadow check.
        """
        serving = self._serving
        if serving is None:
            raise NotReadyError("no model is loaded", hint="load a bundle first")
        array = inputs if isinstance(inputs, np.ndarray) else serving.single(inputs)
        started = _clock()
        try:
            outputs = serving.run(inputs) if array is None else serving.run_array(array)
        except Exception as exc:
            serving.stats.error()
            if isinstance(exc, ModelClosedError):
                raise
            raise _inference_error(serving, serving.feeds(inputs), exc) from exc
        ended = _clock()
        serving.record(ended - started)
        serving.offer(inputs, outputs, started, ended)
        shadow = self._shadow
        if shadow is not None:
            shadow.offer(serving.feeds(inputs), outputs)
        return outputs

    def close(self) -> None:
        """Stop serving (``predict`` raises ``NotReadyError`` until a model is loaded again)
        and end the agent's threads: the drift worker, after the summaries it was handed,
        and the shadow."""
        self.stop_shadow()
        with self._swap_lock:
            self._serving = None
        self._worker.stop()

    def start_shadow(self, previous: LoadedModel, sample_every: int = 10) -> None:
        """During probation: compare a sample of live answers with ``previous``."""
        self.stop_shadow()
        self._shadow = Shadow(previous, sample_every)

    def stop_shadow(self) -> None:
        shadow, self._shadow = self._shadow, None
        if shadow is not None:
            shadow.stop()

    @property
    def agreement(self) -> dict[str, Any] | None:
        shadow = self._shadow
        return shadow.values() if shadow is not None else None

    def stats_of(self, version: str) -> VersionStats:
        """The counters of one model version (created empty if it has not served yet)."""
        return self._stats.setdefault(version, VersionStats())

    def telemetry_values(self) -> dict[str, Any]:
        """Drain every version's window: flat keys for the active one, and a per-version map."""
        serving = self._serving
        versions: dict[str, dict[str, Any]] = {
            version: dict(stats.drain().as_values()) for version, stats in self._stats.items()}
        values: dict[str, Any] = {"versions": versions}
        if serving is not None:
            values.update(model=serving.model.name, model_version=serving.model.version,
                          **versions[serving.model.version])
            drift = serving.drift.drain()
            if drift is not None:
                values["drift"] = drift
            values["inferences_total"] = serving.stats.total_inferences
            values["errors_total"] = serving.stats.total_errors
            agreement = self.agreement
            if agreement is not None:
                values["agreement"] = agreement
                versions[serving.model.version]["agreement"] = agreement
        return values


def _trim(stats: dict[str, VersionStats]) -> None:
    """The drift worker's upkeep: keep every version's latency list bounded."""
    for version_stats in list(stats.values()):
        version_stats.trim()


def _inference_error(serving: _Serving, feeds: Mapping[str, Array],
                     exc: Exception) -> InferenceError:
    problems = check_feeds(serving.model.runtime.inputs, feeds)
    detail = "; ".join(problems) if problems else f"{type(exc).__name__}: {exc}"
    return InferenceError(f"inference failed: {detail}",
                          hint="send inputs matching GET /v2/models/{name} (names, dtypes, shapes)")

