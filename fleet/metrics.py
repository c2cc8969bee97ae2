"""Prometheus metrics of the fleet, built from the controller's state at each scrape.

``GET /metrics`` (no token) answers in the Prometheus text format 0.0.4. A custom
collector on a private registry reads the device registry, the rollouts and every
device's latest telemetry point when Prometheus asks (O(devices) per scrape); nothing
is counted on the ingest path. Families (all prefixed ``edgefleet_``)::

    devices{state,online}                gauge    devices by update state; online "true"/"false"
    devices_by_version{model,version}    gauge    devices by active bundle ("none": no bundle)
    device_online{device}                gauge    1 online, 0 offline (the one per-device family)
    rollout_state{rollout,state}         gauge    1 for the rollout's current state, 0 for the rest
    rollout_wave{rollout}                gauge    the wave being worked on, 1-based ("wave N of M")
    rollout_waves{rollout}               gauge    the rollout's number of waves (M)
    rollout_devices{rollout,model,       gauge    the rollout's devices in each rollout device
                    version,state}                state (every state, zeros included)
    latency_p50_seconds{model,version}   gauge histogram, see below
    latency_p95_seconds{model,version}   gauge histogram, see below
    throughput_requests_per_second       gauge    sum of the latest windows' requests per second
                    {model,version}
    error_ratio{model,version}           gauge    errors / (inferences + errors), latest windows
    agreement_top1_ratio{model,version}  gauge    sample-weighted top-1 agreement with the previous
                                                  version, 0-1 (only while devices are in
                                                  probation)
    agreement_samples{model,version}     gauge    the samples behind agreement_top1_ratio
    inferences_total{model,version}      counter  inferences served (the agents' own totals)
    inference_errors_total{model,version} counter failed inferences (idem)
    drift_alerts{model,version,feature}  gauge    devices whose drift alert on the feature fires
    drift_psi_max{model,version,feature} gauge    highest PSI of the devices' latest windows
    drift_psi_mean{model,version,feature} gauge   mean PSI of the devices' latest windows
    drift_windows_total                  counter  drift windows compared with their reference
    telemetry_points_total               counter  telemetry points ingested
    messages_rejected_total{reason}      counter  MQTT messages refused on arrival (fleet.ingest:
                                                  topic, too_large, json, schema_version,
                                                  schema, identity); every reason shown
    bytes_served_total{kind}             counter  bytes of bundle and delta files served in
                                                  whole responses (kind: bundle, delta)
    api_refusals_total{token,route}      counter  API calls refused for the token's role (403),
                                                  by token name (never its secret) and route
                                                  template ("POST /api/v1/rollouts"); one sample
                                                  per pair refused at least once

Which windows: the *latest window* of a (model, version) is the entry for that version in
the latest telemetry point of each **online** device (agents send one point per
telemetry interval, with per-version inferences, errors, p50/p95/p99 and agreement).

Names follow Prometheus' conventions (``promtool check metrics`` is clean): base units
(seconds), ``_ratio`` for 0-1 fractions, ``_total`` on counters. Devices send milliseconds
(``latency_p50_ms``, the device contract); the controller converts at the exposition.

Latency: agents send percentiles per window, not samples, so the latency families are
*gauge histograms over devices*: ``edgefleet_latency_p50_seconds_bucket{le="0.005"}`` is
the number of online devices whose latest window p50 for that version was at most 5 ms;
``_gcount`` is the number of such devices and ``_gsum`` the sum of their p50s (seconds).
They are snapshots, not accumulations: query them without ``rate()``, e.g.
``histogram_quantile(0.5, sum by (le, model, version) (edgefleet_latency_p50_seconds_bucket))``
is the median device's p50, and the same over ``latency_p95_seconds`` at 0.95 the p95 of
the devices' p95s (the slow tail of the fleet).

Counters: a device's ``inferences_total`` restarts at 0 when its agent restarts and its
counts move to another label set when it switches versions; a plain sum of the latest
values would then go down. Each (device, model, version) keeps a base that absorbs
restarts and its last value, so every counter only goes up while the controller runs.

Restarts: every counter lives in the controller's memory and starts again at 0 when it
restarts (``api_refusals_total`` too: the history keeps its ``api.refused`` rows); that is
a Prometheus counter reset, which ``rate()`` and ``increase()`` take into account.

Rollouts shown: every unfinished one and the :data:`FINISHED_SHOWN` newest finished
ones (so a rollout's final state is scraped before it leaves the page).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import CollectorRegistry

from edgefleet.fleet.domain import Device
from edgefleet.fleet.ingest import REASONS
from edgefleet.fleet.rollout.state import DeviceState, Rollout, RolloutState
from edgefleet.fleet.telemetry import VersionKey, per_model

if TYPE_CHECKING:
    from edgefleet.fleet.controller import FleetController

__all__ = ["FINISHED_SHOWN", "LATENCY_BUCKETS_MS", "FleetCollector", "FleetMetrics"]

FINISHED_SHOWN = 5
# bucket bounds in the devices' unit (ms), compared with their figures as sent; each
# bucket's ``le`` label is the bound in seconds
LATENCY_BUCKETS_MS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0,
                      500.0, 1000.0, 2500.0, 5000.0)
MS_PER_SECOND = 1000.0
NONE = "none"


class FleetMetrics:
    """``GET /metrics`` of one controller: a private registry holding a :class:`FleetCollector`."""

    def __init__(self, controller: FleetController) -> None:
        self.controller = controller
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(controller))

    def render(self) -> tuple[str, bytes]:
        """(content type, body) for ``GET /metrics``."""
        return CONTENT_TYPE_PLAIN_0_0_4, generate_latest(self.registry)


class FleetCollector:
    """Builds the metric families from the controller's state when collected."""

    def __init__(self, controller: FleetController) -> None:
        self.controller = controller
        self._inferences = _MonotonicSum()
        self._errors = _MonotonicSum()
        self._lock = threading.Lock()  # scrapes may come from several HTTP threads

    def collect(self) -> Iterator[Metric]:
        c = self.controller
        devices = c.registry.all()
        latest = c.telemetry.snapshot()
        yield from _device_families(devices)
        yield from _rollout_families(_shown(c.rollouts()))
        online = {d.id for d in devices if d.online}
        yield from _window_families(_windows(v for d, v in latest.items() if d in online))
        with self._lock:
            yield from self._counter_families(latest)
        view = c.drift_view()
        yield from _drift_families(view.summary, view.windows)
        # counter families are named without _total: the exposition appends it
        yield CounterMetricFamily("edgefleet_telemetry_points",
                                  "Telemetry points ingested from devices.",
                                  value=c.telemetry.points)
        rejected = CounterMetricFamily("edgefleet_messages_rejected",
                                       "MQTT messages dropped as malformed, by reason "
                                       "(fleet.ingest.REASONS).", labels=["reason"])
        by_reason = dict(c.rejected_by)
        for reason in (*REASONS, *sorted(set(by_reason) - set(REASONS))):
            rejected.add_metric([reason], by_reason.get(reason, 0))
        yield rejected
        served = CounterMetricFamily("edgefleet_bytes_served",
                                     "Bytes of bundle and delta files served in whole "
                                     "responses (docs/deltas.md).", labels=["kind"])
        for kind, size in c.bytes_served.items():
            served.add_metric([kind], size)
        yield served
        yield _refusal_family(c.audit.refusals())

    def _counter_families(self, latest: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        for device, point in latest.items():
            for values in per_model(point):
                key = _served(values)
                if key is not None:
                    self._inferences.update(device, key, values.get("inferences_total"))
                    self._errors.update(device, key, values.get("errors_total"))
        yield _per_version(CounterMetricFamily, "edgefleet_inferences",
                           "Inferences served, summed over devices (agents' own totals).",
                           self._inferences.sums())
        yield _per_version(CounterMetricFamily, "edgefleet_inference_errors",
                           "Failed inferences, summed over devices (agents' own totals).",
                           self._errors.sums())


# --- devices ----------------------------------------------------------------------------

def _device_families(devices: Sequence[Device]) -> Iterator[Metric]:
    states: defaultdict[tuple[str, str], int] = defaultdict(int)
    versions: defaultdict[VersionKey, int] = defaultdict(int)
    online = GaugeMetricFamily("edgefleet_device_online", "1 if the device is online, else 0.",
                               labels=["device"])
    models = GaugeMetricFamily("edgefleet_device_model",
                               "1 for each model a device serves, with its version.",
                               labels=["device", "model", "version"])
    for device in devices:
        states[(device.summary_state, "true" if device.online else "false")] += 1
        served = _device_models(device)
        for name, version in served or [(NONE, NONE)]:
            versions[(name, version)] += 1
        for name, version in served:
            models.add_metric([device.id, name, version], 1)
        online.add_metric([device.id], 1 if device.online else 0)
    by_state = GaugeMetricFamily("edgefleet_devices", "Devices by update state (of several "
                                 "models: the one that says most) and online.",
                                 labels=["state", "online"])
    for labels, count in sorted(states.items()):
        by_state.add_metric(list(labels), count)
    yield by_state
    yield _per_version(GaugeMetricFamily, "edgefleet_devices_by_version",
                       'Devices by the bundle they run ("none": no bundle); a device of '
                       'several models counts once for each.', versions)
    yield online
    yield models


def _device_models(device: Device) -> list[VersionKey]:
    """(model, version) of every model the device serves."""
    if device.models is None:
        active = device.active
        return [(active.name, active.version)] if active else []
    return [(name, state.active.version) for name, state in sorted(device.models.items())
            if state.active is not None]


# --- rollouts ---------------------------------------------------------------------------

def _shown(rollouts: Iterable[Rollout]) -> list[Rollout]:
    """Every unfinished rollout and the newest FINISHED_SHOWN finished ones (newest first)."""
    ordered = sorted(rollouts, key=lambda r: r.created_ms, reverse=True)
    recent = {r.id for r in [r for r in ordered if r.finished][:FINISHED_SHOWN]}
    return [r for r in ordered if not r.finished or r.id in recent]


def _rollout_families(rollouts: Sequence[Rollout]) -> Iterator[Metric]:
    state = GaugeMetricFamily("edgefleet_rollout_state",
                              "1 for the rollout's current state, 0 for the others.",
                              labels=["rollout", "state"])
    wave = GaugeMetricFamily("edgefleet_rollout_wave",
                             "The wave the rollout is working on, 1-based.", labels=["rollout"])
    waves = GaugeMetricFamily("edgefleet_rollout_waves", "The rollout's number of waves.",
                              labels=["rollout"])
    devices = GaugeMetricFamily("edgefleet_rollout_devices",
                                "The rollout's devices in each rollout device state.",
                                labels=["rollout", "model", "version", "state"])
    for rollout in rollouts:
        for value in RolloutState:
            state.add_metric([rollout.id, value.value], 1 if rollout.state == value else 0)
        wave.add_metric([rollout.id], rollout.wave + 1)
        waves.add_metric([rollout.id], len(rollout.spec.waves))
        counts = rollout.counts()
        model = rollout.spec.model
        for item in DeviceState:
            devices.add_metric([rollout.id, model.name, model.version, item.value],
                               counts.get(item.value, 0))
    yield from (state, wave, waves, devices)


# --- latest windows ---------------------------------------------------------------------

@dataclass
class _Windows:
    """The latest windows of one (model, version) on online devices."""

    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    inferences: int = 0
    errors: int = 0
    throughput: float = 0.0
    agreeing: float = 0.0  # sum of top1 * samples
    samples: int = 0

    def add(self, stats: dict[str, Any]) -> None:
        if (p50 := _number(stats.get("latency_p50_ms"))) is not None:
            self.p50.append(p50)
        if (p95 := _number(stats.get("latency_p95_ms"))) is not None:
            self.p95.append(p95)
        self.inferences += int(_number(stats.get("inferences")) or 0)
        self.errors += int(_number(stats.get("errors")) or 0)
        self.throughput += _number(stats.get("throughput_rps")) or 0.0
        agreement = stats.get("agreement")
        if isinstance(agreement, dict):
            top1, samples = _number(agreement.get("top1")), _number(agreement.get("samples"))
            if top1 is not None and samples:
                self.agreeing += top1 * samples
                self.samples += int(samples)


def _windows(points: Iterable[dict[str, Any]]) -> dict[VersionKey, _Windows]:
    found: defaultdict[VersionKey, _Windows] = defaultdict(_Windows)
    for values in points:
        model, versions = values.get("model"), values.get("versions")
        if not model or not isinstance(versions, dict):
            continue
        for version, stats in versions.items():
            if isinstance(stats, dict):
                found[(str(model), str(version))].add(stats)
    return found


def _window_families(windows: dict[VersionKey, _Windows]) -> Iterator[Metric]:
    keys = sorted(windows)
    yield _histogram("edgefleet_latency_p50_seconds",
                     "Online devices by their latest window's p50 latency (seconds), per version.",
                     {k: windows[k].p50 for k in keys})
    yield _histogram("edgefleet_latency_p95_seconds",
                     "Online devices by their latest window's p95 latency (seconds), per version.",
                     {k: windows[k].p95 for k in keys})
    yield _per_version(GaugeMetricFamily, "edgefleet_throughput_requests_per_second",
                       "Requests per second served, summed over online devices' latest windows.",
                       {k: windows[k].throughput for k in keys})
    yield _per_version(GaugeMetricFamily, "edgefleet_error_ratio",
                       "errors / (inferences + errors) in online devices' latest windows, 0-1.",
                       {k: w.errors / (w.inferences + w.errors) for k in keys
                        if (w := windows[k]).inferences + w.errors})
    yield _per_version(GaugeMetricFamily, "edgefleet_agreement_top1_ratio",
                       "Top-1 agreement with the previous version during probation "
                       "(sample-weighted over online devices), 0-1.",
                       {k: w.agreeing / w.samples for k in keys if (w := windows[k]).samples})
    yield _per_version(GaugeMetricFamily, "edgefleet_agreement_samples",
                       "Inputs compared behind edgefleet_agreement_top1_ratio.",
                       {k: windows[k].samples for k in keys if windows[k].samples})


def _histogram(name: str, documentation: str,
               values_ms: dict[VersionKey, list[float]]) -> GaugeHistogramMetricFamily:
    """Devices by latency; ``values_ms`` as the devices sent them, buckets and sum in seconds."""
    family = GaugeHistogramMetricFamily(name, documentation, labels=["model", "version"])
    for key, observed in values_ms.items():
        if observed:
            buckets = [(repr(le / MS_PER_SECOND), float(sum(1 for v in observed if v <= le)))
                       for le in LATENCY_BUCKETS_MS]
            buckets.append(("+Inf", float(len(observed))))
            family.add_metric(list(key), buckets, gsum_value=sum(observed) / MS_PER_SECOND)
    return family


# --- counters ---------------------------------------------------------------------------

class _MonotonicSum:
    """Per-(model, version) sums of per-device running totals that never go down.

    Each (device, key) keeps the last total seen and a base; a total smaller than the
    last one is a restart of that device's counter, and the last one moves into the base.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, VersionKey], float] = {}
        self._base: dict[tuple[str, VersionKey], float] = {}

    def update(self, device: str, key: VersionKey, total: Any) -> None:
        value = _number(total)
        if value is None:
            return
        last = self._last.get((device, key))
        if last is not None and value < last:
            self._base[(device, key)] = self._base.get((device, key), 0.0) + last
        self._last[(device, key)] = value

    def sums(self) -> dict[VersionKey, float]:
        sums: defaultdict[VersionKey, float] = defaultdict(float)
        for (device, key), last in self._last.items():
            sums[key] += self._base.get((device, key), 0.0) + last
        return dict(sorted(sums.items()))


def _drift_families(rows: list[dict[str, Any]], windows: int) -> Iterator[Metric]:
    """Per (model, version, feature): firing devices, and max and mean PSI (docs/monitoring.md)."""
    labels = ["model", "version", "feature"]
    families = {
        "firing": GaugeMetricFamily("edgefleet_drift_alerts",
                                    "Devices whose drift alert on the feature fires.",
                                    labels=labels),
        "psi_max": GaugeMetricFamily("edgefleet_drift_psi_max",
                                     "Highest PSI of the devices' latest drift windows.",
                                     labels=labels),
        "psi_mean": GaugeMetricFamily("edgefleet_drift_psi_mean",
                                      "Mean PSI of the devices' latest drift windows.",
                                      labels=labels)}
    for row in rows:
        model, _, version = str(row["model"]).partition(":")
        for key, family in families.items():
            family.add_metric([model, version, str(row["feature"])], float(row[key]))
    yield from families.values()
    yield CounterMetricFamily("edgefleet_drift_windows",
                              "Drift windows compared with their bundle's reference.",
                              value=windows)


# --- helpers ----------------------------------------------------------------------------

def _per_version(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str,
                 documentation: str, values: dict[VersionKey, Any]) -> Metric:
    family = kind(name, documentation, labels=["model", "version"])
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


def _served(values: dict[str, Any]) -> VersionKey | None:
    """The (model, version) a telemetry point's flat totals belong to."""
    model, version = values.get("model"), values.get("model_version")
    return (str(model), str(version)) if model and version else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _refusal_family(refusals: dict[tuple[str, str], int]) -> Metric:
    family = CounterMetricFamily("edgefleet_api_refusals",
                                 "API calls refused for the token's role, by token name and "
                                 "route (since the controller started).",
                                 labels=["token", "route"])
    for (token, route), count in sorted(refusals.items()):
        family.add_metric([token, route], count)
    return family
