"""The fleet controller: registry, model versions, rollouts, audit, over one broker and one store.

Threads: paho's network thread feeds the registry and the telemetry book (cheap, no
store writes); the loop thread, every ``tick_s``, writes dirty devices in one batch,
ticks every live rollout (pure, :mod:`fleet.rollout.executor`), saves what changed, and
only then publishes the desired states the tick asked for. A desired state that cannot
be published (broker away) waits in an outbox and goes out when the broker is back.

After a restart the controller loads the store, publishes the desired state of every
device a rollout is still waiting on again (retained and idempotent: an agent ignores a
target it already runs or is already updating to), and carries on: no device is updated
twice.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.mqtt import MqttClient
from agent.protocol.bundle import read_bundle
from agent.protocol.errors import EdgefleetError, PayloadError
from agent.protocol.files import atomic_write
from agent.protocol.payloads import (
    BundleRef,
    DesiredState,
    ReportedState,
    decode,
    decode_status,
    decode_telemetry,
    encode,
)
from agent.protocol.signing import TrustedKeys
from agent.protocol.topics import Leaf, device_topic, fleet_filter, parse_topic
from agent.runtime.inspect import ModelInfo, inspect_model
from fleet.compat import incompatibility
from fleet.domain import AuditEntry, Device, ModelVersion
from fleet.errors import ConflictError, InvalidRolloutError, NotFoundError
from fleet.registry import DeviceRegistry
from fleet.rollout import executor
from fleet.rollout.executor import Action, Decisions, DeviceView, Observations, Quality
from fleet.rollout.spec import RolloutSpec
from fleet.rollout.state import ACTIVE, DeviceState, Rollout, RolloutState
from fleet.store import Store
from fleet.telemetry import TelemetryBook, VersionKey

__all__ = ["ControllerConfig", "FleetController"]

log = logging.getLogger(__name__)
SYSTEM = "controller"
_FOLLOW_AFTER_END_MS = 24 * 3600 * 1000
_UNSETTLED = ACTIVE | {DeviceState.ROLLING_BACK, DeviceState.TIMED_OUT}
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
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    quality_window_ms: int = 300_000


class FleetController:
    """Everything the API and the CLI ask of the fleet, and the loop that runs rollouts."""

    def __init__(self, config: ControllerConfig, store: Store,
                 clock: Callable[[], int] = now_ms) -> None:
        self.config, self.store, self.clock = config, store, clock
        self.artifacts = config.data_dir / "bundles"
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.registry = DeviceRegistry(config.fleet, store.devices())
        self.telemetry = TelemetryBook(config.quality_window_ms)
        self.rejected = 0  # malformed messages dropped
        self._rollouts: dict[str, Rollout] = {}
        self._outbox: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._info: dict[str, ModelInfo | None] = {}
        self._models: dict[str, ModelVersion] = {}
        self._views: dict[str, tuple[Device, str | None, DeviceView]] = {}
        self._compat: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], str | None] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.mqtt: MqttClient | None = None
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []

    # --- life -------------------------------------------------------------------------

    def start(self) -> FleetController:
        for rollout in self.store.rollouts():
            if self._followed(rollout, self.clock()):
                self._rollouts[rollout.id] = rollout
        self._republish_waiting()
        self.mqtt = MqttClient.from_url(f"edgefleet-controller-{self.config.fleet}",
                                        self.config.broker_url,
                                        username=self.config.mqtt_username,
                                        password=self.config.mqtt_password)
        # every leaf but state/desired: the controller writes that one itself
        for leaf in (Leaf.STATUS, Leaf.REPORTED, Leaf.EVENTS, Leaf.TELEMETRY):
            self.mqtt.subscribe(fleet_filter(self.config.fleet, leaf), self._message)
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
        if self.mqtt is not None:
            self.mqtt.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.tick_s):
            try:
                self.step()
            except Exception:  # the loop must outlive a bad tick; the next one retries
                log.exception("controller step failed")

    # --- ingest (MQTT network thread) ---------------------------------------------------

    def _message(self, topic: str, payload: bytes) -> None:
        try:
            address = parse_topic(topic)
            now = self.clock()
            if address.leaf == Leaf.TELEMETRY:
                for point in decode_telemetry(payload):
                    self.telemetry.add(address.device, point.ts, point.values)
                self.registry.seen(address.device, now)
            elif address.leaf == Leaf.STATUS and payload:
                self.registry.status(address.device, decode_status(payload), now)
            elif address.leaf == Leaf.REPORTED and payload:
                reported = decode(ReportedState, payload)
                if reported.device != address.device:
                    raise PayloadError(f"state/reported of {address.device} names "
                                       f"{reported.device}")
                self.registry.reported(reported, now)
            elif address.leaf == Leaf.EVENTS:
                self._notify("event", {"device": address.device,
                                       "event": payload.decode("utf-8", "replace")})
        except (EdgefleetError, ValueError) as exc:
            self.rejected += 1
            log.warning("dropped a message on %s: %s", topic, exc)

    def _notify(self, kind: str, data: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            try:
                listener(kind, data)
            except Exception:
                log.exception("listener failed")

    # --- the loop -----------------------------------------------------------------------

    def step(self) -> None:
        """Write dirty devices, tick every live rollout, publish what the ticks decided."""
        with self._lock:
            now = self.clock()
            self._flush_devices()
            joined = set(self.registry.take_joined())
            for rollout in list(self._rollouts.values()):
                self._apply(executor.tick(rollout, self._observe(rollout, joined), now),
                            SYSTEM)
            self._flush_outbox()

    def _flush_devices(self) -> None:
        dirty = self.registry.take_dirty()
        if dirty:
            self.store.upsert_devices(dirty)

    def _apply(self, decisions: Decisions, actor: str) -> Rollout:
        rollout = decisions.rollout
        if not (decisions.changed or decisions.sends or decisions.notes):
            self._rollouts[rollout.id] = rollout  # a state change always comes with a note
            return rollout
        self.store.save_rollout(rollout, decisions.changed)
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
            ids = rollout.devices.keys()
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
            key = (model.sha256, device.profile, tuple(sorted(device.runtimes.items())))
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
                bundle = read_bundle(Path(model.path), self.config.trusted)
                self._info[model.sha256] = inspect_model(bundle.model_bytes, model.format)
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

    def _baseline(self, rollout: Rollout) -> Quality:
        previous = collections.Counter((d.previous.name, d.previous.version)
                                       for d in rollout.devices.values() if d.previous)
        if not previous:
            return Quality()
        key: VersionKey = previous.most_common(1)[0][0]
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
        for rollout in self._rollouts.values():
            for item in rollout.devices.values():
                action = actions.get(item.state)
                if action is not None:
                    self._queue_desired(rollout, item.device, action)

    # --- operator actions (API threads) -------------------------------------------------

    def _audit(self, actor: str, action: str, target: str, summary: str = "",
               outcome: str = "ok", **detail: Any) -> AuditEntry:
        entry = AuditEntry(ts_ms=self.clock(), actor=actor, action=action, target=target,
                           outcome=outcome, detail={"summary": summary, **detail})
        return self.store.add_audit(entry)

    def push(self, data: bytes, actor: str) -> tuple[ModelVersion, bool]:
        """Verify a bundle, keep it content-addressed, register its version."""
        try:
            bundle = read_bundle(data, self.config.trusted)
        except EdgefleetError as exc:
            self._audit(actor, "model.push", "?", str(exc), outcome="refused")
            raise
        manifest = bundle.manifest
        path = self.artifacts / f"{bundle.sha256}.efb"
        if not path.exists():
            atomic_write(path, data)
        model = ModelVersion(name=manifest.name, version=manifest.version, sha256=bundle.sha256,
                             size=len(data), format=manifest.format,
                             runtime=manifest.runtime.name,
                             min_runtime_version=manifest.runtime.min_version,
                             manifest=manifest.model_dump(mode="json"), path=str(path),
                             pushed_ms=self.clock(), pushed_by=actor)
        try:
            added = self.store.add_model(model)
        except ConflictError as exc:
            self._audit(actor, "model.push", model.key, str(exc), outcome="refused")
            raise
        if added:
            self._audit(actor, "model.push", model.key, f"sha256 {bundle.sha256[:12]}",
                        size=len(data))
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
        model = self._model_by_sha(sha256)
        return Path(model.path) if model is not None else None

    def set_group(self, devices: list[str], group: str | None, actor: str) -> list[Device]:
        with self._lock:
            self._flush_devices()
            self.store.set_group(devices, group)
            changed = [self._reload(d) for d in devices]
            self._audit(actor, "device.group", ",".join(devices), f"group {group}")
            return changed

    def tag(self, device: str, add: list[str], remove: list[str], actor: str) -> Device:
        with self._lock:
            self._flush_devices()
            self.store.set_tags(device, add, remove)
            changed = self._reload(device)
            self._audit(actor, "device.tags", device, f"+{add} -{remove}")
            return changed

    def _reload(self, device_id: str) -> Device:
        device = self.store.device(device_id)
        if device is None:
            raise NotFoundError(f"no device {device_id!r}")
        self.registry.replace(device)
        return device

    def create_rollout(self, model_key: str, options: dict[str, Any], actor: str) -> Rollout:
        model = self.model(model_key)
        try:
            spec = RolloutSpec.from_dict({**options, "model": model.ref.model_dump(),
                                          "url": self.bundle_url(model.sha256),
                                          "size": model.size})
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidRolloutError(f"rollout options are invalid: {exc}") from exc
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
            self.store.save_rollout(rollout)
            self._audit(actor, "rollout.create", rollout.id,
                        f"{model.key} to {', '.join(map(str, spec.selectors))}",
                        spec=spec.as_dict())
            decisions = executor.tick(rollout, self._observe(rollout, set()), now)
            rollout = self._apply(decisions, actor)
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
                "outbox": len(self._outbox),
                **({"quality": self.telemetry.summary()} if quality else {})}

