"""A read-only look at one simulated device, for tests, the CLI and ``wait_until``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.fleet.simulate.device import SimDevice

__all__ = ["DeviceView", "summarize"]


class DeviceView:
    """What a device serves, where its update is, and whether it is connected (live)."""

    __slots__ = ("_device",)

    def __init__(self, device: SimDevice) -> None:
        self._device = device

    def __repr__(self) -> str:
        return (f"DeviceView({self.id!r}, online={self.online}, active={self.active_version}, "
                f"update={self.update_state}, faults={self.faults})")

    @property
    def id(self) -> str:
        return self._device.id

    @property
    def online(self) -> bool:
        outlet = self._device.outlet
        return bool(outlet and outlet.connected)

    @property
    def active(self) -> BundleRef | None:
        model = self._device.serving.active
        return model.ref if model else None

    @property
    def active_version(self) -> str | None:
        model = self._device.serving.active
        return model.version if model else None

    @property
    def previous_version(self) -> str | None:
        previous = self._device.slots.previous
        return previous.version if previous else None

    @property
    def update_state(self) -> str:
        return self._device.journal.state.value

    @property
    def update_detail(self) -> str:
        return self._device.journal.detail

    @property
    def faults(self) -> tuple[str, ...]:
        return self._device.traits.faults


def summarize(devices: Mapping[str, DeviceView]) -> dict[str, Any]:
    """Counts for a status line: online, per update state, and per (state, active version)."""
    views = list(devices.values())
    groups = Counter((v.update_state, v.active_version or "-") for v in views)
    return {"devices": len(views), "online": sum(v.online for v in views),
            "states": dict(Counter(v.update_state for v in views)),
            "groups": [{"state": state, "version": version, "devices": n}
                       for (state, version), n in sorted(groups.items())]}
