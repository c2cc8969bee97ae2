"""The outbox: desired states on their way to devices (retained, one per device).

A tick asks for desired states; they are composed here and published after the tick's
saves. A device that reports several models (version 2, docs/protocol.md) is sent one
document with the last word of every rollout to it by model name, so a rollout of one model
never drops another's entry; any other device is sent version 1, which every agent reads.
One that cannot be published (broker away) waits and goes out when the broker is back; a
newer word for the same device replaces it. Only the leader publishes.

At most ``MAX_UNACKNOWLEDGED`` desired states are handed to MQTT and not yet acknowledged by
the broker; the rest wait here, one per device. Handed over, a word can no longer be
replaced: when the broker acknowledges slowly (the controller's connection busy with what
devices send, the acknowledgements queued behind it), the executor's re-sends (a commit
every ``RESEND_MS`` to a device still in probation) would otherwise pile up copies in the
client's queue faster than they drain, and the next wave's installs would wait behind them
(BENCHMARKS.md, tree of brokers: 50,000 devices stalled that way).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Iterator

from edgefleet.agent.mqtt import MqttClient
from edgefleet.agent.protocol.payloads import (
    MAX_MODELS,
    BundleRef,
    DeltaRef,
    DesiredModels,
    DesiredState,
    encode,
)
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.catalog import ModelCatalog
from edgefleet.fleet.control.role import Role
from edgefleet.fleet.deltas import DeltaShelf
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout.executor import Action
from edgefleet.fleet.rollout.state import DeviceState, Rollout

__all__ = ["Outbox"]

log = logging.getLogger(CONTROLLER_LOG)
MAX_UNACKNOWLEDGED = 1_000  # desired states handed to MQTT, not yet acknowledged
_AGAIN = {DeviceState.TARGETED: Action.INSTALL, DeviceState.UPDATING: Action.INSTALL,
          DeviceState.PROBATION: Action.INSTALL, DeviceState.COMMITTING: Action.COMMIT,
          DeviceState.ROLLING_BACK: Action.ROLLBACK}  # what a device waited on is told again
# the last word a rollout said to a device in each state, and the states it cleared it in
_LAST_WORD = {**_AGAIN, DeviceState.TIMED_OUT: Action.INSTALL,
              DeviceState.SUCCEEDED: Action.COMMIT}
_CLEARED = frozenset({DeviceState.FAILED, DeviceState.ROLLED_BACK})


class Outbox:
    """Encoded desired states by device, oldest first; an empty payload clears one."""

    def __init__(self, fleet: str, registry: DeviceRegistry, catalog: ModelCatalog,
                 role: Role, clock: Callable[[], int], deltas: DeltaShelf | None = None) -> None:
        self.fleet, self.registry, self.catalog = fleet, registry, catalog
        self.role, self.clock, self.deltas = role, clock, deltas
        self.waiting: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        # device -> model name -> the last word sent, for devices of several models
        self.entries: dict[str, dict[str, DesiredState]] = {}
        # the same, as (when, word, rollout), rebuilt from the stored rollouts at start
        # (:meth:`restore`): taken up by the first version 2 document a device is sent
        self.restored: dict[str, dict[str, tuple[int, Action, Rollout]]] = {}
        self.mqtt: MqttClient | None = None  # set when the controller connects

    def __len__(self) -> int:
        return len(self.waiting)

    def __iter__(self) -> Iterator[str]:
        return iter(self.waiting)

    def __getitem__(self, device: str) -> bytes:
        return self.waiting[device]

    def clear(self) -> None:
        self.waiting.clear()

    def clear_device(self, device: str) -> None:
        """Remove the device's retained desired state."""
        self.entries.pop(device, None)
        self.restored.pop(device, None)
        self.waiting[device] = b""

    def queue(self, rollout: Rollout, device: str, action: Action,
              bundle: BundleRef | None = None) -> None:
        """The desired state ``rollout`` sends ``device``: its own bundle, or ``bundle``."""
        desired = self._word(rollout, device, action, bundle, self.clock(), delta=True)
        if desired is not None:
            self.waiting[device] = self._document(device, desired)

    def _word(self, rollout: Rollout, device: str, action: Action, bundle: BundleRef | None,
              issued_at: int, delta: bool) -> DesiredState | None:
        if bundle is None and action == Action.ROLLBACK:
            bundle = self._reinstall(rollout, device)
            action = Action.INSTALL if bundle is not None else action
        ref, url, size = rollout.spec.model, rollout.spec.url, rollout.spec.size
        url = self.role.desired_url(url, self.catalog.bundle_url(ref.sha256))
        if bundle is not None:
            model = self.catalog.by_sha(bundle.sha256)
            if model is None:
                log.warning("cannot send %s to %s: the controller does not hold it",
                            bundle.version, device)
                return None
            ref, url, size = model.ref, self.catalog.bundle_url(model.sha256), model.size
        return DesiredState(name=ref.name, version=ref.version, sha256=ref.sha256,
                            url=url, size=size, rollout=rollout.id, action=action.value,
                            issued_at=issued_at,
                            delta=self._delta(device, ref, action) if delta else None)

    def _document(self, device_id: str, desired: DesiredState) -> bytes:
        """Version 2 with every model's last word for a device of several models, else
        ``desired`` alone as version 1."""
        device = self.registry.get(device_id)
        if device is None or device.models is None:
            self.entries.pop(device_id, None)
            return encode(desired)
        entries = self.entries.get(device_id)
        if entries is None:  # its first since the start: every model's word from the store
            entries = self.entries[device_id] = {
                name: word for name, (ms, action, rollout) in self.restored.pop(
                    device_id, {}).items()
                if (word := self._word(rollout, device_id, action, None, ms, False)) is not None}
        entries.pop(desired.name, None)  # the newest last: the oldest go first when full
        entries[desired.name] = desired
        while len(entries) > MAX_MODELS:
            del entries[next(iter(entries))]
        return encode(DesiredModels(models=dict(entries), issued_at=desired.issued_at))

    def _delta(self, device_id: str, ref: BundleRef, action: Action) -> DeltaRef | None:
        """A delta from the bundle the device reports it runs to ``ref``, for an install
        of another bundle of the same model (docs/deltas.md)."""
        device = self.registry.get(device_id)
        active = device.model(ref.name).active if device is not None else None
        if (self.deltas is None or action != Action.INSTALL or active is None
                or active.name != ref.name or active.sha256 == ref.sha256):
            return None
        return self.deltas.offer(active.sha256, ref.sha256)

    def restore(self, rollouts: Iterable[Rollout]) -> None:
        """After a restart: the last word of every stored rollout to each device, by model
        name, replayed in the order they were said (a device whose update failed or rolled
        back had its desired state cleared then). A device of several models is sent them
        all with its next word, as before the restart (docs/protocol.md)."""
        said = sorted(((item.sent_ms if word is not None else item.since_ms, item.device,
                        rollout.id, word, rollout)
                       for rollout in rollouts for item in rollout.devices.values()
                       if item.sent_ms > 0 and (
                           (word := _LAST_WORD.get(item.state)) is not None
                           or item.state in _CLEARED)),
                      key=lambda s: s[:3])
        self.restored = {}
        for ms, device, _, word, rollout in said:
            if word is None:
                self.restored.pop(device, None)
                continue
            entries = self.restored.setdefault(device, {})
            entries.pop(rollout.spec.model.name, None)
            entries[rollout.spec.model.name] = (ms, word, rollout)
            while len(entries) > MAX_MODELS:
                del entries[next(iter(entries))]

    def requeue(self, rollouts: Iterable[Rollout]) -> None:
        """After a restart: tell every device a rollout waits on what it must do, again."""
        waiting = sorted(((item.sent_ms, rollout.id, item.device, action, rollout)
                          for rollout in rollouts
                          for item in rollout.devices.values()
                          if (action := _AGAIN.get(item.state)) is not None),
                         key=lambda w: w[:3])
        for _, _, device, action, rollout in waiting:  # the word sent last wins, as it did
            self.queue(rollout, device, action)

    def flush(self) -> None:
        """Publish what waits, oldest first, until the broker refuses one or
        ``MAX_UNACKNOWLEDGED`` are on their way (the rest go at a later flush)."""
        mqtt = self.mqtt
        if mqtt is None or not self.waiting:
            return
        while self.waiting:
            if not self.role.leading:  # the lease lapsed (a pause, the store away): not ours
                log.warning("not the leader any more: %d desired states dropped (the "
                            "leader publishes them)", len(self.waiting))
                self.waiting.clear()
                return
            if mqtt.unacknowledged() >= MAX_UNACKNOWLEDGED:
                return
            device, payload = next(iter(self.waiting.items()))
            topic = device_topic(self.fleet, device, Leaf.DESIRED)
            if not mqtt.publish(topic, payload, qos=1, retain=True):
                log.info("broker away: %d desired states wait", len(self.waiting))
                return
            del self.waiting[device]

    def _reinstall(self, rollout: Rollout, device_id: str) -> BundleRef | None:
        """The previous bundle to install again when a committed device's fallback slot no
        longer holds it (overwritten by a later update); None: its own rollback will do."""
        item, device = rollout.devices.get(device_id), self.registry.get(device_id)
        model = device.model(rollout.spec.model.name) if device is not None else None
        if item is None or item.previous is None or model is None or model.active is None:
            return None
        if model.active.sha256 != rollout.spec.model.sha256:
            return None  # in probation, or already back: the device rolls back by itself
        if model.previous is not None and model.previous.sha256 == item.previous.sha256:
            return None  # its fallback slot holds it
        if self.catalog.by_sha(item.previous.sha256) is None:
            return None  # not pushed here: the device's own rollback is all there is
        return item.previous
