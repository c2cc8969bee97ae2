"""The fleet controller: registry, model versions, rollouts, audit, over one broker and one store.

Threads: paho's network thread feeds the registry and the telemetry book (cheap, no
store writes); the loop thread, every ``tick_s``, writes dirty devices in one batch,
ticks every live rollout (pure, :mod:`edgefleet.fleet.rollout.executor`), saves what changed, and
only then publishes the desired states the tick asked for. A desired state that cannot
be published (broker away) waits in an outbox and goes out when the broker is back.

After a restart the controller loads the store, publishes the desired state of every
device a rollout is still waiting on again (retained and idempotent: an agent ignores a
target it already runs or is already updating to), and carries on: no device is updated
twice.

Scale-out (``lease_s``, docs/scale-out.md): several controllers share the store and the
broker; the one holding the lease (:mod:`edgefleet.fleet.lease`) leads: only it writes devices,
ticks rollouts and publishes desired states, every save fenced by its lease generation.
When it is elected it loads the live rollouts and publishes again, exactly as after a
restart. Followers keep their registry from MQTT and answer the API; their rollout
actions are relayed to the leader through the store (:mod:`edgefleet.fleet.scale`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.mqtt import MqttClient, MqttSecurity
from edgefleet.agent.protocol.bundle import read_bundle
from edgefleet.agent.protocol.drift import Monitoring
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.files import atomic_write
from edgefleet.agent.protocol.keyring import (
    KEYRING_FILE,
    SignedKeyring,
    accept_keyring,
    load_keyring,
    parse_keyring,
)
from edgefleet.agent.protocol.payloads import (
    BundleRef,
    DesiredState,
    encode,
)
from edgefleet.agent.protocol.signing import TrustedKeys
from edgefleet.agent.protocol.telemetry_schema import drift_problem
from edgefleet.agent.protocol.topics import (
    Leaf,
    check_id,
    device_topic,
    fleet_filter,
    keyring_topic,
    parse_topic,
)
from edgefleet.agent.runtime.inspect import ModelInfo, inspect_model
from edgefleet.fleet import ingest
from edgefleet.fleet.compat import incompatibility
from edgefleet.fleet.domain import AuditEntry, Device, ModelVersion
from edgefleet.fleet.drift import Alert, AlertChange, DriftMonitor, DriftPolicy, DriftView
from edgefleet.fleet.errors import ConflictError, FleetError, InvalidRolloutError, NotFoundError
from edgefleet.fleet.lease import Fence, Turn
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.relay import OperatorRequest, error_result
from edgefleet.fleet.rollout import executor
from edgefleet.fleet.rollout.executor import Action, Decisions, DeviceView, Observations, Quality
from edgefleet.fleet.rollout.state import ACTIVE, DeviceState, Rollout, RolloutState
from edgefleet.fleet.rollout.validate import rollout_spec
from edgefleet.fleet.scale import ScaleOut, check_group, shared_filter
from edgefleet.fleet.store import Store
from edgefleet.fleet.telemetry import TelemetryBook, VersionKey

__all__ = ["ControllerConfig", "FleetController"]

log = logging.getLogger(__name__)
SYSTEM = "controller"
_FOLLOW_AFTER_END_MS = 24 * 3600 * 1000
_DRIFT_PREFIX = "drift:"  # settings key of a model's DriftPolicy
_KEYRING_KEY = "keyring"  # settings key of the fleet keyring's signed bytes
MIN_REFERENCE_SAMPLES = 100  # drift is judged only against references at least this big
_POLICIES_EVERY_MS = 30_000  # how often the drift policies are read again from the store
_DRIFT_VIEW_KEY = "state:drift"  # settings key of the leader's DriftView (scale-out)
_DRIFT_VIEW_EVERY_MS = 5_000  # how often the leader rewrites it while nothing fires
# a finished rollout is followed (up to a day) while the executor has a device of it to
# follow: on its way, rolling back, timed out (it may answer late) or failed (it may retry)
_UNSETTLED = executor.FOLLOWED
_BASELINE_SAMPLE = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class ControllerConfig:
    fleet: str
    broker_url: str
    data_dir: Path
    public_url: str  # how devices reach this controller's HTTP server, e.g. http://10.0.0.2:8600
    trusted: TrustedKeys
    tick_s: float = 1.0
    mqtt_security: MqttSecurity | None = None  # TLS files, client certificate, user/password
    quality_window_ms: int = 300_000
    # scale-out (docs/scale-out.md): several controllers on one store and one broker
    controller_id: str = ""  # unique among them; shown in /healthz
    lease_s: float | None = None  # None: the only controller (no lease)
    shared_telemetry: str | None = None  # share group: telemetry split between controllers

    def __post_init__(self) -> None:
        if self.lease_s is not None and self.lease_s < 3 * self.tick_s - 1e-9:
            raise FleetError(f"a lease of {self.lease_s:g} s is shorter than 3 ticks "
                             f"({self.tick_s:g} s each)",
                             hint="pass --lease-s of at least 3 x --tick, e.g. "
                                  f"--lease-s {max(3 * self.tick_s, 5):g}")
        if self.lease_s is not None and not self.controller_id:
            raise FleetError("scaled-out controllers need an id each",
                             hint="pass --controller-id NAME (unique among them)")
        if self.shared_telemetry is not None:
            if self.lease_s is None:
                raise FleetError("--shared-telemetry splits telemetry between several "
                                 "controllers, and they need a leader",
                                 hint="pass --lease-s too (docs/scale-out.md)")
            try:
                check_group(self.shared_telemetry)
            except ValueError as exc:
                raise FleetError(str(exc), hint="e.g. --shared-telemetry edgefleet") from exc


class FleetController:
    """Everything the API and the CLI ask of the fleet, and the loop that runs rollouts."""

    def __init__(self, config: ControllerConfig, store: Store,
                 clock: Callable[[], int] = now_ms) -> None:
        self.config, self.store, self.clock = config, store, clock
        self.artifacts = config.data_dir / "bundles"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.scale: ScaleOut | None = None
        scaled = config.lease_s is not None
        shared = config.shared_telemetry is not None
        self.telemetry = TelemetryBook(config.quality_window_ms, journal=shared)
        self._references: dict[VersionKey, Monitoring | None] = {}
        self._policies: dict[str, DriftPolicy] = {}
        self._policies_read_ms = 0
        self.drift = DriftMonitor(self._drift_reference, self.drift_policy, journal=shared)
        self._drift_view: DriftView | None = None  # a follower's copy of the leader's
        self._drift_written: tuple[int, int] = (-1, 0)  # (windows, ms) of the last write
        if scaled:  # before the registry is read: labels changed meanwhile come again
            self.scale = ScaleOut(store, self.telemetry, self.drift, config.controller_id,
                                  float(config.lease_s or 0), config.tick_s, config.public_url,
                                  config.shared_telemetry, clock)
        self.registry = DeviceRegistry(config.fleet, store.devices())
        self.rejected = 0  # malformed messages dropped
        self.rejected_by: collections.Counter[str] = collections.Counter()  # by reason
        self.broken_ticks = 0  # rollout ticks that raised (each stopped its rollout)
        self._rollouts: dict[str, Rollout] = {}
        self._outbox: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._info: dict[str, ModelInfo | None] = {}
        self._models: dict[str, ModelVersion] = {}
        self._views: dict[str, tuple[Device, str | None, DeviceView]] = {}
        # (model sha256, profile, runtimes, decryption key ids) -> why incompatible, or None
        self._compat: dict[tuple[str, str | None, tuple[tuple[str, str], ...],
                                 tuple[str, ...] | None], str | None] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.mqtt: MqttClient | None = None
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._keyring_parsed: tuple[str, SignedKeyring] | None = None  # (stored text, parsed)

    # --- life -------------------------------------------------------------------------

    def start(self) -> FleetController:
        if self.scale is None:
            self._load_rollouts()
        else:
            self.scale.share_bundles(self._local_bundles())
            with self._lock:
                self._take_turn()
        self.mqtt = MqttClient.from_url(self._client_id(), self.config.broker_url,
                                        security=self.config.mqtt_security)
        # every leaf but state/desired: the controller writes that one itself
        for leaf in (Leaf.STATUS, Leaf.REPORTED, Leaf.EVENTS, Leaf.TELEMETRY):
            topic_filter = fleet_filter(self.config.fleet, leaf)
            if leaf == Leaf.TELEMETRY and self.config.shared_telemetry is not None:
                topic_filter = shared_filter(self.config.shared_telemetry, topic_filter)
            self.mqtt.subscribe(topic_filter, self._message)
        self._start_keyring()  # trust the stored keyring; publish it on every connection
        self.mqtt.start()
        self._thread = threading.Thread(target=self._loop, name="edgefleet-controller",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            self._flush_devices()
            if self.scale is not None:
                try:
                    self.scale.release()  # a follower takes over at its next tick
                except FleetError as exc:
                    log.warning("could not release the lease (it expires by itself): %s", exc)
        if self.mqtt is not None:
            self.mqtt.stop()

    def _client_id(self) -> str:
        """Unique per controller: a broker disconnects the older of two equal client ids."""
        suffix = f"-{self.config.controller_id}" if self.scale is not None else ""
        return f"edgefleet-controller-{self.config.fleet}{suffix}"

    def _load_rollouts(self) -> None:
        """Follow the live rollouts of the store and tell their devices again (start,
        election)."""
        now = self.clock()
        self._rollouts = {r.id: r for r in self.store.rollouts() if self._followed(r, now)}
        self._outbox.clear()
        self._republish_waiting()

    @property
    def leading(self) -> bool:
        """This controller executes rollouts (always, unless scaled out)."""
        return self.scale is None or self.scale.leading

    def _loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.step()
            except Exception:  # the loop must outlive a bad tick; the next one retries
                log.exception("controller step failed")

    # --- ingest (MQTT network thread) ---------------------------------------------------

    def _message(self, topic: str, payload: bytes) -> None:
        """One device message, checked whole against its schema (:mod:`edgefleet.fleet.ingest`)
        before anything of it is kept; a refused one is counted by reason and logged."""
        try:
            address = parse_topic(topic)
        except (EdgefleetError, ValueError) as exc:
            self._reject(topic, "topic", exc)
            return
        try:
            self._take(address.leaf, address.device, payload)
        except (EdgefleetError, ValueError) as exc:
            self._reject(topic, ingest.reason(exc), exc)

    def _take(self, leaf: Leaf, device: str, payload: bytes) -> None:
        now = self.clock()
        if leaf == Leaf.TELEMETRY:
            for ts, values in ingest.telemetry(payload):
                if "drift" in values and (problem := drift_problem(values)):
                    values = self._without_drift(device, values, problem)
                self.telemetry.add(device, ts, values)
                if "drift" in values:
                    self.drift.offer(device, values["model"], values["model_version"], ts,
                                     values["drift"])
            self.registry.seen(device, now)
        elif leaf == Leaf.STATUS and payload:
            self.registry.status(device, ingest.status(payload), now)
        elif leaf == Leaf.REPORTED and payload:
            self.registry.reported(ingest.reported(device, payload, self.config.fleet), now)
        elif leaf == Leaf.EVENTS:
            self._notify("event", {"device": device, "event": ingest.event(payload)})

    def _without_drift(self, device: str, values: dict[str, Any],
                       problem: str) -> dict[str, Any]:
        """A point whose drift window is unusable: the rest of it is still good."""
        self.drift.rejected += 1
        log.warning("dropped the drift window of %s: %s", device, problem)
        return {key: value for key, value in values.items() if key != "drift"}

    def _reject(self, topic: str, reason: str, exc: Exception) -> None:
        self.rejected += 1
        self.rejected_by[reason] += 1
        log.warning("dropped a message on %s (%s): %s", topic[:200], reason, exc)

    def _notify(self, kind: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, data)
            except Exception:
                log.exception("listener failed")

    # --- the loop -----------------------------------------------------------------------

    def step(self) -> None:
        """Write dirty devices, tick every live rollout, publish what the ticks decided.

        Scaled out, first renew or contest the lease, take in other controllers' label
        changes and share telemetry; a follower stops there, a leader also runs the
        requests followers relayed.
        """
        with self._lock:
            self._judge_drift()
            if self.scale is not None:
                self._take_turn()
                self.scale.sync_labels(self.registry)
                if self.config.shared_telemetry is not None:
                    self.scale.exchange_telemetry(self._wanted_keys())
                if not self.leading:
                    self.registry.take_joined()  # the leader handles newcomers
                    return
            now = self.clock()
            self._flush_devices()
            if self.scale is not None:
                for request in self.scale.take_requests():
                    self._run_request(request)
            joined = set(self.registry.take_joined())
            for rollout in list(self._rollouts.values()):
                self._tick(rollout, joined, now, SYSTEM)
            self._flush_outbox()

    def _tick(self, rollout: Rollout, joined: set[str], now: int, actor: str) -> Rollout:
        """One rollout's tick, applied; a tick that raises stops that rollout only.

        The executor is pure, so what raises in it comes from this rollout's own data (a
        store written before its options were checked may hold a NaN rate): the rollout
        is aborted with the reason (or, if even that fails, no longer followed here) and
        the loop steps the others. Store failures raise as before: the next step retries.
        """
        try:
            decisions = executor.tick(rollout, self._observe(rollout, joined), now)
        except FleetError:
            raise
        except Exception as exc:  # one rollout's bad data must never stop the others
            log.exception("rollout %s: its tick failed; stopping it", rollout.id)
            return self._stop_broken(rollout, exc, now, actor)
        return self._apply(decisions, actor)

    def _stop_broken(self, rollout: Rollout, exc: Exception, now: int, actor: str) -> Rollout:
        self.broken_ticks += 1
        reason = f"stopped: its tick failed ({type(exc).__name__}: {str(exc)[:200]})"
        if not rollout.finished:
            try:
                aborted = executor.abort(rollout, now, reason)
            except Exception:  # the abort cannot run on this rollout's data either
                log.exception("rollout %s: cannot abort it either", rollout.id)
            else:
                return self._apply(aborted, actor)  # a store failure: the next step retries
        self._rollouts.pop(rollout.id, None)  # finished, or beyond repair: left alone here
        self._audit(actor, "rollout.progress", rollout.id, f"no longer followed: {reason}",
                    outcome="failed")
        return rollout

    def _judge_drift(self) -> None:
        """Compare the drift windows telemetry brought since the last tick; audit and
        announce every alert raised or cleared."""
        now = self.clock()
        if now - self._policies_read_ms >= _POLICIES_EVERY_MS:  # set on any controller
            self._policies_read_ms = now
            self._policies = {key.partition(":")[2]: DriftPolicy(**value) for key, value in
                              self.store.settings(_DRIFT_PREFIX).items()}
            if self.scale is not None:
                self._follow_keyring()
        changes = self.drift.process()
        if self.scale is None:
            self._announce(changes)
        elif self.leading:  # the leader judges for everyone and says so once
            self._announce(changes)
            self._write_drift_view(now, bool(changes))
        else:  # a follower keeps its pools for a takeover and shows the leader's view
            self._read_drift_view()

    def _announce(self, changes: list[AlertChange]) -> None:
        for change in changes:
            alert = change.alert
            self._audit(SYSTEM, f"drift.{change.kind}", alert.device,
                        f"{alert.model}:{alert.version} {alert.feature} PSI {alert.psi:.3f} "
                        f"(threshold {alert.threshold})", **alert.as_dict())
            self._notify("alert", {"kind": change.kind, **alert.as_dict()})

    def _write_drift_view(self, now: int, changed: bool) -> None:
        """The leader's alerts and PSI summary into the store: at once when an alert was
        raised or cleared, else every few seconds while windows come in."""
        windows, written_ms = self._drift_written
        if changed or windows < 0 or (self.drift.windows != windows
                                      and now - written_ms >= _DRIFT_VIEW_EVERY_MS):
            view = self.drift.view()
            self.store.put_setting(_DRIFT_VIEW_KEY, view.as_dict(), now)
            self._drift_written = (view.windows, now)

    def _read_drift_view(self) -> None:
        stored = self.store.settings(_DRIFT_VIEW_KEY).get(_DRIFT_VIEW_KEY)
        try:
            self._drift_view = None if stored is None else DriftView.from_dict(stored)
        except ValueError as exc:
            log.warning("the leader's stored drift view is unreadable: %s", exc)

    def drift_view(self) -> DriftView:
        """Alerts, PSI summary and windows judged, as the API and ``/metrics`` show them:
        a scaled-out follower shows the leader's (the store's copy, at most a tick old)."""
        if self.scale is not None and not self.leading:
            return self._drift_view or DriftView([], [], 0)
        return self.drift.view()

    def _drift_reference(self, model: str, version: str) -> Monitoring | None:
        """The reference statistics in a pushed version's manifest (cached)."""
        key = (model, version)
        if key not in self._references:
            found = self.store.model(model, version)
            raw = found.manifest.get("monitoring") if found is not None else None
            try:
                found_ref = Monitoring.model_validate(raw) if raw else None
                # a reference of a few health vectors would make every device "drift"
                self._references[key] = (found_ref if found_ref is not None and
                                         found_ref.samples >= MIN_REFERENCE_SAMPLES else None)
            except ValueError:
                log.warning("%s:%s carries unreadable drift reference statistics", *key)
                self._references[key] = None
            if found is None:  # maybe pushed later: ask again then
                return self._references.pop(key)
        return self._references[key]

    def drift_policy(self, model: str) -> DriftPolicy:
        return self._policies.get(model, DriftPolicy())

    def drift_policies(self) -> dict[str, DriftPolicy]:
        return dict(self._policies)

    def set_drift_policy(self, model: str, policy: DriftPolicy | None,
                         actor: str) -> DriftPolicy:
        """Set (or with ``None`` reset to the defaults) when ``model``'s drift alerts."""
        check_id(model, "model name")
        with self._lock:
            self.store.put_setting(f"{_DRIFT_PREFIX}{model}",
                                   policy.as_dict() if policy else None, self.clock())
            if policy is None:
                self._policies.pop(model, None)
            else:
                self._policies[model] = policy
            chosen = self.drift_policy(model)
            self._audit(actor, "drift.policy", model,
                        "defaults" if policy is None else str(chosen.as_dict()),
                        **chosen.as_dict())
            return chosen

    def alerts(self) -> list[Alert]:
        return self.drift_view().alerts

    def _flush_devices(self) -> None:
        if not self.leading:
            return  # the leader writes devices; they stay dirty here until this one leads
        dirty = self.registry.take_dirty()
        if dirty:
            try:
                self.store.upsert_devices(dirty)
            except FleetError:
                self.registry.mark_dirty(d.id for d in dirty)  # written at the next flush
                raise

    # --- scale-out: the lease, and requests relayed by followers ------------------------

    def _take_turn(self) -> None:
        assert self.scale is not None
        led = self.leading
        try:
            turn = self.scale.turn(self._wanted_keys())
        except FleetError:
            if led and not self.leading:
                self._step_down()
            raise
        if turn == Turn.ELECTED:
            self._load_rollouts()
            self._drift_written = (-1, 0)  # the store holds the last leader's drift view
            self._audit(SYSTEM, "controller.elected", self.config.controller_id,
                        f"leads with lease generation {self.scale.leadership.generation}")
        elif turn == Turn.DEPOSED:
            self._step_down()
        if turn in (Turn.ELECTED, Turn.DEPOSED):
            self._notify("controller", self.scale.status())

    def _step_down(self) -> None:
        """No longer the leader: forget what only a leader does (the store has it all)."""
        self._rollouts.clear()
        self._outbox.clear()

    def _wanted_keys(self) -> list[VersionKey]:
        """The versions whose telemetry the leader's quality gates need from everyone: each
        quality-gated live rollout's new version and the version its devices ran before."""
        if not self.leading or self.config.shared_telemetry is None:
            return []
        keys: set[VersionKey] = set()
        for rollout in self._rollouts.values():
            gates = rollout.spec.gates
            if rollout.finished or all(g is None for g in (
                    gates.max_p95_ratio, gates.max_error_rate_pct, gates.min_agreement_pct)):
                continue
            keys.add((rollout.spec.model.name, rollout.spec.model.version))
            previous = self._baseline_key(rollout)
            if previous is not None:
                keys.add(previous)
        return sorted(keys)

    def _relayed(self) -> bool:
        """An operator's rollout action on a follower goes to the leader."""
        return self.scale is not None and not self.scale.leading

    def _fence(self) -> Fence | None:
        """What a rollout save carries (raises LeaseLostError on a controller not leading)."""
        return self.scale.fence if self.scale is not None else None

    def _run_request(self, request: OperatorRequest) -> None:
        """A request a follower relayed, run as if asked here; the outcome goes back."""
        assert self.scale is not None
        body, actor = request.body, request.actor
        try:
            if request.kind == "rollout.create":
                result: Any = self._create_rollout(str(body["model"]), dict(body["options"]),
                                                   actor).as_dict()
            elif request.kind == "rollout.operate":
                result = self._operate(str(body["rollout"]), str(body["verb"]),
                                       actor).as_dict()
            elif request.kind == "fleet.rollback":
                result = [r.as_dict() for r in self._rollback_group(str(body["group"]), actor)]
            else:
                raise InvalidRolloutError(f"unknown request kind {request.kind!r}",
                                          hint="controllers of different versions?")
            ok = True
        except EdgefleetError as exc:
            result, ok = error_result(exc), False
        except Exception as exc:  # the outcome must reach the operator whatever happened
            log.exception("relayed request %d failed", request.id)
            result, ok = {"error": f"internal error: {type(exc).__name__}: {exc}",
                          "hint": "see the leader's log", "kind": "FleetError"}, False
        self.scale.finish(request, ok, result)

    def _apply(self, decisions: Decisions, actor: str) -> Rollout:
        rollout = decisions.rollout
        if not (decisions.changed or decisions.sends or decisions.notes):
            self._rollouts[rollout.id] = rollout  # a state change always comes with a note
            return rollout
        self.store.save_rollout(rollout, decisions.changed, fence=self._fence())
        for note in decisions.notes:
            self._audit(actor, "rollout.progress", rollout.id, note)
        if self._followed(rollout, self.clock()):
            self._rollouts[rollout.id] = rollout
        else:
            self._rollouts.pop(rollout.id, None)
        for send in decisions.sends:
            self._queue_desired(rollout, send.device, send.action, send.bundle)
        for device in decisions.cleared:
            self._outbox[device] = b""
        if decisions.notes or decisions.changed:
            self._notify("rollout", rollout.summary())
        return rollout

    def _followed(self, rollout: Rollout, now: int) -> bool:
        if not rollout.finished:
            return True
        if now - rollout.updated_ms > _FOLLOW_AFTER_END_MS:
            return False
        return any(d.state in _UNSETTLED for d in rollout.devices.values())

    # --- observations -------------------------------------------------------------------

    def _observe(self, rollout: Rollout, joined: set[str]) -> Observations:
        spec = rollout.spec
        if rollout.state == RolloutState.PENDING:
            ids: Iterable[str] = [d.id for d in self.registry.all() if spec.matches(d)]
        elif rollout.finished:
            # only the devices it still waits on, less those that another rollout sent a
            # desired state since: the device acts on that one's word now, not this one's
            others = [r for r in self._rollouts.values() if r.id != rollout.id]

            def taken(device: str, sent_ms: int) -> bool:
                return any((item := r.devices.get(device)) is not None
                           and item.sent_ms > sent_ms for r in others)

            ids = [d.device for d in rollout.devices.values()
                   if d.state in _UNSETTLED and not taken(d.device, d.sent_ms)]
        else:
            newcomers = [d for d in joined if (dev := self.registry.get(d)) is not None
                         and spec.matches(dev) and not self._busy_elsewhere(d, rollout.id)]
            ids = [*rollout.devices.keys(), *newcomers]
        model = self._model_by_sha(spec.model.sha256)
        views = {}
        for device_id in ids:
            device = self.registry.get(device_id)
            if device is not None:
                views[device_id] = self._view(device, model)
        if not self._gated(rollout):
            return Observations(views)
        return Observations(views, self._candidate(rollout), self._baseline(rollout))

    @staticmethod
    def _gated(rollout: Rollout) -> bool:
        """Quality is only measured for a running rollout with devices in probation and a
        quality gate to feed."""
        gates = rollout.spec.gates
        if rollout.finished or not any(
                g is not None for g in (gates.max_p95_ratio, gates.max_error_rate_pct,
                                        gates.min_agreement_pct)):
            return False
        return any(d.state in (DeviceState.PROBATION, DeviceState.COMMITTING)
                   for d in rollout.devices.values())

    def _view(self, device: Device, model: ModelVersion | None) -> DeviceView:
        cached = self._views.get(device.id)
        if cached is not None and cached[0] is device and cached[1] == (model and model.sha256):
            return cached[2]  # the registry replaces a Device on every change
        reason = None
        if model is not None:
            key = (model.sha256, device.profile, tuple(sorted(device.runtimes.items())),
                   device.decryption_keys)
            if key not in self._compat:
                self._compat[key] = incompatibility(device, model, self._model_info(model))
            reason = self._compat[key]
        view = DeviceView(online=device.online, active=device.active,
                          update_state=device.update_state, update_target=device.update_target,
                          update_since_ms=device.update_since_ms,
                          update_detail=device.update_detail, incompatible=reason)
        self._views[device.id] = (device, model.sha256 if model else None, view)
        return view

    def _model_by_sha(self, sha256: str) -> ModelVersion | None:
        """A pushed version (cached: what a sha256 names never changes)."""
        model = self._models.get(sha256)
        if model is None:
            model = self.store.model_by_sha(sha256)
            if model is not None:
                self._models[sha256] = model
        return model

    def _model_info(self, model: ModelVersion) -> ModelInfo | None:
        if model.sha256 not in self._info:
            try:
                path = self.bundle_path(model.sha256)  # here, or fetched from the store
                bundle = read_bundle(path or Path(model.path), self.config.trusted)
                self._info[model.sha256] = (  # an encrypted model's ops need a device's key
                    None if bundle.encrypted else inspect_model(bundle.model_bytes, model.format))
            except Exception:  # inspection is best effort; the runtime check still holds
                log.exception("could not inspect %s", model.key)
                self._info[model.sha256] = None
        return self._info[model.sha256]

    def _candidate(self, rollout: Rollout) -> Quality:
        trying = [d for d in rollout.devices.values()
                  if d.state in (DeviceState.PROBATION, DeviceState.COMMITTING)]
        if not trying:
            return Quality()
        key = (rollout.spec.model.name, rollout.spec.model.version)
        return self.telemetry.quality([d.device for d in trying], key,
                                      min(d.since_ms for d in trying))

    @staticmethod
    def _baseline_key(rollout: Rollout) -> VersionKey | None:
        """The version most of the rollout's devices ran before (None: none sent yet)."""
        previous = collections.Counter((d.previous.name, d.previous.version)
                                       for d in rollout.devices.values() if d.previous)
        return previous.most_common(1)[0][0] if previous else None

    def _baseline(self, rollout: Rollout) -> Quality:
        key = self._baseline_key(rollout)
        if key is None:
            return Quality()
        # the rollout's own devices (before they switched) and a bounded sample of the
        # rest of the fleet still running the previous version
        others = self.telemetry.running(key)[:_BASELINE_SAMPLE]
        devices = {*others, *rollout.devices.keys()}
        return self.telemetry.quality(devices, key, self.clock() - self.config.quality_window_ms)

    def _busy_elsewhere(self, device: str, rollout_id: str) -> bool:
        return any(r.id != rollout_id and not r.finished and device in r.devices
                   for r in self._rollouts.values())

    # --- desired states -----------------------------------------------------------------

    def bundle_url(self, sha256: str) -> str:
        return f"{self.config.public_url.rstrip('/')}/bundles/{sha256}.efb"

    def _queue_desired(self, rollout: Rollout, device: str, action: Action,
                       bundle: BundleRef | None = None) -> None:
        if bundle is None and action == Action.ROLLBACK:
            bundle = self._reinstall(rollout, device)
            action = Action.INSTALL if bundle is not None else action
        ref, url, size = rollout.spec.model, rollout.spec.url, rollout.spec.size
        if self.scale is not None:  # the leader that publishes serves it (or its balancer)
            url = self.bundle_url(ref.sha256)
        if bundle is not None:
            model = self._model_by_sha(bundle.sha256)
            if model is None:
                log.warning("cannot send %s to %s: the controller does not hold it",
                            bundle.version, device)
                return
            ref, url, size = model.ref, self.bundle_url(model.sha256), model.size
        desired = DesiredState(name=ref.name, version=ref.version, sha256=ref.sha256,
                               url=url, size=size, rollout=rollout.id, action=action.value,
                               issued_at=self.clock())
        self._outbox[device] = encode(desired)

    def _reinstall(self, rollout: Rollout, device_id: str) -> BundleRef | None:
        """The previous bundle to install again when a committed device's fallback slot no
        longer holds it (overwritten by a later update); None: its own rollback will do."""
        item, device = rollout.devices.get(device_id), self.registry.get(device_id)
        if item is None or item.previous is None or device is None or device.active is None:
            return None
        if device.active.sha256 != rollout.spec.model.sha256:
            return None  # in probation, or already back: the device rolls back by itself
        if device.previous is not None and device.previous.sha256 == item.previous.sha256:
            return None  # its fallback slot holds it
        if self._model_by_sha(item.previous.sha256) is None:
            return None  # not pushed here: the device's own rollback is all there is
        return item.previous

    def _flush_outbox(self) -> None:
        mqtt = self.mqtt
        if mqtt is None or not self._outbox:
            return
        while self._outbox:
            if not self.leading:  # the lease lapsed (a pause, the store away): not ours
                log.warning("not the leader any more: %d desired states dropped (the "
                            "leader publishes them)", len(self._outbox))
                self._outbox.clear()
                return
            device, payload = next(iter(self._outbox.items()))
            topic = device_topic(self.config.fleet, device, Leaf.DESIRED)
            if not mqtt.publish(topic, payload, qos=1, retain=True):
                log.info("broker away: %d desired states wait", len(self._outbox))
                return
            del self._outbox[device]

    def _republish_waiting(self) -> None:
        """After a restart: tell every device a rollout waits on what it must do, again."""
        actions = {DeviceState.TARGETED: Action.INSTALL, DeviceState.UPDATING: Action.INSTALL,
                   DeviceState.PROBATION: Action.INSTALL, DeviceState.COMMITTING: Action.COMMIT,
                   DeviceState.ROLLING_BACK: Action.ROLLBACK}
        waiting = sorted(((item.sent_ms, rollout.id, item.device, action, rollout)
                          for rollout in self._rollouts.values()
                          for item in rollout.devices.values()
                          if (action := actions.get(item.state)) is not None),
                         key=lambda w: w[:3])
        for _, _, device, action, rollout in waiting:  # the word sent last wins, as it did
            self._queue_desired(rollout, device, action)

    # --- operator actions (API threads) -------------------------------------------------

    def _audit(self, actor: str, action: str, target: str, summary: str = "",
               outcome: str = "ok", **detail: Any) -> AuditEntry:
        entry = AuditEntry(ts_ms=self.clock(), actor=actor, action=action, target=target,
                           outcome=outcome, detail={"summary": summary, **detail})
        return self.store.add_audit(entry)

    def push_refused(self, actor: str, error: EdgefleetError) -> None:
        """Audit a push the API refused before the controller saw it (its first block)."""
        self._audit(actor, "model.push", "?", str(error), outcome="refused")

    def push(self, data: bytes | Path, actor: str) -> tuple[ModelVersion, bool]:
        """Verify a bundle, keep it content-addressed, register its version. A path (an
        upload streamed to a file in ``artifacts``) is renamed into place, never read whole."""
        try:
            bundle = read_bundle(data, self.config.trusted)
        except EdgefleetError as exc:
            self._audit(actor, "model.push", "?", str(exc), outcome="refused")
            raise
        manifest = bundle.manifest
        path = self.artifacts / f"{bundle.sha256}.efb"
        wrote = not path.exists()
        if wrote:
            _keep(path, data)
        size = path.stat().st_size
        model = ModelVersion(name=manifest.name, version=manifest.version, sha256=bundle.sha256,
                             size=size, format=manifest.format,
                             runtime=manifest.runtime.name,
                             min_runtime_version=manifest.runtime.min_version,
                             manifest=manifest.model_dump(mode="json"), path=str(path),
                             pushed_ms=self.clock(), pushed_by=actor)
        try:
            added = self.store.add_model(model)
        except ConflictError as exc:
            if wrote:  # a refused bundle leaves the artifact folder as it was
                path.unlink(missing_ok=True)
            self._audit(actor, "model.push", model.key, str(exc), outcome="refused")
            raise
        if self.scale is not None:  # every controller may have to serve it
            self.scale.share_bundle(bundle.sha256, path.read_bytes())
        if added:
            self._audit(actor, "model.push", model.key, f"sha256 {bundle.sha256[:12]}",
                        size=size)
        return (model if added else self._model_by_sha(bundle.sha256) or model), added

    def model(self, key: str) -> ModelVersion:
        name, _, version = key.partition(":")
        found = self.store.model(name, version) if version else None
        if found is None:
            known = ", ".join(m.key for m in self.store.models(name)) or "none"
            raise NotFoundError(f"no model version {key!r} (known: {known})",
                                hint="push it first: edgefleet fleet push BUNDLE")
        return found

    def bundle_path(self, sha256: str) -> Path | None:
        """The bundle's file here; scaled out, fetched from the store (and verified) the
        first time this controller needs a bundle another one was pushed."""
        model = self._model_by_sha(sha256)
        if model is None:
            return None
        local = self.artifacts / f"{sha256}.efb"
        for path in (Path(model.path), local):
            if path.exists():
                return path
        data = self.scale.fetch_bundle(sha256) if self.scale is not None else None
        if data is None:
            return Path(model.path)
        try:
            if read_bundle(data, self.config.trusted).sha256 != sha256:
                raise FleetError(f"the store's bytes of bundle {sha256[:12]} are another "
                                 "bundle", hint="push the bundle again")
        except EdgefleetError as exc:
            log.error("not serving bundle %s from the store: %s", sha256[:12], exc)
            return None
        atomic_write(local, data)
        return local

    def _local_bundles(self) -> dict[str, Callable[[], bytes]]:
        """Every pushed bundle this controller holds a file of, read when asked."""
        found: dict[str, Callable[[], bytes]] = {}
        for model in self.store.models():
            for path in (Path(model.path), self.artifacts / f"{model.sha256}.efb"):
                if path.exists():
                    found[model.sha256] = path.read_bytes
                    break
        return found

    def set_group(self, devices: list[str], group: str | None, actor: str) -> list[Device]:
        with self._lock:
            self._flush_devices()
            self._store_new(devices)
            self.store.set_group(devices, group)
            changed = [self._reload(d) for d in devices]
            self._audit(actor, "device.group", ",".join(devices), f"group {group}")
            return changed

    def tag(self, device: str, add: list[str], remove: list[str], actor: str) -> Device:
        with self._lock:
            self._flush_devices()
            self._store_new([device])
            self.store.set_tags(device, add, remove)
            changed = self._reload(device)
            self._audit(actor, "device.tags", device, f"+{add} -{remove}")
            return changed

    def _store_new(self, device_ids: list[str]) -> None:
        """A follower labels a device it saw before the leader wrote it: write it first
        (only if missing: the leader's rows stay as they are)."""
        if not self.leading:
            known = [d for i in device_ids if (d := self.registry.get(i)) is not None]
            self.store.insert_devices(known)

    def _reload(self, device_id: str) -> Device:
        """The device with the group and tags just stored (its reported state as known
        here: scaled out, the store's row may be older than this registry)."""
        device = self.store.device(device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id!r}")
        return self.registry.relabel(device.id, device.group, device.tags) or device

    def create_rollout(self, model_key: str, options: dict[str, Any], actor: str) -> Rollout:
        if self.scale is not None and self._relayed():
            return Rollout.from_dict(self.scale.relay(
                "rollout.create", {"model": model_key, "options": options}, actor))
        return self._create_rollout(model_key, options, actor)

    def _create_rollout(self, model_key: str, options: dict[str, Any], actor: str) -> Rollout:
        model = self.model(model_key)
        # every option checked (finite, ranges, lengths, counts) before anything is stored
        spec = rollout_spec(options, model.ref, self.bundle_url(model.sha256), model.size)
        with self._lock:
            self._flush_devices()
            busy = sorted(d.id for d in self.registry.all()
                          if spec.matches(d) and self._busy_elsewhere(d.id, ""))
            if busy:
                owner = next(r.id for r in self._rollouts.values()
                             if not r.finished and busy[0] in r.devices)
                raise ConflictError(f"{len(busy)} selected devices (e.g. {busy[0]}) are in "
                                    f"rollout {owner}, which is still running",
                                    hint=f"wait for it, or pause/abort it: edgefleet fleet "
                                         f"rollout abort {owner}")
            now = self.clock()
            rollout = Rollout(self.store.new_rollout_id(), spec, created_ms=now,
                              updated_ms=now, created_by=actor)
            self.store.save_rollout(rollout, fence=self._fence())
            self._audit(actor, "rollout.create", rollout.id,
                        f"{model.key} to {', '.join(map(str, spec.selectors))}",
                        spec=spec.as_dict())
            rollout = self._tick(rollout, set(), now, actor)
            self._flush_outbox()
            return rollout

    def rollout(self, rollout_id: str) -> Rollout:
        with self._lock:
            found = self._rollouts.get(rollout_id) or self.store.rollout(rollout_id)
        if found is None:
            raise NotFoundError(f"no rollout {rollout_id!r}",
                                hint="see edgefleet fleet rollout list")
        return found

    def rollouts(self) -> list[Rollout]:
        with self._lock:
            stored = {r.id: r for r in self.store.rollouts()}
            stored.update(self._rollouts)
        return sorted(stored.values(), key=lambda r: r.created_ms, reverse=True)

    def operate(self, rollout_id: str, verb: str, actor: str) -> Rollout:
        """pause, resume, abort or rollback one rollout."""
        if self.scale is not None and self._relayed():
            return Rollout.from_dict(self.scale.relay(
                "rollout.operate", {"rollout": rollout_id, "verb": verb}, actor))
        return self._operate(rollout_id, verb, actor)

    def _operate(self, rollout_id: str, verb: str, actor: str) -> Rollout:
        operations: dict[str, Callable[[Rollout, int], Decisions]] = {
            "pause": executor.pause, "resume": executor.resume, "abort": executor.abort,
            "rollback": executor.rollback}
        if verb not in operations:
            raise InvalidRolloutError(f"unknown rollout action {verb!r}",
                                      hint=f"one of {', '.join(operations)}")
        with self._lock:
            rollout = self.rollout(rollout_id)
            try:
                decisions = operations[verb](rollout, self.clock())
            except ConflictError as exc:
                self._audit(actor, f"rollout.{verb}", rollout_id, str(exc), outcome="refused")
                raise
            self._audit(actor, f"rollout.{verb}", rollout_id, decisions.rollout.reason)
            self._rollouts[rollout_id] = decisions.rollout
            result = self._apply(decisions, actor)
            self._flush_outbox()
            return result

    def rollback_group(self, group: str, actor: str) -> list[Rollout]:
        """Return every device of ``group`` that a rollout touched to its previous bundle."""
        if self.scale is not None and self._relayed():
            return [Rollout.from_dict(r) for r in self.scale.relay(
                "fleet.rollback", {"group": group}, actor)]
        return self._rollback_group(group, actor)

    def _rollback_group(self, group: str, actor: str) -> list[Rollout]:
        with self._lock:
            members = frozenset(d.id for d in self.registry.all() if d.group == group)
            if not members:
                raise NotFoundError(f"group {group!r} has no devices",
                                    hint="see edgefleet fleet devices")
            touched = [r for r in self.rollouts() if r.state != RolloutState.ROLLED_BACK
                       and any(d in members and item.state in (*ACTIVE, DeviceState.SUCCEEDED)
                               for d, item in r.devices.items())]
            done = []
            for rollout in touched:
                decisions = executor.rollback(rollout, self.clock(), only=members)
                self._rollouts[rollout.id] = decisions.rollout
                done.append(self._apply(decisions, actor))
            self._audit(actor, "fleet.rollback", f"group:{group}",
                        f"{len(done)} rollouts, {len(members)} devices",
                        rollouts=[r.id for r in done])
            self._flush_outbox()
            return done

    def history(self, limit: int = 100, target: str | None = None) -> list[AuditEntry]:
        return self.store.history(limit, target)

    def devices(self) -> list[Device]:
        return self.registry.all()

    def overview(self, quality: bool = True) -> dict[str, Any]:
        """Counts of the fleet; with ``quality``, per-version telemetry too (O(devices))."""
        devices = self.registry.snapshot()
        versions = collections.Counter(f"{d.active.name}:{d.active.version}" if d.active
                                       else "none" for d in devices)
        states = collections.Counter(d.update_state for d in devices)
        return {"fleet": self.config.fleet, "devices": len(devices),
                "online": sum(1 for d in devices if d.online),
                "versions": dict(versions), "update_states": dict(states),
                "telemetry_points": self.telemetry.points, "rejected": self.rejected,
                "rejected_by": dict(self.rejected_by),
                "outbox": len(self._outbox), "controller": self.controller_status(),
                **({"quality": self.telemetry.summary()} if quality else {})}

    def controller_status(self) -> dict[str, Any]:
        """Who this controller is and who leads (``role``: single, leader or follower)."""
        if self.scale is None:
            return {"id": self.config.controller_id or None, "role": "single",
                    "leader": self.config.controller_id or None}
        return self.scale.status()


    # --- the fleet keyring: which signing keys devices trust (docs/keys.md) --------------

    def _start_keyring(self) -> None:
        """At start: trust the stored keyring's keys, and publish it (retained) on every
        connection, so a broker that lost its retained messages gets it back."""
        stored = self.keyring()
        if stored is not None:
            self._trust(stored)
        if self.mqtt is not None:
            self.mqtt.on_connect(self._publish_stored_keyring)

    def keyring(self) -> SignedKeyring | None:
        """The fleet keyring (None before the first rotation), from the store every
        controller shares; a keyring kept in the data folder by an earlier edgefleet moves
        into the store."""
        raw = self.store.settings(_KEYRING_KEY).get(_KEYRING_KEY)
        if isinstance(raw, str):
            cached = self._keyring_parsed
            if cached is None or cached[0] != raw:  # parsed (signatures checked) once
                cached = self._keyring_parsed = raw, parse_keyring(raw.encode())
            return cached[1]
        local = load_keyring(self.config.data_dir / KEYRING_FILE)
        if local is not None:
            self.store.put_setting(_KEYRING_KEY, local.raw.decode(), self.clock())
        return local

    def _follow_keyring(self) -> None:
        """Trust the keyring another controller published (scale-out), once it is stored."""
        try:
            stored = self.keyring()
        except EdgefleetError as exc:
            log.error("the stored keyring is unreadable: %s", exc)
            return
        if stored is not None and set(stored.key_ids) != set(self.config.trusted.key_ids):
            self._trust(stored)

    def publish_keyring(self, raw: bytes, actor: str, force: bool = False) -> dict[str, Any]:
        """Check a keyring against the keys trusted here (signature, serial), keep it, verify
        pushes with its keys from now on, and publish it retained to every device."""
        with self._lock:
            try:
                held = self.keyring()
                keyring = accept_keyring(raw, self.config.trusted, held)
                stranded = self._stranded(keyring) if keyring is not None else []
                if stranded and not force:
                    raise ConflictError(
                        f"{len(stranded)} devices run a bundle not known to be signed by a key "
                        f"of this keyring, and could not load it again after a restart: "
                        f"{', '.join(stranded[:5])}",
                        hint="roll out a bundle signed by a key that stays first (push the "
                             "bundle a device runs if it is not here), or pass --force")
            except EdgefleetError as exc:
                self._audit(actor, "keyring.publish", "keyring", str(exc), outcome="refused")
                raise
            if keyring is not None:
                self.store.put_setting(_KEYRING_KEY, keyring.raw.decode(), self.clock())
                self._trust(keyring)
                self._audit(actor, "keyring.publish", "keyring",
                            f"serial {keyring.serial}: {', '.join(keyring.key_ids)}",
                            signed_by=keyring.signed_by, stranded=stranded)
        current = keyring or held
        assert current is not None  # accept_keyring returns None only for the held one
        return {**current.summary(), "changed": keyring is not None, "stranded": stranded,
                "published": self._publish_keyring_now(current)}

    def _trust(self, keyring: SignedKeyring) -> None:
        self.config = dataclasses.replace(self.config, trusted=keyring.trusted())

    def _stranded(self, keyring: SignedKeyring) -> list[str]:
        """When ``keyring`` drops a key: the devices whose active bundle is not known to be
        signed by a key it keeps."""
        keep, signers = set(keyring.key_ids), {}
        stranded: list[str] = []
        if not set(self.config.trusted.key_ids) - keep:
            return stranded  # only adds keys
        for device in self.registry.all():
            if device.active is None:
                continue
            sha256 = device.active.sha256
            if sha256 not in signers:
                signers[sha256] = self._signer(sha256, keyring)
            if signers[sha256] not in keep:
                stranded.append(f"{device.id} ({device.active.name}:{device.active.version}, "
                                f"{signers[sha256] or 'a bundle not pushed here'})")
        return stranded

    def _signer(self, sha256: str, keyring: SignedKeyring) -> str | None:
        """The key id that signed a pushed bundle; None when this controller cannot tell."""
        model = self._model_by_sha(sha256)
        if model is None:
            return None
        both = TrustedKeys({**self.config.trusted.public_keys(),
                            **keyring.trusted().public_keys()})
        try:
            return read_bundle(Path(model.path), both).key_id
        except EdgefleetError as exc:
            return f"unverifiable: {exc.message}"

    def _publish_keyring_now(self, keyring: SignedKeyring) -> bool:
        """Publish and wait for the broker; False: it goes out on the next connection."""
        mqtt = self.mqtt
        if mqtt is None or not mqtt.connected:
            return False
        try:
            mqtt.publish_wait(keyring_topic(self.config.fleet), keyring.raw, qos=1,
                              retain=True, timeout=5.0)
        except EdgefleetError as exc:
            log.warning("the keyring goes out on the next connection: %s", exc)
            return False
        return True

    def _publish_stored_keyring(self) -> None:
        try:
            stored = self.keyring()
        except EdgefleetError as exc:
            log.error("not publishing the stored keyring: %s", exc)
            return
        if stored is not None and self.mqtt is not None:
            self.mqtt.publish(keyring_topic(self.config.fleet), stored.raw, qos=1, retain=True)


def _keep(path: Path, data: bytes | Path) -> None:
    """Store a verified bundle: bytes written atomically, an upload's file renamed."""
    if isinstance(data, Path):
        data.replace(path)
    else:
        atomic_write(path, data)
