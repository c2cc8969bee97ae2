"""The simulator's :class:`edgefleet.agent.update.flow.UpdateEffects`: the real flow, simulated I/O.

``download`` really requests the URL (or the delta the desired state offers, and
rebuilds the bundle from the device's own: :mod:`edgefleet.fleet.simulate.delta`),
``verify`` really checks the signature and hashes (once per content, shared), the
health check really loads and runs
the model (once per bundle, shared); staging and switching move the device's
in-memory A/B pointer. ``probation`` never waits: the device only steps a
PROBATION journal once the fleet (or a gate, or the auto-commit window) has
decided, and this returns that decision.

What it needs of its device is :class:`SimHardware`, which
:class:`edgefleet.fleet.simulate.device.SimDevice` implements: this module does not
import the device.
"""

from __future__ import annotations

import time
from typing import Protocol

from edgefleet.agent.health import HealthCheckError
from edgefleet.agent.protocol.errors import EdgefleetError, IntegrityError
from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.update.states import Event, Journal
from edgefleet.fleet.simulate.agreement import AgreementTable
from edgefleet.fleet.simulate.env import FleetEnv
from edgefleet.fleet.simulate.models import ModelProfile
from edgefleet.fleet.simulate.options import DeviceTraits
from edgefleet.fleet.simulate.serving import Serving
from edgefleet.fleet.simulate.slots import MemorySlots

__all__ = ["SimEffects", "SimHardware"]


class SimHardware(Protocol):
    """The simulated device as its update effects see it: slots, serving, shared caches."""

    env: FleetEnv
    traits: DeviceTraits
    slots: MemorySlots
    serving: Serving
    staged_ref: BundleRef | None
    journal: Journal

    def activate(self, profile: ModelProfile) -> None: ...
    def start_shadow(self, against: str, table: AgreementTable | None) -> None: ...
    def stop_shadow(self) -> None: ...
    def take_decision(self) -> Event: ...
    def journal_changed(self, journal: Journal) -> None: ...
    def latency_factor(self, sha256: str) -> float: ...


class SimEffects:
    """Implements :class:`edgefleet.agent.update.flow.UpdateEffects` for one simulated
    device."""

    def __init__(self, device: SimHardware) -> None:
        self.device = device
        self._digest: str | None = None  # what the last download brought

    def download(self, journal: Journal) -> None:
        device = self.device
        base = device.slots.active if device.env.options.deltas else None
        self._digest = device.env.deltas.fetch(journal.target, base)

    def verify(self, journal: Journal) -> None:
        env = self.device.env
        if self._digest is None:
            raise EdgefleetError("nothing was downloaded for this update",
                                 hint="the update restarts")
        bundle = env.models.verify(self._digest, env.downloads.body(self._digest))
        if bundle.sha256 != journal.target.sha256:
            raise IntegrityError(f"downloaded bundle is {bundle.manifest.ref} with manifest "
                                 f"sha256 {bundle.sha256[:12]}, the target names "
                                 f"{journal.target.sha256[:12]}",
                                 hint="the server sent another bundle; check the URL")
        self.device.staged_ref = BundleRef(name=bundle.manifest.name,
                                           version=bundle.manifest.version, sha256=bundle.sha256)

    def stage(self, journal: Journal) -> None:
        device = self.device
        if device.slots.slot_of(journal.target.sha256) is None:
            if device.staged_ref is None:
                raise EdgefleetError("no verified bundle to stage", hint="the update restarts")
            device.slots.stage(device.staged_ref)
        self._digest = None

    def health_check(self, journal: Journal) -> None:
        device = self.device
        profile = device.env.models.profile(self._staged(journal))
        if device.traits.fail_health:
            raise HealthCheckError("health check: output differs from the expected outputs "
                                   "(simulated fault: fail_health)",
                                   hint="the model computes differently on this device; "
                                   "do not deploy it here")
        latency = profile.health_latency_ms * device.latency_factor(profile.sha256)
        budget = device.env.options.settings.latency_budget_ms
        if budget is not None and latency > budget:
            raise HealthCheckError(f"health check latency {latency:.2f} ms per sample exceeds "
                                   f"the budget of {budget:.2f} ms",
                                   hint="use a smaller or quantized model for this device")

    def switch(self, journal: Journal) -> None:
        device = self.device
        slot = device.slots.slot_of(journal.target.sha256)
        if slot is None:
            raise EdgefleetError("the staged bundle is gone", hint="the update restarts")
        candidate = device.env.models.profile(self._staged(journal))
        previous = device.serving.active
        device.slots.switch(slot)
        device.activate(candidate)
        if previous is not None and previous.version != candidate.version:
            device.start_shadow(previous.version,
                                device.env.models.agreement(candidate.sha256, previous.sha256))

    def probation(self, journal: Journal) -> Event:
        return self.device.take_decision()

    def commit(self, journal: Journal) -> None:
        self.device.stop_shadow()
        self.device.slots.commit()

    def rollback(self, journal: Journal) -> None:
        device = self.device
        device.stop_shadow()
        device.slots.rollback()
        active = device.slots.active
        if active is None:
            raise EdgefleetError("no bundle to roll back to", hint="install one")
        device.activate(device.env.models.profile(active.sha256))

    def save(self, journal: Journal) -> None:
        self.device.journal = journal

    def report(self, journal: Journal) -> None:
        self.device.journal_changed(journal)

    def now_ms(self) -> int:
        return int(time.time() * 1000)

    def _staged(self, journal: Journal) -> str:
        sha = journal.target.sha256
        if self.device.slots.slot_of(sha) is None:
            raise EdgefleetError("no staged bundle for this update", hint="the update restarts")
        return sha
