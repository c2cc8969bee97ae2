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

:class:`FleetController` is the façade over the parts in :mod:`edgefleet.fleet.control`:
it builds them, runs the loop, and answers the API by handing each question to its part.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from edgefleet.agent.mqtt import MqttClient
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.keyring import SignedKeyring
from edgefleet.agent.protocol.topics import Leaf, check_id, fleet_filter
from edgefleet.fleet.control import CONTROLLER_LOG
from edgefleet.fleet.control.actions import Actions
from edgefleet.fleet.control.audit import SYSTEM, AuditTrail, Listeners
from edgefleet.fleet.control.catalog import ModelCatalog
from edgefleet.fleet.control.commands import CREATE_ROLLOUT, OPERATE_ROLLOUT, ROLLBACK_GROUP
from edgefleet.fleet.control.config import ControllerConfig, now_ms
from edgefleet.fleet.control.devices import DeviceBook
from edgefleet.fleet.control.dispatch import CommandDesk
from edgefleet.fleet.control.drift_desk import DriftDesk
from edgefleet.fleet.control.groups import GroupBook
from edgefleet.fleet.control.intake import MessageIntake
from edgefleet.fleet.control.keyring import KeyringService
from edgefleet.fleet.control.lifecycle import DeviceLifecycle, Removal
from edgefleet.fleet.control.observer import RolloutObserver
from edgefleet.fleet.control.outbox import Outbox
from edgefleet.fleet.control.role import LeasedRole, Role, SingleRole
from edgefleet.fleet.control.runner import RolloutRunner
from edgefleet.fleet.deltas import DeltaShelf
from edgefleet.fleet.domain import AuditEntry, Device, ModelVersion
from edgefleet.fleet.drift import Alert, DriftPolicy, DriftView
from edgefleet.fleet.registry import DeviceRegistry
from edgefleet.fleet.rollout.state import Rollout
from edgefleet.fleet.scale import ScaleOut
from edgefleet.fleet.store import Store
from edgefleet.fleet.telemetry import TelemetryBook

__all__ = ["ControllerConfig", "FleetController", "now_ms"]

log = logging.getLogger(CONTROLLER_LOG)
# QoS 1 publishes in flight on the controller's connection (paho's default is 20). The
# broker's acknowledgements share that connection with everything devices send: when the
# controller is behind reading, each window of desired states waits for the backlog ahead
# of its acknowledgements, so the window, not the broker, set the pace of a large wave.
MQTT_INFLIGHT = 200


class FleetController:
    """Everything the API and the CLI ask of the fleet, and the loop that runs rollouts."""

    def __init__(self, config: ControllerConfig, store: Store,
                 clock: Callable[[], int] = now_ms) -> None:
        self.config, self.store, self.clock = config, store, clock
        self.artifacts = config.data_dir / "bundles"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        shared = config.shared_telemetry is not None
        self.listeners = Listeners()
        self.audit = AuditTrail(store, clock)
        self.telemetry = TelemetryBook(config.quality_window_ms, journal=shared)
        self.drift_desk = DriftDesk(store, self.audit, self.listeners.notify, clock, shared)
        self.drift = self.drift_desk.monitor
        self.role = self._role()  # before the registry is read: labels changed meanwhile come again
        self.registry = DeviceRegistry(config.fleet, store.devices())
        self.keys = KeyringService(config.trusted, store, config.data_dir, config.fleet,
                                   self.registry, self.audit, clock)
        self.catalog = ModelCatalog(store, self.artifacts, config.public_url, self.keys,
                                    self.role, self.audit, clock)
        live: dict[str, Rollout] = {}
        self.observer = RolloutObserver(self.registry, self.catalog, self.telemetry, live,
                                        clock, config.quality_window_ms)
        self.deltas = DeltaShelf(self.artifacts / "deltas", self.catalog.bundle_path,
                                 config.public_url)
        self.outbox = Outbox(config.fleet, self.registry, self.catalog, self.role, clock,
                             self.deltas)
        self.runner = RolloutRunner(store, live, self.observer, self.outbox, self.role,
                                    self.audit, self.listeners.notify, clock)
        self.device_book = DeviceBook(store, self.registry, self.role, self.audit)
        self.lifecycle = DeviceLifecycle(config.fleet, store, self.registry, self.outbox,
                                         self.audit, clock, config.mqtt_security)
        self.intake = MessageIntake(config.fleet, self.registry, self.telemetry,
                                    self.drift_desk, self.listeners.notify, clock)
        self._lock = threading.RLock()
        self._served: collections.Counter[str] = collections.Counter()
        self._served_lock = threading.Lock()
        self.groups = GroupBook(store, self.registry, self.audit, clock)
        self.actions = Actions(store, self.registry, self.catalog, self.device_book,
                               self.runner, self.audit, self._lock, clock, self.groups)
        self.commands = CommandDesk(self.actions, self.role)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.mqtt: MqttClient | None = None

    def _role(self) -> Role:
        """Alone (no ``lease_s``), or one of several controllers sharing a lease."""
        config = self.config
        if config.lease_s is None:
            return SingleRole(config.controller_id, self._take_office)
        scale = ScaleOut(self.store, self.telemetry, self.drift, config.controller_id,
                         config.lease_s, config.tick_s, config.public_url,
                         config.shared_telemetry, self.clock)
        return LeasedRole(scale, config.shared_telemetry, self.audit,
                          self.listeners.notify, lambda: self.observer.wanted_keys(),
                          self._take_office, lambda: self.runner.forget())

    def _take_office(self) -> None:
        """Started alone, or elected: follow the store's live rollouts, tell their devices
        again, and write the drift view soon (the store holds the last leader's)."""
        self.runner.load()
        self.drift_desk.forget_written()

    # --- life -------------------------------------------------------------------------

    def start(self) -> FleetController:
        with self._lock:
            self.role.start(self.catalog.local_bundles)
        self.mqtt = MqttClient.from_url(self.role.client_id(self.config.fleet),
                                        self.config.broker_url,
                                        security=self.config.mqtt_security,
                                        max_inflight=MQTT_INFLIGHT)
        # every leaf but state/desired: the controller writes that one itself
        for leaf in (Leaf.STATUS, Leaf.REPORTED, Leaf.EVENTS, Leaf.TELEMETRY):
            topic_filter = fleet_filter(self.config.fleet, leaf)
            if leaf == Leaf.TELEMETRY:
                topic_filter = self.role.telemetry_filter(topic_filter)
            self.mqtt.subscribe_retain(topic_filter, self.intake.message)
        self.outbox.mqtt = self.lifecycle.mqtt = self.mqtt
        self.keys.start(self.mqtt)  # trust the stored keyring; publish it on every connection
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
            self.registry.fold_seen()
            self.device_book.flush()
            self.role.release()
        if self.mqtt is not None:
            self.mqtt.stop()

    @property
    def leading(self) -> bool:
        """This controller executes rollouts (always, unless scaled out)."""
        return self.role.leading

    def _loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.step()
            except Exception:  # the loop must outlive a bad tick; the next one retries
                log.exception("controller step failed")

    def step(self) -> None:
        """Write dirty devices, tick every live rollout, publish what the ticks decided.

        Scaled out, first renew or contest the lease, take in other controllers' label
        changes and share telemetry; a follower stops there, a leader also runs the
        requests followers relayed.
        """
        with self._lock:
            self._judge_drift()
            if not self.role.turn(self.registry):
                return
            now = self.clock()
            self.device_book.flush()
            for request in self.role.requests():
                self.commands.serve(request)
            self.runner.tick_all(set(self.registry.take_joined()), now, SYSTEM)
            self.outbox.flush()

    def _judge_drift(self) -> None:
        """Compare the drift windows telemetry brought since the last tick; audit and
        announce every alert raised or cleared."""
        now = self.clock()
        if self.drift_desk.reread_policies(now):
            self.role.catch_up(self.keys)
        self.role.judged(self.drift_desk, self.drift_desk.judge(), now)

    # --- what the loop counts -----------------------------------------------------------

    @property
    def rejected(self) -> int:
        """Malformed messages dropped."""
        return self.intake.rejected

    def count_served(self, kind: str, size: int) -> None:
        """Bytes of a bundle or a delta response sent whole (``kind``: bundle, delta)."""
        with self._served_lock:
            self._served[kind] += size

    @property
    def bytes_served(self) -> dict[str, int]:
        """Bytes of bundles and deltas served by this controller, by kind."""
        with self._served_lock:
            return {kind: self._served.get(kind, 0) for kind in ("bundle", "delta")}

    @property
    def rejected_by(self) -> collections.Counter[str]:
        """Malformed messages dropped, by reason."""
        return self.intake.rejected_by

    @property
    def broken_ticks(self) -> int:
        """Rollout ticks that raised (each stopped its rollout)."""
        return self.runner.broken_ticks

    # --- drift ----------------------------------------------------------------------------

    def drift_view(self) -> DriftView:
        """Alerts, PSI summary and windows judged, as the API and ``/metrics`` show them:
        a scaled-out follower shows the leader's (the store's copy, at most a tick old)."""
        return self.role.drift_view(self.drift_desk)

    def drift_policy(self, model: str) -> DriftPolicy:
        return self.drift_desk.policy(model)

    def drift_policies(self) -> dict[str, DriftPolicy]:
        return self.drift_desk.policies()

    def set_drift_policy(self, model: str, policy: DriftPolicy | None,
                         actor: str) -> DriftPolicy:
        """Set (or with ``None`` reset to the defaults) when ``model``'s drift alerts."""
        check_id(model, "model name")
        with self._lock:
            return self.drift_desk.set_policy(model, policy, actor)

    def alerts(self) -> list[Alert]:
        return self.drift_view().alerts

    # --- models -----------------------------------------------------------------------------

    def bundle_url(self, sha256: str) -> str:
        return self.catalog.bundle_url(sha256)

    def push_refused(self, actor: str, error: EdgefleetError) -> None:
        """Audit a push the API refused before the controller saw it (its first block)."""
        self.catalog.push_refused(actor, error)

    def push(self, data: bytes | Path, actor: str) -> tuple[ModelVersion, bool]:
        """Verify a bundle, keep it content-addressed, register its version."""
        return self.catalog.push(data, actor)

    def model(self, key: str) -> ModelVersion:
        return self.catalog.model(key)

    def bundle_path(self, sha256: str) -> Path | None:
        return self.catalog.bundle_path(sha256)

    # --- devices ----------------------------------------------------------------------------

    def set_group(self, devices: list[str], group: str | None, actor: str) -> list[Device]:
        with self._lock:
            if group is not None:
                self.groups.check_static(group)
            return self.device_book.set_group(devices, group, actor)

    def tag(self, device: str, add: list[str], remove: list[str], actor: str) -> Device:
        with self._lock:
            return self.device_book.tag(device, add, remove, actor)

    def label(self, device: str, put: dict[str, str], remove: list[str], actor: str) -> Device:
        with self._lock:
            return self.device_book.label(device, put, remove, actor)

    def devices(self) -> list[Device]:
        return self.registry.all()

    # --- dynamic groups (saved selectors) ---------------------------------------------

    def saved_groups(self) -> list[dict[str, Any]]:
        return self.groups.groups()

    def create_group(self, name: str, where: str, actor: str) -> dict[str, Any]:
        with self._lock:
            return self.groups.create(name, where, actor)

    def delete_group(self, name: str, actor: str) -> None:
        with self._lock:
            self.groups.delete(name, actor)

    # --- device lifecycle ----------------------------------------------------------------

    def stale_devices(self, age_s: int) -> list[Device]:
        """Offline devices not heard from for ``age_s`` seconds."""
        return self.lifecycle.stale(age_s)

    def remove_devices(self, device_ids: list[str], actor: str,
                       stale_s: int | None = None) -> Removal:
        """Decommission devices (docs/fleet.md, "Device lifecycle")."""
        with self._lock:
            return self.lifecycle.remove(device_ids, actor, stale_s)

    # --- rollouts (commands run by the leader) ------------------------------------------------

    def create_rollout(self, model_key: str, options: dict[str, Any], actor: str) -> Rollout:
        return self.commands.submit(CREATE_ROLLOUT, {"model": model_key, "options": options},
                                    actor)

    def operate(self, rollout_id: str, verb: str, actor: str) -> Rollout:
        """pause, resume, abort or rollback one rollout."""
        return self.commands.submit(OPERATE_ROLLOUT, {"rollout": rollout_id, "verb": verb},
                                    actor)

    def rollback_group(self, group: str, actor: str) -> list[Rollout]:
        """Return every device of ``group`` that a rollout touched to its previous bundle."""
        return self.commands.submit(ROLLBACK_GROUP, {"group": group}, actor)

    def rollout(self, rollout_id: str) -> Rollout:
        return self.actions.rollout(rollout_id)

    def rollouts(self) -> list[Rollout]:
        return self.actions.rollouts()

    # --- the fleet as a whole -----------------------------------------------------------------

    def history(self, limit: int = 100, target: str | None = None,
                action: str | None = None) -> list[AuditEntry]:
        return self.store.history(limit, target, action)

    def overview(self, quality: bool = True) -> dict[str, Any]:
        """Counts of the fleet; with ``quality``, per-version telemetry too (O(devices))."""
        devices = self.registry.snapshot()
        versions, states = model_counts(devices)
        return {"fleet": self.config.fleet, "devices": len(devices),
                "online": sum(1 for d in devices if d.online),
                "versions": dict(versions), "update_states": dict(states),
                "telemetry_points": self.telemetry.points, "rejected": self.rejected,
                "rejected_by": dict(self.rejected_by),
                "outbox": len(self.outbox), "controller": self.controller_status(),
                **({"quality": self.telemetry.summary()} if quality else {})}

    def controller_status(self) -> dict[str, Any]:
        """Who this controller is and who leads (``role``: single, leader or follower)."""
        return self.role.status()

    # --- the fleet keyring (docs/keys.md) -----------------------------------------------------

    def keyring(self) -> SignedKeyring | None:
        """The fleet keyring (None before the first rotation)."""
        return self.keys.current()

    def publish_keyring(self, raw: bytes, actor: str, force: bool = False) -> dict[str, Any]:
        """Check a keyring against the keys trusted here (signature, serial), keep it, verify
        pushes with its keys from now on, and publish it retained to every device."""
        with self._lock:
            accepted = self.keys.accept(raw, actor, force)
        return self.keys.publish(accepted)


def model_counts(devices: Iterable[Device]) -> tuple[dict[str, int], dict[str, int]]:
    """``(versions, update_states)`` counted per model: each model a device serves counts
    once under ``name:version`` (a device serving none, once under ``none``), and each
    model's update state once (a device of one model, version 1: its own)."""
    versions: collections.Counter[str] = collections.Counter()
    states: collections.Counter[str] = collections.Counter()
    for device in devices:
        models = list(device.models.values()) if device.models else [device.model("")]
        serving = 0
        for model in models:
            states[model.update_state] += 1
            if model.active is not None:
                versions[f"{model.active.name}:{model.active.version}"] += 1
                serving += 1
        if not serving:
            versions["none"] += 1
    return dict(versions), dict(states)
