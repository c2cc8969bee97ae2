"""The end of a device's life in the fleet: stale devices, and decommissioning.

A device is **stale** when it is offline and nothing of it (status, report, telemetry)
has come for a given time. **Removing** a device (``fleet devices remove``) goes, for each
call, in this order:

1. refused whole, nothing changed: an id no controller knows (404), or a device an
   unfinished rollout holds (409: abort it or let it end first);
2. then device by device: its retained topics are cleared on the broker (an empty
   retained message, QoS 1 and acknowledged, on ``state/desired``, ``state/reported`` and
   ``status``, after the same for the copies of a tree's leaf brokers
   (:mod:`edgefleet.fleet.clears`); status last: every controller that sees the cleared
   status forgets the device, so scaled-out ones agree); its row leaves the store (its
   group and tags with it); the registry forgets it; a desired state still waiting for
   it in the outbox is dropped; and the history gets a ``device.remove`` entry under the
   token's name and role. A broker that does not acknowledge stops the call there, and
   the error names the devices removed before it.

A removed device that comes back (connects, reports) registers as a new device, with no
group or tag. In secure mode (the controller's broker connection uses TLS) the answer
carries the command that revokes its certificate, which is what keeps it out.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.agent.errors import BrokerError
from edgefleet.agent.mqtt import MqttClient
from edgefleet.agent.mqtt_config import MqttSecurity
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.fleet.clears import DEVICE_RETAINED, clear_topic
from edgefleet.fleet.control.audit import AuditTrail
from edgefleet.fleet.control.outbox import Outbox
from edgefleet.fleet.domain import Device
from edgefleet.fleet.errors import ConflictError, NotFoundError
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout.state import FINISHED, RolloutState
from edgefleet.fleet.store import Store

__all__ = ["CLEARED", "DeviceLifecycle", "Removal", "clear_topics", "revoke_command"]

CLEARED = (Leaf.DESIRED, Leaf.REPORTED, Leaf.STATUS)  # the retained ones; status last
_UNFINISHED = [state for state in RolloutState if state not in FINISHED]
_ACK_TIMEOUT_S = 5.0
_SHOWN = 5


@dataclass(frozen=True)
class Removal:
    """What one call removed, what it left (with why), and how to revoke certificates."""

    removed: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    revoke: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "skipped": self.skipped, "revoke": self.revoke}


class DeviceLifecycle:
    """Stale devices and decommissioning, for one fleet (``mqtt`` is set at start)."""

    def __init__(self, fleet: str, store: Store, registry: DeviceRegistry, outbox: Outbox,
                 audit: AuditTrail, clock: Callable[[], int],
                 security: MqttSecurity | None) -> None:
        self.fleet, self.store, self.registry, self.outbox = fleet, store, registry, outbox
        self.audit, self.clock, self.security = audit, clock, security
        self.mqtt: MqttClient | None = None

    def stale(self, age_s: int) -> list[Device]:
        """Offline devices not heard from for ``age_s`` seconds, by id."""
        return self.registry.stale(age_s * 1000, self.clock())

    def remove(self, device_ids: Sequence[str], actor: str,
               stale_s: int | None = None) -> Removal:
        """Decommission ``device_ids``; with ``stale_s``, only those still stale that long
        (the others are skipped, with the reason)."""
        ids = sorted(set(device_ids))
        self._check_known(ids)
        skipped = self._not_stale(ids, stale_s) if stale_s is not None else {}
        chosen = [i for i in ids if i not in skipped]
        self._check_free(chosen)
        for done, device in enumerate(chosen):
            try:
                self._clear_retained(device)
            except BrokerError as exc:
                raise BrokerError(f"{exc.message}; {done} of {len(chosen)} devices were "
                                  f"removed before ({_listed(chosen[:done]) or 'none'})",
                                  hint="retry with the devices still listed, once the "
                                       "broker is back", transient=True) from exc
            self._forget(device, actor)
        return Removal(chosen, skipped, revoke_command(chosen, self.security))

    def _forget(self, device: str, actor: str) -> None:
        self.store.delete_devices([device])
        self.registry.forget([device])
        self.outbox.waiting.pop(device, None)
        self.audit.record(actor, "device.remove", device, "decommissioned: out of the "
                          "registry and every group, retained topics cleared")

    def _check_known(self, ids: list[str]) -> None:
        stored = {d.id for d in self.store.devices()} if ids else set()
        unknown = [i for i in ids if self.registry.get(i) is None and i not in stored]
        if unknown:
            raise NotFoundError(f"no device {_listed(unknown)}",
                                hint="nothing was removed; see edgefleet fleet devices")

    def _not_stale(self, ids: list[str], stale_s: int) -> dict[str, str]:
        stale = {d.id for d in self.stale(stale_s)}
        return {i: "online, or heard from since: not stale" for i in ids if i not in stale}

    def _check_free(self, ids: list[str]) -> None:
        wanted = set(ids)
        for rollout in self.store.rollouts(_UNFINISHED) if wanted else []:
            held = sorted(wanted & set(rollout.devices))
            if held:
                raise ConflictError(
                    f"rollout {rollout.id} ({rollout.state.value}) holds {_listed(held)}",
                    hint=f"nothing was removed; wait for it to end, or abort it: edgefleet "
                         f"fleet rollout abort {rollout.id}")

    def _clear_retained(self, device: str) -> None:
        mqtt = self.mqtt
        if mqtt is None:
            raise BrokerError("the controller is not connected to its broker",
                              hint="nothing was removed; start the controller and retry",
                              transient=True)
        for topic in clear_topics(self.fleet, device):
            mqtt.publish_wait(topic, b"", qos=1, retain=True, timeout=_ACK_TIMEOUT_S)


def clear_topics(fleet: str, device: str) -> list[str]:
    """Where a removal publishes empty retained messages, in order: the copies a tree's
    leaves keep of what the device wrote (:mod:`edgefleet.fleet.clears`), then the device's
    retained topics on the controller's broker, status last."""
    return [*(clear_topic(fleet, device, leaf) for leaf in DEVICE_RETAINED),
            *(device_topic(fleet, device, leaf) for leaf in CLEARED)]


def revoke_command(device_ids: Sequence[str], security: MqttSecurity | None
                   ) -> dict[str, str] | None:
    """In secure mode: the command that revokes the devices' certificates (the CA folder
    is the one of the controller's ``--ca``; device certificates where ``edgefleet certs
    device`` writes them), and what to do after it."""
    if security is None or not security.tls or not device_ids:
        return None
    folder = security.ca_file.parent if security.ca_file is not None else None
    ca_dir = str(folder) if folder is not None and str(folder) else "certs"
    command = ["edgefleet", "certs", "revoke", "--dir", ca_dir,
               *(f"{ca_dir}/devices/{device}.crt" for device in device_ids)]
    return {"command": shlex.join(command),
            "then": "reload the broker so it reads the list again (systemctl reload "
                    "mosquitto, or SIGHUP); its crlfile must be " + f"{ca_dir}/ca.crl"}


def _listed(ids: Sequence[str]) -> str:
    text = ", ".join(repr(i) for i in ids[:_SHOWN])
    return text if len(ids) <= _SHOWN else f"{text} and {len(ids) - _SHOWN} more"
