"""The models a simulated fleet runs: verified once, loaded once, each input run once.

Bundles are verified (``read_bundle`` with the trusted keys) once per content
digest and loaded and health-checked (``load_bundle``) once per manifest sha256,
for all devices together. Each model then runs every health input row of a
bundle one row at a time, under one lock (LiteRT interpreters are not
thread-safe); the outputs and the measured latency are what every simulated
request reuses. A failure is cached too and raised again, as a fresh copy, for
every device that asks.
"""

from __future__ import annotations

import copy
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from edgefleet.agent.loader import LoadedModel, load_bundle
from edgefleet.agent.protocol.bundle import Bundle, read_bundle
from edgefleet.agent.protocol.health import HealthData
from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.shadow import as_inputs_of
from edgefleet.fleet.simulate.agreement import AgreementTable
from edgefleet.fleet.simulate.drift import DriftDraw
from edgefleet.fleet.simulate.options import SimulationError

__all__ = ["ModelCache", "ModelProfile"]

Array = npt.NDArray[Any]
Feeds = dict[str, Array]
T = TypeVar("T")
TIMED_RUNS = 3  # runs per input row; the median is the row's latency


@dataclass(frozen=True)
class ModelProfile:
    """A loaded model as devices see it: identity, health latency, per-row request latency."""

    ref: BundleRef
    health_latency_ms: float  # per sample, measured by the health check here
    latency_ms: npt.NDArray[np.float64]  # per health input row, measured here
    drift: DriftDraw | None = None  # windows drawn from the manifest's reference statistics

    @property
    def version(self) -> str:
        return self.ref.version

    @property
    def sha256(self) -> str:
        return self.ref.sha256


class ModelCache:
    """Verified bundles, loaded models, outputs and agreement tables, shared by all devices."""

    def __init__(self, trusted: TrustedKeys, threads: int = 1) -> None:
        self.trusted, self.threads = trusted, threads
        self._lock = threading.RLock()
        self._verified: dict[str, Bundle | Exception] = {}  # by content digest
        self._raw: dict[str, bytes] = {}  # by manifest sha256
        self._models: dict[str, LoadedModel | Exception] = {}
        self._profiles: dict[str, ModelProfile] = {}
        self._feeds: dict[str, list[Feeds]] = {}
        self._outputs: dict[tuple[str, str], list[Array] | None] = {}
        self._tables: dict[tuple[str, str], AgreementTable | None] = {}

    def verify(self, digest: str, raw: bytes) -> Bundle:
        """``read_bundle`` once per digest; the same error again for every later caller."""
        with self._lock:
            found = self._verified.get(digest)
            if found is None:
                found = _attempt(lambda: read_bundle(raw, self.trusted))
                self._verified[digest] = found
                if isinstance(found, Bundle):
                    self._raw.setdefault(found.sha256, raw)
        return _result(found)

    def raw(self, sha256: str) -> bytes:
        """The bundle file's body for a verified manifest sha256."""
        with self._lock:
            if sha256 not in self._raw:
                raise SimulationError(f"bundle {sha256[:12]} was never verified here",
                                      hint="verify it first")
            return self._raw[sha256]

    def add_file(self, path: Path) -> BundleRef:
        """A bundle from disk (the initial one): verified and health-checked now."""
        raw = path.read_bytes()
        bundle = self.verify(f"file:{path.resolve()}", raw)
        return self.profile(bundle.sha256).ref

    def profile(self, sha256: str) -> ModelProfile:
        """Load and health-check once (raises what ``load_bundle`` raised), then measure."""
        with self._lock:
            if sha256 in self._profiles:
                return self._profiles[sha256]
            if sha256 not in self._raw:
                raise SimulationError(f"bundle {sha256[:12]} was never verified here",
                                      hint="verify it before its health check")
            model = self._models.get(sha256)
            if model is None:
                model = _attempt(lambda: load_bundle(self._raw[sha256], self.trusted,
                                                     threads=self.threads))
                self._models[sha256] = model
            loaded = _result(model)
            latency = self._measure(loaded)
            reference = loaded.bundle.manifest.monitoring
            profile = ModelProfile(loaded.ref, loaded.health.latency_ms, latency,
                                   DriftDraw(reference) if reference is not None else None)
            self._profiles[sha256] = profile
            return profile

    def agreement(self, new: str, old: str) -> AgreementTable | None:
        """Old against new on the new bundle's inputs; None when the old model refuses them."""
        with self._lock:
            key = (new, old)
            if key not in self._tables:
                theirs, ours = self._run(old, new), self._run(new, new)
                self._tables[key] = None if theirs is None or ours is None else \
                    AgreementTable.build(ours, theirs)
            return self._tables[key]

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                if isinstance(model, LoadedModel):
                    model.runtime.close()
            self._models.clear()

    def _measure(self, loaded: LoadedModel) -> npt.NDArray[np.float64]:
        timings = []
        for feeds in self._rows(loaded.bundle.sha256):
            runs = []
            for _ in range(TIMED_RUNS):
                started = time.perf_counter()
                loaded.runtime.run(feeds)
                runs.append((time.perf_counter() - started) * 1e3)
            timings.append(statistics.median(runs))
        return np.asarray(timings, dtype=np.float64)

    def _rows(self, sha256: str) -> list[Feeds]:
        if sha256 not in self._feeds:
            model = _result(self._models[sha256])
            health = HealthData.from_bytes(model.bundle.health_bytes)
            rows = int(next(iter(health.inputs.values())).shape[0])
            self._feeds[sha256] = [{k: v[i:i + 1] for k, v in health.inputs.items()}
                                   for i in range(rows)]
        return self._feeds[sha256]

    def _run(self, model_sha: str, inputs_sha: str) -> list[Array] | None:
        """The model's first output on every input row of another bundle (cached)."""
        key = (model_sha, inputs_sha)
        if key not in self._outputs:
            runtime = _result(self._models[model_sha]).runtime
            try:
                self._outputs[key] = [
                    next(iter(runtime.run(as_inputs_of(runtime.inputs, feeds)).values()))
                    for feeds in self._rows(inputs_sha)]
            except Exception:  # the previous model may refuse what the new one takes
                self._outputs[key] = None
        return self._outputs[key]


def _attempt(action: Callable[[], T]) -> T | Exception:
    try:
        return action()
    except Exception as exc:
        return exc


def _result(found: T | Exception) -> T:
    if isinstance(found, Exception):
        raise copy.copy(found)
    return found
