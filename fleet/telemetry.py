"""What the fleet's telemetry says: the latest point of every device, and per-version quality.

Fed from the MQTT thread (``add``), read by the rollout loop and the API. Each point's
``versions`` map gives, per model version, the window's inferences, errors and latency
percentiles; the controller keeps a short history of those per device and version and
sums them into a :class:`edgefleet.fleet.rollout.executor.Quality`: counts add up, p95 is the
inference-weighted mean of the devices' window p95s, agreement the sample-weighted mean
of the devices' latest top-1 agreement.

Scale-out (docs/scale-out.md): with shared MQTT subscriptions each controller ingests
part of every device's telemetry. A book made with ``journal=True`` notes each window and
agreement it takes in; :meth:`TelemetryBook.take_share` hands the leader's wanted version
keys over as one JSON-ready batch (on a key's first wanting, everything kept for it), and
the leader's :meth:`TelemetryBook.merge` puts other controllers' batches into its own
history, in time order and idempotently (a window is known by its device, version and
``ts``), so its quality gates sum the whole fleet exactly as one controller would.

For charts, :class:`VersionSeries` keeps the same sums per (model, version) and 5 s bucket
of the points' time over the last 30 minutes (``TelemetryBook.series``): p50 and p95 are
inference-weighted means of the devices' window percentiles, agreement the sample-weighted
mean of the latest agreement each device reported in the bucket.
"""

from __future__ import annotations

import math
import re
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

from edgefleet.agent.protocol.payloads import MAX_MODELS
from edgefleet.agent.protocol.schema import NAME_PATTERN
from edgefleet.fleet.rollout.executor import Quality

__all__ = ["Share", "TelemetryBook", "VersionKey", "VersionSeries", "per_model"]

_NAME = re.compile(NAME_PATTERN)

VersionKey = tuple[str, str]  # (model name, version)
_MAX_POINTS = 64  # per device and version, and never older than the window


class _Window(NamedTuple):  # a tuple: 10,000 devices keep tens of thousands of these
    ts_ms: int
    inferences: int
    errors: int
    p95_ms: float | None


# {"w": [[device, model, version, ts_ms, inferences, errors, p95_ms|null], ...],
#  "a": [[device, model, version, ts_ms, top1, samples], ...]}
Share = dict[str, list[list[Any]]]


class _Bucket:
    __slots__ = ("agreement", "errors", "inferences", "p50", "p50_weight", "p95",
                 "p95_weight", "start_ms")

    def __init__(self, start_ms: int) -> None:
        self.start_ms, self.inferences, self.errors = start_ms, 0, 0
        self.p50 = self.p95 = 0.0  # sums of percentile * inferences
        self.p50_weight = self.p95_weight = 0
        self.agreement: dict[str, tuple[float, int]] = {}  # device -> (top1, samples)

    def add(self, device: str, inferences: int, errors: int, stats: dict[str, Any]) -> None:
        self.inferences += inferences
        self.errors += errors
        if (p50 := _float(stats.get("latency_p50_ms"))) is not None and inferences:
            self.p50, self.p50_weight = self.p50 + p50 * inferences, self.p50_weight + inferences
        if (p95 := _float(stats.get("latency_p95_ms"))) is not None and inferences:
            self.p95, self.p95_weight = self.p95 + p95 * inferences, self.p95_weight + inferences
        agreement = stats.get("agreement")
        if isinstance(agreement, dict) and (top1 := _float(agreement.get("top1"))) is not None:
            self.agreement[device] = (top1, _int(agreement.get("samples")))

    def as_dict(self) -> dict[str, Any]:
        total, samples = self.inferences + self.errors, sum(s for _, s in self.agreement.values())
        agreeing = sum(top1 * s for top1, s in self.agreement.values())
        return {"t": self.start_ms, "inferences": self.inferences, "errors": self.errors,
                "p50_ms": self.p50 / self.p50_weight if self.p50_weight else None,
                "p95_ms": self.p95 / self.p95_weight if self.p95_weight else None,
                "error_pct": 100 * self.errors / total if total else None,
                "agreement_pct": 100 * agreeing / samples if samples else None,
                "agreement_samples": samples}


class VersionSeries:
    """Fleet-wide telemetry per (model, version) in time buckets, the newest ``points`` kept.

    Not thread-safe on its own: :class:`TelemetryBook` calls it under its lock. A point
    older than the oldest kept bucket of its version is dropped.
    """

    def __init__(self, bucket_ms: int = 5_000, points: int = 360) -> None:
        self.bucket_ms = bucket_ms
        self._points = points
        self._buckets: dict[VersionKey, deque[_Bucket]] = {}

    def add(self, key: VersionKey, device: str, ts_ms: int, stats: dict[str, Any]) -> None:
        inferences, errors = _int(stats.get("inferences")), _int(stats.get("errors"))
        if not (inferences or errors or isinstance(stats.get("agreement"), dict)):
            return
        bucket = self._bucket(key, ts_ms - ts_ms % self.bucket_ms)
        if bucket is not None:
            bucket.add(device, inferences, errors, stats)

    def _bucket(self, key: VersionKey, start_ms: int) -> _Bucket | None:
        buckets = self._buckets.setdefault(key, deque(maxlen=self._points))
        if not buckets or buckets[-1].start_ms < start_ms:
            buckets.append(_Bucket(start_ms))
            return buckets[-1]
        return next((b for b in reversed(buckets) if b.start_ms == start_ms), None)

    def since(self, since_ms: int = 0) -> dict[str, list[dict[str, Any]]]:
        """``{"name:version": [bucket, ...]}`` of the buckets starting at or after ``since_ms``."""
        return {f"{name}:{version}": [b.as_dict() for b in buckets if b.start_ms >= since_ms]
                for (name, version), buckets in self._buckets.items()}


class TelemetryBook:
    """Latest values per device and a bounded history per (device, model version)."""

    def __init__(self, window_ms: int = 300_000, journal: bool = False) -> None:
        self.window_ms = window_ms
        self.latest: dict[str, dict[str, Any]] = {}
        self.latest_ts: dict[str, int] = {}
        self.points = 0  # ingested points, for the ingest counter
        self.merged = 0  # windows merged from other controllers' shares
        self._history: dict[tuple[str, VersionKey], deque[_Window]] = {}
        # (device, version) -> (top1, samples, ts of the point that said so)
        self._agreement: dict[tuple[str, VersionKey], tuple[float, int, int]] = {}
        # what was taken in since the last take_share (None: not scaled out)
        self._journal: list[tuple[str, VersionKey, _Window | None,
                                  tuple[float, int, int] | None]] | None = (
            [] if journal else None)
        self._series = VersionSeries()
        self._lock = threading.Lock()

    def add(self, device: str, ts_ms: int, values: dict[str, Any]) -> None:
        with self._lock:
            self.points += 1
            if ts_ms >= self.latest_ts.get(device, 0):
                self.latest[device], self.latest_ts[device] = values, ts_ms
            for model_values in per_model(values):
                model = str(model_values.get("model") or "")
                versions = model_values.get("versions")
                if not model or not isinstance(versions, dict):
                    continue
                for version, stats in versions.items():
                    if isinstance(stats, dict):
                        self._add_version(device, (model, str(version)), ts_ms, stats)

    def _add_version(self, device: str, key: VersionKey, ts_ms: int,
                     stats: dict[str, Any]) -> None:
        self._series.add(key, device, ts_ms, stats)
        inferences, errors = _int(stats.get("inferences")), _int(stats.get("errors"))
        if inferences or errors:
            window = _Window(ts_ms, inferences, errors, _float(stats.get("latency_p95_ms")))
            if self._insert(device, key, window) and self._journal is not None:
                self._journal.append((device, key, window, None))
        agreement = stats.get("agreement")
        if isinstance(agreement, dict) and (top1 := _float(agreement.get("top1"))) is not None:
            said = (top1, _int(agreement.get("samples")), ts_ms)
            self._agreement[(device, key)] = said
            if self._journal is not None:
                self._journal.append((device, key, None, said))

    def quality(self, devices: Iterable[str], key: VersionKey, since_ms: int) -> Quality:
        """``key``'s telemetry on ``devices`` since ``since_ms``."""
        inferences = errors = agreement_samples = 0
        weighted_p95 = p95_weight = agreeing = 0.0
        with self._lock:
            for device in devices:
                for window in reversed(self._history.get((device, key), ())):
                    if window.ts_ms < since_ms:
                        break  # oldest first: the rest is older still
                    inferences += window.inferences
                    errors += window.errors
                    if window.p95_ms is not None and window.inferences:
                        weighted_p95 += window.p95_ms * window.inferences
                        p95_weight += window.inferences
                top1, samples, _ = self._agreement.get((device, key), (0.0, 0, 0))
                agreeing += top1 * samples
                agreement_samples += samples
        return Quality(inferences, errors, weighted_p95 / p95_weight if p95_weight else None,
                       agreeing / agreement_samples if agreement_samples else None,
                       agreement_samples)

    # --- scale-out: sharing with the leader, and merging at the leader --------------------

    def take_share(self, wanted: Iterable[VersionKey], new: Iterable[VersionKey] = ()) -> Share:
        """What this controller took in of ``wanted`` since the last call, and everything it
        keeps of the ``new`` keys (wanted for the first time); the journal is emptied."""
        wanted_keys, new_keys = set(wanted), set(new)
        share: Share = {"w": [], "a": []}
        with self._lock:
            journal, self._journal = self._journal or [], ([] if self._journal is not None
                                                           else None)
            for device, key, window, said in journal:
                if key in wanted_keys and key not in new_keys:
                    _note(share, device, key, window, said)
            if new_keys:
                for (device, key), history in self._history.items():
                    if key in new_keys:
                        for window in history:
                            _note(share, device, key, window, None)
                for (device, key), said in self._agreement.items():
                    if key in new_keys:
                        _note(share, device, key, None, said)
        return share

    def merge(self, share: Share) -> int:
        """Take in another controller's share; returns the windows that were new here."""
        added = 0
        with self._lock:
            for device, name, version, ts, inferences, errors, p95 in share.get("w", ()):
                window = _Window(int(ts), int(inferences), int(errors), _float(p95))
                history = self._history.get((str(device), (str(name), str(version))))
                if history and history[-1].ts_ms == window.ts_ms:
                    continue  # known already
                added += self._insert(str(device), (str(name), str(version)), window)
            for device, name, version, ts, top1, samples in share.get("a", ()):
                key = (str(device), (str(name), str(version)))
                known = self._agreement.get(key)
                if known is None or int(ts) >= known[2]:
                    self._agreement[key] = (float(top1), int(samples), int(ts))
            self.merged += added
        return added

    def _insert(self, device: str, key: VersionKey, window: _Window) -> int:
        """Keep ``window`` in time order (0: a window of that ``ts`` is known already)."""
        history = self._history.setdefault((device, key), deque(maxlen=_MAX_POINTS))
        if not history or history[-1].ts_ms <= window.ts_ms:
            history.append(window)  # the usual case: newer than anything kept
        elif any(kept.ts_ms == window.ts_ms for kept in history):
            return 0  # known already (a share read twice, or this controller's own)
        else:  # older than the newest (a replayed spool, or another controller's share)
            ordered = sorted((*history, window), key=lambda w: w.ts_ms)
            history.clear()
            history.extend(ordered[-_MAX_POINTS:])
        while history and history[0].ts_ms < history[-1].ts_ms - self.window_ms:
            history.popleft()
        return 1

    def series(self, since_ms: int = 0) -> dict[str, list[dict[str, Any]]]:
        """Per-version chart points (see :class:`VersionSeries`) from ``since_ms`` on."""
        with self._lock:
            return self._series.since(since_ms)

    @property
    def series_bucket_ms(self) -> int:
        return self._series.bucket_ms

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every device's latest values (a copy of ``latest``, safe to read from any thread)."""
        with self._lock:
            return dict(self.latest)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per ``"model:version"``: the devices' latest windows summed (latency weighted by
        inferences), error rate, and top-1 agreement weighted by samples."""
        sums: dict[str, dict[str, float]] = {}
        for values in (v for point in self.snapshot().values() for v in per_model(point)):
            for version, stats in (values.get("versions") or {}).items():
                if not isinstance(stats, dict):
                    continue
                s = sums.setdefault(f"{values.get('model')}:{version}", dict.fromkeys(
                    ("inferences", "errors", "p50", "p95", "agree", "samples"), 0.0))
                n = _int(stats.get("inferences"))
                s["inferences"] += n
                s["errors"] += _int(stats.get("errors"))
                s["p50"] += (_float(stats.get("latency_p50_ms")) or 0.0) * n
                s["p95"] += (_float(stats.get("latency_p95_ms")) or 0.0) * n
                agreement = stats.get("agreement") or {}
                samples = _int(agreement.get("samples"))
                s["agree"] += (_float(agreement.get("top1")) or 0.0) * samples
                s["samples"] += samples
        return {key: _summarised(s) for key, s in sums.items()}

    def running(self, key: VersionKey) -> list[str]:
        """Devices whose latest point says they serve ``key``."""
        with self._lock:
            return [device for device, point in self.latest.items()
                    if any((values.get("model"), values.get("model_version")) == key
                           for values in per_model(point))]

    def forget_agreement(self, devices: Iterable[str], key: VersionKey) -> None:
        with self._lock:
            for device in devices:
                self._agreement.pop((device, key), None)


def per_model(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Each model's values of a telemetry point: its ``models`` map (an agent of several
    models, docs/protocol.md), else the point itself (its flat keys)."""
    models = values.get("models")
    if isinstance(models, dict) and models:
        return [v for name, v in list(models.items())[:MAX_MODELS]
                if isinstance(v, dict) and v.get("model") == name and isinstance(name, str)
                and _NAME.fullmatch(name)]
    return [values]


def _note(share: Share, device: str, key: VersionKey, window: _Window | None,
          said: tuple[float, int, int] | None) -> None:
    if window is not None:
        share["w"].append([device, key[0], key[1], window.ts_ms, window.inferences,
                           window.errors, window.p95_ms])
    if said is not None:
        share["a"].append([device, key[0], key[1], said[2], said[0], said[1]])


def _summarised(s: dict[str, float]) -> dict[str, Any]:
    n, total = s["inferences"], s["inferences"] + s["errors"]
    return {"inferences": int(n), "p50_ms": s["p50"] / n if n else None,
            "p95_ms": s["p95"] / n if n else None,
            "error_rate": s["errors"] / total if total else None,
            "agreement": s["agree"] / s["samples"] if s["samples"] else None}


def _int(value: Any) -> int:
    """A count from a device: a finite, non-negative number, else 0 (never NaN or Infinity)."""
    return max(int(value), 0) if isinstance(value, int | float) and math.isfinite(value) else 0


def _float(value: Any) -> float | None:
    """A measurement from a device: a finite number, else None (NaN would poison averages
    and make every gate comparison false)."""
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
