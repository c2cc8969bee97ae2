"""Devices in the store: the registry's changes written in batches (by the leader), and
the groups, tags and labels operators give devices (through any controller)."""

from __future__ import annotations

from edgefleet.fleet.control.audit import AuditTrail
from edgefleet.fleet.control.role import Role
from edgefleet.fleet.domain import Device
from edgefleet.fleet.errors import FleetError, NotFoundError
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.store import Store

__all__ = ["DeviceBook"]


class DeviceBook:
    """Writes the registry's dirty devices and operators' labels into the store."""

    def __init__(self, store: Store, registry: DeviceRegistry, role: Role,
                 audit: AuditTrail) -> None:
        self.store, self.registry, self.role, self.audit = store, registry, role, audit

    def flush(self) -> None:
        """Write the devices that changed since the last flush (the leader only)."""
        if not self.role.leading:
            return  # the leader writes devices; they stay dirty here until this one leads
        forgotten = self.registry.take_forgotten()
        if forgotten:  # removed through another controller, or here: gone from the store too
            try:
                self.store.delete_devices(forgotten)
            except FleetError:
                self.registry.mark_forgotten(forgotten)
                raise
        dirty = self.registry.take_dirty()
        if dirty:
            try:
                self.store.upsert_devices(dirty)
            except FleetError:
                self.registry.mark_dirty(d.id for d in dirty)  # written at the next flush
                raise

    def set_group(self, devices: list[str], group: str | None, actor: str) -> list[Device]:
        self.flush()
        self._store_new(devices)
        self.store.set_group(devices, group)
        changed = [self._reload(d) for d in devices]
        self.audit.record(actor, "device.group", ",".join(devices), f"group {group}")
        return changed

    def tag(self, device: str, add: list[str], remove: list[str], actor: str) -> Device:
        self.flush()
        self._store_new([device])
        self.store.set_tags(device, add, remove)
        changed = self._reload(device)
        self.audit.record(actor, "device.tags", device, f"+{add} -{remove}")
        return changed

    def _store_new(self, device_ids: list[str]) -> None:
        """A follower labels a device it saw before the leader wrote it: write it first
        (only if missing: the leader's rows stay as they are)."""
        if not self.role.leading:
            known = [d for i in device_ids if (d := self.registry.get(i)) is not None]
            self.store.insert_devices(known)

    def _reload(self, device_id: str) -> Device:
        """The device with the group and tags just stored (its reported state as known
        here: scaled out, the store's row may be older than this registry)."""
        device = self.store.device(device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id!r}")
        return self.registry.relabel(device.id, device.group, device.tags,
                                     device.labels) or device

    def label(self, device: str, put: dict[str, str], remove: list[str], actor: str) -> Device:
        """Set and remove labels an operator gives ``device`` (selectors: label:KEY=VALUE)."""
        self.flush()
        self._store_new([device])
        self.store.set_labels(device, put, remove)
        changed = self._reload(device)
        shown = " ".join([*(f"{k}={v}" for k, v in sorted(put.items())),
                          *(f"-{k}" for k in remove)])
        self.audit.record(actor, "device.labels", device, shown)
        return changed
