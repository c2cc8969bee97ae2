"""The rollout observer: what a rollout's tick sees of the fleet (its devices' views and,
for a quality-gated rollout, the candidate's and the baseline's telemetry)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping

from edgefleet.agent.protocol.payloads import MAX_MODELS
from edgefleet.fleet.compat import incompatibility
from edgefleet.fleet.control.catalog import ModelCatalog
from edgefleet.fleet.domain import Device, ModelVersion
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout import executor
from edgefleet.fleet.rollout.executor import DeviceView, Observations, Quality
from edgefleet.fleet.rollout.state import DeviceState, Rollout, RolloutState
from edgefleet.fleet.telemetry import TelemetryBook, VersionKey

__all__ = ["UNSETTLED", "RolloutObserver"]

# a finished rollout is followed (up to a day) while the executor has a device of it to
# follow: on its way, rolling back, timed out (it may answer late) or failed (it may retry)
UNSETTLED = executor.FOLLOWED
_BASELINE_SAMPLE = 1000
# (model sha256, profile, runtimes, decryption key ids)
_CompatKey = tuple[str, str | None, tuple[tuple[str, str], ...], tuple[str, ...] | None]


class RolloutObserver:
    """Builds a rollout's :class:`Observations` from the registry, the catalog and the
    telemetry book; ``live`` is the controller's live rollouts (read, never written)."""

    def __init__(self, registry: DeviceRegistry, catalog: ModelCatalog,
                 telemetry: TelemetryBook, live: Mapping[str, Rollout],
                 clock: Callable[[], int], quality_window_ms: int) -> None:
        self.registry, self.catalog, self.telemetry = registry, catalog, telemetry
        self.live, self.clock, self.quality_window_ms = live, clock, quality_window_ms
        self._views: dict[str, tuple[Device, tuple[str, str | None], DeviceView]] = {}
        self._compat: dict[_CompatKey, str | None] = {}  # -> why incompatible, or None

    def observe(self, rollout: Rollout, joined: set[str]) -> Observations:
        model = self.catalog.by_sha(rollout.spec.model.sha256)
        views = {}
        name = rollout.spec.model.name  # the model it targets: its bundle's name
        for device_id in self._watched(rollout, joined):
            device = self.registry.get(device_id)
            if device is not None:
                views[device_id] = self._view(device, name, model)
        if not _gated(rollout):
            return Observations(views)
        return Observations(views, self._candidate(rollout), self._baseline(rollout))

    def busy_elsewhere(self, device: str, rollout_id: str) -> bool:
        """``device`` is in another live rollout that has not finished."""
        return any(r.id != rollout_id and not r.finished and device in r.devices
                   for r in self.live.values())

    def wanted_keys(self) -> list[VersionKey]:
        """The versions whose telemetry the quality gates need: each quality-gated live
        rollout's new version and the version its devices ran before."""
        keys: set[VersionKey] = set()
        for rollout in self.live.values():
            if rollout.finished or not _has_gates(rollout):
                continue
            keys.add((rollout.spec.model.name, rollout.spec.model.version))
            previous = baseline_key(rollout)
            if previous is not None:
                keys.add(previous)
        return sorted(keys)

    def _watched(self, rollout: Rollout, joined: set[str]) -> Iterable[str]:
        spec = rollout.spec
        if rollout.state == RolloutState.PENDING:
            return [d.id for d in self.registry.all() if spec.matches(d)]
        if rollout.finished:
            # only the devices it still waits on, less those that another rollout sent a
            # desired state since: the device acts on that one's word now, not this one's
            others = [r for r in self.live.values() if r.id != rollout.id]

            def taken(device: str, sent_ms: int) -> bool:
                return any((item := r.devices.get(device)) is not None
                           and item.sent_ms > sent_ms for r in others)

            return [d.device for d in rollout.devices.values()
                    if d.state in UNSETTLED and not taken(d.device, d.sent_ms)]
        newcomers = [d for d in joined if (dev := self.registry.get(d)) is not None
                     and spec.matches(dev) and not self.busy_elsewhere(d, rollout.id)]
        return [*rollout.devices.keys(), *newcomers]

    def _view(self, device: Device, name: str, model: ModelVersion | None) -> DeviceView:
        """The device as the rollout of model ``name`` sees it: that model's state only."""
        cached = self._views.get(device.id)
        seen = (name, model.sha256 if model else None)
        if cached is not None and cached[0] is device and cached[1] == seen:
            return cached[2]  # the registry replaces a Device on every change
        reason = None
        if model is not None:
            key = (model.sha256, device.profile, tuple(sorted(device.runtimes.items())),
                   device.decryption_keys)
            if key not in self._compat:
                self._compat[key] = incompatibility(device, model, self.catalog.info(model))
            reason = self._compat[key]
        reason = reason or _full(device, name)
        state = device.model(name)
        view = DeviceView(online=device.online, active=state.active,
                          update_state=state.update_state, update_target=state.update_target,
                          update_since_ms=state.update_since_ms,
                          update_detail=state.update_detail, incompatible=reason)
        self._views[device.id] = (device, seen, view)
        return view

    def _candidate(self, rollout: Rollout) -> Quality:
        trying = [d for d in rollout.devices.values()
                  if d.state in (DeviceState.PROBATION, DeviceState.COMMITTING)]
        if not trying:
            return Quality()
        key = (rollout.spec.model.name, rollout.spec.model.version)
        return self.telemetry.quality([d.device for d in trying], key,
                                      min(d.since_ms for d in trying))

    def _baseline(self, rollout: Rollout) -> Quality:
        key = baseline_key(rollout)
        if key is None:
            return Quality()
        # the rollout's own devices (before they switched) and a bounded sample of the
        # rest of the fleet still running the previous version
        others = self.telemetry.running(key)[:_BASELINE_SAMPLE]
        devices = {*others, *rollout.devices.keys()}
        return self.telemetry.quality(devices, key, self.clock() - self.quality_window_ms)


def _full(device: Device, name: str) -> str | None:
    """Why a device of several models cannot take model ``name`` as a new one: it serves
    the most models a device serves already (its agent refuses the entry; None: it can)."""
    models = device.models
    if models is None or name in models:
        return None
    # the agent counts what is installed: an entry of the fleet that failed or is still on
    # its way (no active bundle) is no model of the device's
    installed = sum(1 for state in models.values() if state.active is not None)
    if installed < MAX_MODELS:
        return None
    return (f"the device serves {installed} models already, the most one device serves: "
            f"it refuses {name} as another (remove one with `edgefleet agent remove NAME`)")


def baseline_key(rollout: Rollout) -> VersionKey | None:
    """The version most of the rollout's devices ran before (None: none sent yet)."""
    previous = collections.Counter((d.previous.name, d.previous.version)
                                   for d in rollout.devices.values() if d.previous)
    return previous.most_common(1)[0][0] if previous else None


def _has_gates(rollout: Rollout) -> bool:
    gates = rollout.spec.gates
    return any(g is not None for g in (gates.max_p95_ratio, gates.max_error_rate_pct,
                                       gates.min_agreement_pct))


def _gated(rollout: Rollout) -> bool:
    """Quality is only measured for a running rollout with devices in probation and a
    quality gate to feed."""
    if rollout.finished or not _has_gates(rollout):
        return False
    return any(d.state in (DeviceState.PROBATION, DeviceState.COMMITTING)
               for d in rollout.devices.values())
