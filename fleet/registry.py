"""The device registry in memory: devices register themselves through ``status`` and
``state/reported``; group and tags come from operators. Changes are marked dirty and
written to the store in batches by the controller's loop (never one row per message).

Scaled out (docs/scale-out.md), every controller keeps a whole registry (status and
reports are not shared subscriptions: each controller sees them all); only the leader
writes dirty devices, and operators' group and tag changes reach the others from the
store (``relabel``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from edgefleet.agent.protocol.payloads import STATUS_ONLINE, ModelReport, ReportedState
from edgefleet.fleet.domain import Device, ModelState

__all__ = ["DeviceRegistry", "apply_reported"]


def apply_reported(device: Device, reported: ReportedState, now_ms: int) -> Device:
    """``device`` as its own retained report describes it."""
    update = reported.update
    return device.with_changes(
        profile=reported.profile, runtimes=dict(reported.runtimes),
        decryption_keys=(None if reported.decryption_keys is None
                         else tuple(reported.decryption_keys)),
        agent_version=reported.agent_version, arch=reported.arch,
        reported_labels=dict(reported.labels or {}), active=reported.active,
        previous=reported.previous, update_state=update.state,
        update_target=update.target.sha256 if update.target else None,
        update_detail=update.detail, update_since_ms=update.since, last_seen_ms=now_ms,
        models=None if reported.models is None else {
            name: _model_state(model) for name, model in reported.models.items()})


def _model_state(report: ModelReport) -> ModelState:
    update = report.update
    return ModelState(active=report.active, previous=report.previous,
                      update_state=update.state,
                      update_target=update.target.sha256 if update.target else None,
                      update_detail=update.detail, update_since_ms=update.since)


def _seen(device: Device, now_ms: int, retained: bool) -> int:
    """When ``device`` was last heard from, given a message now (a retained copy is no
    word from the device now: the time stays, or is now for a device first known so)."""
    if retained and device.last_seen_ms > 0:
        return device.last_seen_ms
    return now_ms


SEEN_WRITE_MS = 600_000  # telemetry refreshes a device's stored time at most this often


class DeviceRegistry:
    """Every known device of one fleet, thread-safe; ``dirty`` ids await a store write."""

    def __init__(self, fleet: str, devices: Iterable[Device] = ()) -> None:
        self.fleet = fleet
        self._devices = {d.id: d for d in devices}
        self._dirty: set[str] = set()
        self._seen: dict[str, int] = {}
        self._joined: list[str] = []
        self._forgotten: set[str] = set()  # removed here; the leader deletes their rows
        self._lock = threading.Lock()

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def all(self) -> list[Device]:
        """Every device, sorted by id, with the last time its telemetry was seen."""
        with self._lock:
            devices = sorted(self._devices.values(), key=lambda d: d.id)
        return [d.with_changes(last_seen_ms=seen)
                if (seen := self._seen.get(d.id, 0)) > d.last_seen_ms else d for d in devices]

    def snapshot(self) -> list[Device]:
        """Every device, unsorted (cheap: for counting)."""
        with self._lock:
            return list(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)

    def _current(self, device_id: str, now_ms: int) -> Device:
        device = self._devices.get(device_id)
        if device is None:
            device = Device(id=device_id, fleet=self.fleet, first_seen_ms=now_ms)
            self._joined.append(device_id)
        return device

    def status(self, device_id: str, status: str, now_ms: int, *,
               retained: bool = False) -> None:
        """``retained``: the broker's copy replayed on (re)subscribing, not a word heard
        now: the device's time last seen stays (a device first known so: now)."""
        with self._lock:
            device = self._current(device_id, now_ms)
            self._set(device.with_changes(online=status == STATUS_ONLINE,
                                          last_seen_ms=_seen(device, now_ms, retained)))

    def reported(self, reported: ReportedState, now_ms: int, *,
                 retained: bool = False) -> None:
        with self._lock:
            device = self._current(reported.device, now_ms)
            self._set(apply_reported(device, reported, _seen(device, now_ms, retained)))

    def seen(self, device_id: str, now_ms: int) -> None:
        """Telemetry arrived: the device is alive. Kept aside (telemetry is the busiest
        topic: not worth a store write each), and written to the device's row once the
        stored time is ``SEEN_WRITE_MS`` old, so a device that drops while no controller
        runs is not taken for one unheard of since it connected."""
        self._seen[device_id] = now_ms
        device = self._devices.get(device_id)
        if device is not None and now_ms - device.last_seen_ms >= SEEN_WRITE_MS:
            with self._lock:
                device = self._devices.get(device_id)
                if device is not None and device.last_seen_ms < now_ms:
                    self._set(device.with_changes(last_seen_ms=now_ms))

    def fold_seen(self) -> None:
        """Every telemetry time kept aside into its device's row (written at the next
        flush): a controller that stops leaves exact times in the store."""
        with self._lock:
            for device_id, seen in self._seen.items():
                device = self._devices.get(device_id)
                if device is not None and device.last_seen_ms < seen:
                    self._set(device.with_changes(last_seen_ms=seen))

    def last_seen(self, device_id: str) -> int:
        device = self._devices.get(device_id)
        return max(self._seen.get(device_id, 0), device.last_seen_ms if device else 0)

    def replace(self, device: Device) -> None:
        """An operator's change (group, tags), already written to the store."""
        with self._lock:
            self._devices[device.id] = device

    def relabel(self, device_id: str, group: str | None, tags: frozenset[str],
                labels: dict[str, str] | None = None) -> Device | None:
        """An operator's group, tags and labels (None: as they are), as stored (this or
        another controller wrote them): the device's reported state here stays as it is.
        None: not known here."""
        with self._lock:
            device = self._devices.get(device_id)
            if device is None:
                return None
            labels = device.labels if labels is None else labels
            if (device.group, device.tags, device.labels) != (group, tags, labels):
                device = device.with_changes(group=group, tags=tags, labels=labels)
                self._devices[device_id] = device
            return device

    def forget(self, device_ids: Iterable[str]) -> list[Device]:
        """Decommissioned (here, or on another controller: its cleared ``status`` came):
        the devices go, with their pending writes; a later message registers one anew."""
        with self._lock:
            gone = [d for i in device_ids if (d := self._devices.pop(i, None)) is not None]
            for device in gone:
                self._dirty.discard(device.id)
                self._seen.pop(device.id, None)
                self._forgotten.add(device.id)
            self._joined = [i for i in self._joined if i in self._devices]
            return gone

    def take_forgotten(self) -> list[str]:
        """The ids forgotten since the last take and not registered again since, sorted
        (rows for the leader to delete)."""
        with self._lock:
            forgotten, self._forgotten = self._forgotten, set()
            return sorted(i for i in forgotten if i not in self._devices)

    def mark_forgotten(self, device_ids: Iterable[str]) -> None:
        """Delete these rows again at the next flush (the last delete failed)."""
        with self._lock:
            self._forgotten.update(d for d in device_ids if d not in self._devices)

    def stale(self, age_ms: int, now_ms: int) -> list[Device]:
        """Offline devices not heard from (status, report or telemetry) for ``age_ms``."""
        return [d for d in self.all() if not d.online and d.last_seen_ms <= now_ms - age_ms]

    def _set(self, device: Device) -> None:
        self._devices[device.id] = device
        self._dirty.add(device.id)

    def take_dirty(self) -> list[Device]:
        """The devices changed since the last take, in id order (the store's lock order)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            return [self._devices[d] for d in sorted(dirty)]

    def mark_dirty(self, device_ids: Iterable[str]) -> None:
        """Write these again at the next flush (the last write of them failed)."""
        with self._lock:
            self._dirty.update(d for d in device_ids if d in self._devices)

    def take_joined(self) -> list[str]:
        with self._lock:
            joined, self._joined = self._joined, []
            return joined
