"""Drift alerts: each device's windows against its bundle's reference, by PSI.

The MQTT thread only queues the windows that telemetry carries (``offer``: an append);
the controller's loop compares them (``process``) with the reference statistics in the
manifest of the version the device ran (:mod:`edgefleet.agent.protocol.drift`) and keeps one small
state machine per (device, model, version, feature):

* quiet -> firing when a pooled window (below) has a PSI strictly above the model's
  ``psi`` threshold;
* firing -> quiet after ``clear_after`` consecutive pooled windows at or below it.

PSI over few samples is noise (about (bins - 1) / n for equal distributions), so a
device's consecutive windows are pooled (their counts added) until they hold at least
``min_samples`` summarised requests, and only then judged. Thresholds are per model
name (:class:`DriftPolicy`), set from the CLI and kept in the store.

Scaled out (docs/scale-out.md), the leader judges for everyone: with shared telemetry a
follower's monitor notes the windows it was handed (``journal``) and the leader queues
them from the store (``merge``), so each device's windows are pooled in one place; the
leader's :meth:`DriftMonitor.view` goes into the store and every controller answers
from it (:class:`DriftView`).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from edgefleet.agent.protocol.drift import DEFAULT_PSI_THRESHOLD, Monitoring, compare, window_counts

__all__ = ["Alert", "AlertChange", "DriftMonitor", "DriftPolicy", "DriftView"]

log = logging.getLogger(__name__)
_MAX_QUEUED = 100_000  # windows waiting for the loop; beyond, the oldest are dropped


@dataclass(frozen=True)
class DriftPolicy:
    """When a model's drift raises an alert."""

    psi: float = DEFAULT_PSI_THRESHOLD
    min_samples: int = 200  # PSI noise of equal distributions over 10 bins: about 0.045
    clear_after: int = 2

    def __post_init__(self) -> None:
        if not (math.isfinite(self.psi) and self.psi > 0):  # inf: an alert that never fires
            raise ValueError(f"psi threshold must be above 0 and finite, got {self.psi}")
        if self.min_samples < 1 or self.clear_after < 1:
            raise ValueError("min_samples and clear_after must be at least 1")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Alert:
    device: str
    model: str
    version: str
    feature: str
    psi: float
    threshold: float
    samples: int
    since_ms: int
    last_ms: int
    quiet_windows: int = field(default=0, repr=False)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.device, self.model, self.version, self.feature

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": f"{self.model}:{self.version}",
                "feature": self.feature, "psi": self.psi, "threshold": self.threshold,
                "samples": self.samples, "since_ms": self.since_ms, "last_ms": self.last_ms}


@dataclass(frozen=True)
class AlertChange:
    kind: str  # "raised" or "cleared"
    alert: Alert


@dataclass(frozen=True)
class _Window:
    device: str
    model: str
    version: str
    ts_ms: int
    stats: dict[str, Any]


_COUNTS = ("hist", "classes", "confidence_hist")


def _pool(pooled: dict[str, Any] | None, stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` added to ``pooled``: samples and every count list (same lengths) summed;
    a tensor whose bins changed starts again from ``stats``. A malformed window raises
    ``ValueError`` and leaves ``pooled`` as it was."""
    samples = stats.get("samples", 0)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError("a drift window's samples must be a non-negative integer")
    sides: dict[str, dict[str, dict[str, list[float]]]] = {}
    for side in ("inputs", "outputs"):
        tensors = stats.get(side, {})
        if not isinstance(tensors, dict):
            raise ValueError("a drift window's inputs and outputs must be objects")
        sides[side] = {name: _counts_of(value) for name, value in tensors.items()}
    if pooled is None:
        return {"samples": samples, **sides}
    for side, tensors in sides.items():
        for name, counts in tensors.items():
            before = pooled[side].get(name)
            if before is not None:
                for key, values in counts.items():
                    old = before.get(key)
                    if old is not None and len(old) == len(values):
                        counts[key] = [a + b for a, b in zip(old, values, strict=True)]
    return {"samples": samples + pooled["samples"], **sides}


def _counts_of(stats: Any) -> dict[str, list[float]]:
    found = {key: window_counts(stats, key) for key in _COUNTS}
    return {key: counts for key, counts in found.items() if counts is not None}


class DriftMonitor:
    """Queues windows from the ingest thread; compares and keeps alerts on the loop thread."""

    def __init__(self, reference: Callable[[str, str], Monitoring | None],
                 policy: Callable[[str], DriftPolicy], journal: bool = False) -> None:
        self._reference, self._policy = reference, policy
        self._queue: collections.deque[_Window] = collections.deque(maxlen=_MAX_QUEUED)
        self._journal: list[list[Any]] | None = [] if journal else None
        self._journal_lock = threading.Lock()
        self._firing: dict[tuple[str, str, str, str], Alert] = {}
        self._latest: dict[tuple[str, str, str], dict[str, float]] = {}  # per device/version
        self._pooled: dict[tuple[str, str, str], dict[str, Any]] = {}  # not yet judged
        self._lock = threading.Lock()
        self.offered = 0  # windows telemetry brought here (not merged from the store)
        self.windows = 0  # compared
        self.rejected = 0  # malformed

    def offer(self, device: str, model: str, version: str, ts_ms: int,
              stats: dict[str, Any]) -> None:
        """Called per telemetry point that carries a ``drift`` window (cheap)."""
        self._queue.append(_Window(device, model, version, ts_ms, stats))
        self.offered += 1  # only the ingest thread offers
        if self._journal is not None:
            with self._journal_lock:
                self._journal.append([device, model, version, ts_ms, stats])

    def take_journal(self) -> list[list[Any]]:
        """The windows offered since the last call, ``[device, model, version, ts, stats]``
        (empty without ``journal``)."""
        if self._journal is None:
            return []
        with self._journal_lock:
            taken, self._journal = self._journal, []
        return taken

    def merge(self, entries: Any) -> int:
        """Queue another controller's journal; returns how many entries were well-formed
        (the rest are counted in ``rejected`` and logged)."""
        queued = 0
        for entry in entries if isinstance(entries, list) else ():
            if (isinstance(entry, list) and len(entry) == 5
                    and all(isinstance(v, str) for v in entry[:3])
                    and isinstance(entry[3], int) and isinstance(entry[4], dict)):
                self._queue.append(_Window(*entry))
                queued += 1
            else:
                self.rejected += 1
                log.warning("dropped a shared drift window that is not [device, model, "
                            "version, ts, stats]: %.80r", entry)
        return queued

    def process(self) -> list[AlertChange]:
        """Compare every queued window; return the alerts raised and cleared."""
        changes: list[AlertChange] = []
        while self._queue:
            window = self._queue.popleft()
            reference = self._reference(window.model, window.version)
            if reference is None:
                continue  # a bundle without reference statistics: nothing to compare
            key = (window.device, window.model, window.version)
            try:  # a malformed window is refused alone
                pooled = _pool(self._pooled.get(key), window.stats)
            except (ValueError, TypeError) as exc:
                self.rejected += 1
                log.warning("dropped a drift window of %s: %s", window.device, exc)
                continue
            self.windows += 1
            if pooled["samples"] < self._policy(window.model).min_samples:
                self._pooled[key] = pooled
                continue
            self._pooled.pop(key, None)
            scores = compare(reference, pooled)
            with self._lock:
                self._latest[key] = scores
                changes.extend(self._judge(window, scores, int(pooled["samples"])))
        return changes

    def _judge(self, window: _Window, scores: dict[str, float],
               samples: int) -> Iterable[AlertChange]:
        policy = self._policy(window.model)
        for feature, value in scores.items():
            key = (window.device, window.model, window.version, feature)
            alert = self._firing.get(key)
            if value > policy.psi:
                if alert is None:
                    alert = Alert(window.device, window.model, window.version, feature, value,
                                  policy.psi, samples, window.ts_ms, window.ts_ms)
                    self._firing[key] = alert
                    yield AlertChange("raised", alert)
                else:
                    alert.psi, alert.samples, alert.last_ms = value, samples, window.ts_ms
                    alert.quiet_windows = 0
            elif alert is not None:
                alert.quiet_windows += 1
                alert.psi, alert.last_ms = value, window.ts_ms
                if alert.quiet_windows >= policy.clear_after:
                    del self._firing[key]
                    yield AlertChange("cleared", alert)

    def forget(self, device: str) -> None:
        """A device left (or was removed): its alerts go."""
        with self._lock:
            for key in [k for k in self._firing if k[0] == device]:
                del self._firing[key]
            for pooled in [k for k in self._pooled if k[0] == device]:
                del self._pooled[pooled]

    def alerts(self) -> list[Alert]:
        with self._lock:
            return sorted(self._firing.values(), key=lambda a: (-a.psi, a.device, a.feature))

    def summary(self) -> list[dict[str, Any]]:
        """Per (model, version, feature): devices reporting, firing, and max and mean PSI."""
        with self._lock:
            rows: dict[tuple[str, str, str], dict[str, Any]] = {}
            for (_, model, version), scores in self._latest.items():
                for feature, value in scores.items():
                    row = rows.setdefault((model, version, feature), {
                        "model": f"{model}:{version}", "feature": feature, "devices": 0,
                        "firing": 0, "psi_max": 0.0, "psi_sum": 0.0})
                    row["devices"] += 1
                    row["psi_max"] = max(row["psi_max"], value)
                    row["psi_sum"] += value
            for alert in self._firing.values():
                found = rows.get((alert.model, alert.version, alert.feature))
                if found is not None:
                    found["firing"] += 1
        return [{**{k: v for k, v in row.items() if k != "psi_sum"},
                 "psi_mean": round(row["psi_sum"] / row["devices"], 6)}
                for row in sorted(rows.values(), key=lambda r: (r["model"], r["feature"]))]

    def view(self) -> DriftView:
        """What the API, the dashboard and ``/metrics`` show, as of now."""
        return DriftView(self.alerts(), self.summary(), self.windows)


@dataclass(frozen=True)
class DriftView:
    """Alerts firing, the per-version PSI summary, and the windows judged: the monitor's
    own, or, on a scaled-out follower, the leader's as it last wrote them to the store."""

    alerts: list[Alert]
    summary: list[dict[str, Any]]
    windows: int

    def as_dict(self) -> dict[str, Any]:
        return {"alerts": [asdict(a) for a in self.alerts], "summary": self.summary,
                "windows": self.windows}

    @classmethod
    def from_dict(cls, data: Any) -> DriftView:
        """A stored view; ``ValueError`` names what is wrong with one that does not parse."""
        try:
            return cls([Alert(**a) for a in data["alerts"]], list(data["summary"]),
                       int(data["windows"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a stored drift view: {exc}") from exc
