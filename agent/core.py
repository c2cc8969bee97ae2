"""The agent: serve the active bundle in-process and count what it does.

``Agent.predict`` is the in-process API. A model swap replaces one reference,
so a request in flight finishes on the model it started on and the next one
uses the new model. A failed load never replaces what is serving.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.drift import DriftSampler
from agent.loader import LoadedModel, load_bundle
from agent.protocol.encryption import DecryptionKeys
from agent.protocol.errors import EdgefleetError
from agent.protocol.signing import TrustedKeys
from agent.runtime.base import Array, check_feeds
from agent.runtime.errors import InferenceError
from agent.shadow import Shadow
from agent.stats import VersionStats

__all__ = ["Agent", "NotReadyError"]


class NotReadyError(EdgefleetError):
    """The agent has no model to serve yet."""

    transient = True


class _Serving:
    """The active model and the stats of its version, swapped as one reference."""

    __slots__ = ("drift", "input_name", "model", "run", "stats")

    def __init__(self, model: LoadedModel, stats: VersionStats) -> None:
        self.model, self.stats, self.run = model, stats, model.runtime.run
        self.input_name = model.runtime.inputs[0].name
        self.drift = DriftSampler(model.bundle.manifest)


class Agent:
    """Serves one active model; thread-safe; loading is verified and never destructive."""

    def __init__(self, trusted: TrustedKeys, *, threads: int = 1,
                 keys: DecryptionKeys | None = None) -> None:
        self.trusted, self.threads = trusted, threads
        self.keys = keys if keys is not None else DecryptionKeys()  # for encrypted models
        self._serving: _Serving | None = None
        self._stats: dict[str, VersionStats] = {}
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
            self._serving = _Serving(loaded, stats)
        for listener in self._listeners:
            listener(loaded)

    def predict(self, inputs: Mapping[str, Array] | Array) -> dict[str, Array]:
        """Run the active model; a bare array feeds the first input."""
        serving = self._serving
        if serving is None:
            raise NotReadyError("no model is loaded", hint="load a bundle first")
        feeds = {serving.input_name: inputs} if isinstance(inputs, np.ndarray) else inputs
        started = time.perf_counter_ns()
        try:
            outputs = serving.run(feeds)
        except Exception as exc:
            serving.stats.error()
            raise _inference_error(serving, feeds, exc) from exc
        ended = time.perf_counter_ns()
        serving.stats.samples.append(ended - started)
        serving.drift.offer(feeds, outputs, started, ended)
        if self._shadow is not None:
            self._shadow.offer(feeds, outputs)
        return outputs

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


def _inference_error(serving: _Serving, feeds: Mapping[str, Array],
                     exc: Exception) -> InferenceError:
    problems = check_feeds(serving.model.runtime.inputs, feeds)
    detail = "; ".join(problems) if problems else f"{type(exc).__name__}: {exc}"
    return InferenceError(f"inference failed: {detail}",
                          hint="send inputs matching GET /v2/models/{name} (names, dtypes, shapes)")

