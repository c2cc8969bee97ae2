"""One simulated device: the agent's MQTT behaviour and update rules, with no thread of its own.

It reacts to ``state/desired`` as :class:`edgefleet.agent.update.runner.UpdateRunner` does
(a commit or rollback for the target on its way or in probation settles its probation;
anything else is queued and applied in order; ``rollback`` of the active bundle on a committed
device returns to the previous committed bundle) and publishes what
:class:`edgefleet.agent.service.AgentService` publishes: ``online`` and the reported
state on connect, an ``update`` event and the reported state on every journal
transition, a ``model_loaded`` event on every model change, and telemetry.

Threads: MQTT callbacks and telemetry ticks run on the network thread; update
steps run on the shared worker pool, one step per job, and never more than one
job per device at a time. A device in PROBATION holds no job: it is parked
until the fleet, a gate or the auto-commit window decides.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from collections import deque
from collections.abc import Callable

from edgefleet.agent import __version__
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.payloads import (
    STATUS_OFFLINE,
    STATUS_ONLINE,
    BundleRef,
    DesiredState,
    ReportedState,
    decode,
    encode,
)
from edgefleet.agent.protocol.payloads import Event as EventPayload
from edgefleet.agent.protocol.topics import Leaf, device_topic
from edgefleet.agent.update.attempts import starts_attempt
from edgefleet.agent.update.flow import Updater
from edgefleet.agent.update.report import target_ref, update_report
from edgefleet.agent.update.states import TERMINAL, Event, Journal, UpdateState
from edgefleet.agent.update.target import UpdateTarget
from edgefleet.fleet.simulate.agreement import AgreementTable
from edgefleet.fleet.simulate.effects import SimEffects
from edgefleet.fleet.simulate.env import FleetEnv, Outlet
from edgefleet.fleet.simulate.models import ModelProfile
from edgefleet.fleet.simulate.options import DeviceTraits
from edgefleet.fleet.simulate.payloads import telemetry_point
from edgefleet.fleet.simulate.serving import Load, Serving
from edgefleet.fleet.simulate.slots import MemorySlots

__all__ = ["SimDevice"]

log = logging.getLogger(__name__)
Job = Callable[[], object]


class SimDevice:
    """A device as the fleet sees it over MQTT; its update flow is the agent's own."""

    def __init__(self, device_id: str, env: FleetEnv, traits: DeviceTraits,
                 initial: ModelProfile | None = None, initial_url: str = "") -> None:
        self.id, self.env, self.traits = device_id, env, traits
        self.topics = {leaf: device_topic(env.fleet, device_id, leaf) for leaf in Leaf}
        self.outlet: Outlet | None = None
        self.lock = threading.Lock()
        self.serving = Serving()
        self.slots = MemorySlots.flashed(initial.ref) if initial else MemorySlots()
        self.journal = Journal()
        self.initial_sha = initial.sha256 if initial else None
        if initial is not None:
            self.serving.activate(initial)
            first = UpdateTarget(name=initial.ref.name, version=initial.ref.version,
                                 sha256=initial.sha256, url=initial_url)
            self.journal = Journal(UpdateState.COMMITTED, first, {UpdateState.COMMITTED.value: 1})
        self.staged_ref: BundleRef | None = None
        self.updater = Updater(SimEffects(self))
        self._pending: deque[DesiredState] = deque()
        self._decision: Event | None = None
        self._running = False
        self._event_seq = self._telemetry_seq = self._spool_dropped = 0
        self._spool: deque[bytes] = deque()

    # --- network thread --------------------------------------------------------------
    def on_connected(self) -> None:
        self._publish(Leaf.STATUS, STATUS_ONLINE.encode(), retain=True)
        self.publish_reported()

    def on_stopping(self) -> None:
        self._publish(Leaf.STATUS, STATUS_OFFLINE.encode(), retain=True)

    def on_message(self, topic: str, payload: bytes) -> None:
        """``AgentService._desired_message`` and ``UpdateRunner.desired``."""
        if not payload:
            return  # a cleared retained message
        try:
            desired = decode(DesiredState, payload)
        except EdgefleetError as exc:
            log.warning("%s dropped a malformed desired state: %s", self.id, exc)
            self.publish_event("payload_rejected", f"{topic}: {exc.message}")
            return
        with self.lock:
            in_flight = self.journal.state not in TERMINAL
            same = self.journal.target.sha256 == desired.sha256
            if desired.action in ("commit", "rollback") and in_flight and same:
                self._decision = Event.COMMIT if desired.action == "commit" else Event.ROLLBACK
            else:
                self._pending.append(desired)
        self._kick()

    def tick(self) -> None:
        """One telemetry interval: serve its requests, publish (or spool) the point, gates."""
        with self.lock:
            values = self.serving.window(self.env.rng, self._load())
            self._telemetry_seq += 1
            point = telemetry_point(values, self._telemetry_seq, self.serving.cpu_percent,
                                    self._spool_dropped, len(self._spool))
            gate = (self.journal.state == UpdateState.PROBATION and self._decision is None
                    and self.serving.gate_failed(self.journal.target.version,
                                                 self.env.options.settings))
            if gate:
                self._decision = Event.FAILURE
        self._deliver(point)
        if gate:
            self._kick()

    # --- worker pool -------------------------------------------------------------------
    def _kick(self) -> None:
        with self.lock:
            if self._running:
                return
            self._running = True
        self.env.submit(self._work)

    def _work(self) -> None:
        job = self._next_job()
        if job is None:
            return
        try:
            job()
        except Exception:  # the device must survive anything and keep serving
            log.exception("%s: update step failed", self.id)
        self.env.submit(self._work)

    def _next_job(self) -> Job | None:
        with self.lock:
            state = self.journal.state
            parked = state == UpdateState.PROBATION and self._decision is None
            if state not in TERMINAL and not parked:
                return lambda: self.updater.step(self.journal)
            if state in TERMINAL and self._pending:
                desired = self._pending.popleft()
                return lambda: self._apply(desired)
            self._running = False
            return None

    def _apply(self, desired: DesiredState) -> None:
        """``UpdateRunner._apply``: start, ignore, or roll a committed update back."""
        active = self.slots.active
        active_sha = active.sha256 if active else None
        journal = self.journal
        if desired.action == "rollback":
            if journal.state == UpdateState.COMMITTED and active_sha == desired.sha256:
                self.updater.move(journal, Event.ROLLBACK, "rollback asked for by the fleet")
            return
        if not starts_attempt(journal, desired, active_sha):
            return  # already there, already on the way, or this attempt was made
        with self.lock:
            self._decision = None  # a word left from an earlier attempt is stale
        self.updater.start(journal, UpdateTarget.from_desired(desired))

    # --- called by the update effects (worker pool) --------------------------------------------
    def take_decision(self) -> Event:
        with self.lock:
            decision, self._decision = self._decision, None
        if decision is None:
            raise RuntimeError(f"{self.id}: probation stepped without a decision")  # a bug
        return decision

    def activate(self, profile: ModelProfile) -> None:
        """The serving model changed: ``AgentService._model_changed``."""
        with self.lock:
            self.serving.activate(profile)
        self.publish_reported()
        self.publish_event("model_loaded", f"serving {profile.ref.name} {profile.version}",
                           bundle=profile.ref)

    def start_shadow(self, against: str, table: AgreementTable | None) -> None:
        with self.lock:
            self.serving.start_shadow(against, table)

    def stop_shadow(self) -> None:
        with self.lock:
            self.serving.stop_shadow()

    def journal_changed(self, journal: Journal) -> None:
        """``AgentService._journal_changed``, plus the auto-commit window of a probation."""
        self.publish_event("update", journal.detail, state=journal.state.value,
                           bundle=target_ref(journal))
        self.publish_reported()
        settings = self.env.options.settings
        if journal.state == UpdateState.PROBATION and journal.target.auto_commits(
                settings.auto_commit):
            self.env.scheduler.call_later(settings.probation_s,
                                          lambda: self._auto_commit(journal.since))

    def latency_factor(self, sha256: str) -> float:
        """This device's speed, times ``slow_factor`` on new bundles when it is slow."""
        slow = self.traits.slow and sha256 != self.initial_sha
        return self.traits.speed * (self.env.options.slow_factor if slow else 1.0)

    # --- publishing ----------------------------------------------------------------------
    def reported_state(self) -> ReportedState:
        active = self.serving.active
        return ReportedState(fleet=self.env.fleet, device=self.id, agent_version=__version__,
                             active=active.ref if active else None,
                             previous=self.slots.previous, slot=self.slots.pointer.active,
                             update=update_report(self.journal), runtimes=self.env.runtimes,
                             profile=self.env.options.profile, serving=active is not None,
                             arch=platform.machine() or None,
                             labels=dict(self.env.options.labels) or None,
                             ts=int(time.time() * 1000))

    def publish_reported(self) -> None:
        self._publish(Leaf.REPORTED, encode(self.reported_state()), retain=True)

    def publish_event(self, kind: str, detail: str = "", state: str | None = None,
                      bundle: BundleRef | None = None) -> None:
        """Numbered under the lock and handed to the network thread in that order."""
        with self.lock:
            self._event_seq += 1
            active = self.serving.active
            event = EventPayload(seq=self._event_seq, ts=int(time.time() * 1000), kind=kind,
                                 state=state, detail=detail,
                                 bundle=bundle or (active.ref if active else None))
            self._publish(Leaf.EVENTS, encode(event))

    def _publish(self, leaf: Leaf, payload: bytes, retain: bool = False) -> bool:
        outlet = self.outlet
        return outlet.publish(self.topics[leaf], payload, retain) if outlet else False

    def _deliver(self, point: bytes) -> None:
        """``TelemetryReporter._deliver``: backlog first (as arrays), else spool, oldest out."""
        if self.outlet is not None and self.outlet.connected:
            while self._spool:
                batch = [self._spool.popleft() for _ in range(min(50, len(self._spool)))]
                self._publish(Leaf.TELEMETRY, b"[" + b",".join(batch) + b"]")
            if self._publish(Leaf.TELEMETRY, point):
                return
        self._spool.append(point)
        if len(self._spool) > self.env.options.spool_max_points:
            self._spool.popleft()
            self._spool_dropped += 1

    def _load(self) -> Load:
        active = self.serving.active
        new = active is not None and active.sha256 != self.initial_sha
        options, disagree = self.env.options, self.traits.disagree and new
        return Load(rate=options.request_rate,
                    latency_factor=self.latency_factor(active.sha256) if active else 1.0,
                    wrong_rate=options.disagree_rate if disagree else 0.0,
                    error_rate=options.disagree_error_rate if disagree else 0.0,
                    sample_every=options.settings.agreement_sample_every,
                    drifting=self.traits.drifting)

    def _auto_commit(self, since: int) -> None:
        with self.lock:
            if (self.journal.state != UpdateState.PROBATION or self.journal.since != since
                    or self._decision is not None):
                return
            self._decision = Event.COMMIT
        self._kick()
