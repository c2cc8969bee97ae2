"""The running agent: serving, HTTP, MQTT status, reported state, events and telemetry.

Wires the pieces together and owns their start and stop; each piece does one job:
:class:`edgefleet.agent.models.ModelSet` serves the models by name (one
:class:`edgefleet.agent.core.Agent` and one :class:`UpdateRunner` a model, each on its own
folder of the data dir), :class:`edgefleet.agent.serving.http.InferenceServer`
speaks KServe v2, :class:`edgefleet.agent.mqtt.MqttClient` talks to the broker,
:class:`edgefleet.agent.telemetry.reporter.TelemetryReporter` publishes (or spools) telemetry.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent import __version__
from edgefleet.agent.core import Agent
from edgefleet.agent.events import EventLog
from edgefleet.agent.ha_discovery import publish_discovery
from edgefleet.agent.loader import LoadedModel
from edgefleet.agent.models import ModelSet
from edgefleet.agent.mqtt import MqttClient, MqttSecurity
from edgefleet.agent.protocol.bundle import read_manifest
from edgefleet.agent.protocol.errors import EdgefleetError
from edgefleet.agent.protocol.keyring import (
    KEYRING_FILE,
    SignedKeyring,
    accept_keyring,
    load_keyring,
    save_keyring,
)
from edgefleet.agent.protocol.payloads import (
    MAX_MODELS,
    MODELS_SCHEMA_VERSION,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    BundleRef,
    DesiredModels,
    DesiredState,
    ModelReport,
    ReportedState,
    decode_desired,
    desired_entries,
    encode,
)
from edgefleet.agent.protocol.topics import Leaf, device_topic, keyring_topic
from edgefleet.agent.runtime.select import installed_runtimes
from edgefleet.agent.serving.http import InferenceServer
from edgefleet.agent.serving.limits import HttpLimits
from edgefleet.agent.serving.security import HttpSecurity
from edgefleet.agent.telemetry.reporter import TelemetryReporter
from edgefleet.agent.telemetry.spool import Spool
from edgefleet.agent.update.device import UpdateSettings
from edgefleet.agent.update.layout import migrate, model_dir, sweep_failed
from edgefleet.agent.update.report import target_ref, update_report
from edgefleet.agent.update.runner import UpdateRunner
from edgefleet.agent.update.slots import SlotStore
from edgefleet.agent.update.states import Journal, UpdateState

__all__ = ["AgentService", "ServiceConfig"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    fleet: str
    device_id: str
    data_dir: Path
    broker_url: str | None = None
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    http_limits: HttpLimits = field(default_factory=HttpLimits)  # sizes, timeouts, connections
    http_security: HttpSecurity | None = None  # HTTPS, bearer tokens, client certificates
    telemetry_interval_s: float = 10.0
    spool_max_bytes: int = 8 * 1024 * 1024
    profile: str | None = None
    mqtt_security: MqttSecurity | None = None  # TLS files, client certificate, user/password
    probation_s: float = 60.0
    max_error_rate: float = 0.05
    step_delay_s: float = 0.0
    latency_budget_ms: float | None = 1000.0
    ha_discovery: bool = False
    labels: dict[str, str] = field(default_factory=dict)  # reported, for fleet selectors


class AgentService:
    """Starts and stops everything around a :class:`ModelSet` (an :class:`Agent` given
    alone is the set of its one model)."""

    def __init__(self, config: ServiceConfig, models: ModelSet | Agent) -> None:
        self.config = config
        self.models = models if isinstance(models, ModelSet) else ModelSet.of(models)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        migrate(config.data_dir)  # a data dir of one model: its model's folder
        self.events = EventLog(config.data_dir / "events.seq")
        self.desired: DesiredState | DesiredModels | None = None
        self.http: InferenceServer | None = None
        self.mqtt: MqttClient | None = None
        self.reporter: TelemetryReporter | None = None
        self.runners: dict[str, UpdateRunner] = {}
        self._lock = threading.Lock()
        self._runners_lock = threading.Lock()
        self.keyring = _held_keyring(config.data_dir / KEYRING_FILE)
        self.models.on_change(self._model_changed)

    @property
    def agent(self) -> Agent:
        """The agent of the one model (a device serving one model)."""
        return self.models.only()

    @property
    def updates(self) -> UpdateRunner | None:
        """The update runner of the one model (a device serving one model), or None."""
        runners = list(self.runners.values())
        return runners[0] if len(runners) == 1 else None

    def topic(self, leaf: Leaf) -> str:
        return device_topic(self.config.fleet, self.config.device_id, leaf)

    def start(self) -> None:
        if self.config.http_port is not None:
            self.http = InferenceServer(self.models, self.config.http_host, self.config.http_port,
                                        self.config.http_limits, self.config.http_security)
            self.http.start()
        if self.config.broker_url:
            self._start_mqtt(self.config.broker_url)

    def stop(self) -> None:
        for runner in list(self.runners.values()):
            runner.stop()
        if self.reporter:
            self.reporter.stop(flush=True)
        if self.mqtt:
            self._publish_status(STATUS_OFFLINE, wait=True)
            self.mqtt.stop()
        if self.http:
            self.http.stop()

    def _start_mqtt(self, url: str) -> None:
        cfg = self.config
        self.mqtt = MqttClient.from_url(
            f"edgefleet-{cfg.fleet}-{cfg.device_id}", url,
            will=(self.topic(Leaf.STATUS), STATUS_OFFLINE.encode(), 1, True),
            security=cfg.mqtt_security)
        self.mqtt.on_connect(self._connected)
        # the keyring first: its retained copy then arrives before the desired state
        self.mqtt.subscribe(keyring_topic(cfg.fleet), self._keyring_message)
        self.mqtt.subscribe(self.topic(Leaf.DESIRED), self._desired_message)
        spool = Spool(cfg.data_dir / "spool", cfg.spool_max_bytes)
        self.reporter = TelemetryReporter(self.mqtt, cfg.fleet, cfg.device_id,
                                          self.models.telemetry_values, spool,
                                          cfg.telemetry_interval_s)
        for name in self.models.names():
            self._runner(name)
        self.mqtt.start()
        self.reporter.start()

    def _settings(self) -> UpdateSettings:
        cfg = self.config
        return UpdateSettings(probation_s=cfg.probation_s, max_error_rate=cfg.max_error_rate,
                              step_delay_s=cfg.step_delay_s,
                              latency_budget_ms=cfg.latency_budget_ms)

    def _runner(self, name: str) -> UpdateRunner:
        """Model ``name``'s update runner, started on its folder (and its agent made, empty,
        for a model the fleet adds)."""
        with self._runners_lock:
            runner = self.runners.get(name)
            if runner is None:
                runner = UpdateRunner(model_dir(self.config.data_dir, name),
                                      self.models.agent(name), self._settings(),
                                      self._journal_changed)
                self.runners[name] = runner
                runner.start()
            return runner

    def reported_state(self) -> ReportedState:
        """Version 2: one entry per model, named by the folders the runners work on too; a
        model installed that cannot be served is there too, not serving."""
        names = sorted(set(self.models.names()) | set(self.runners)
                       | set(self.models.broken()))
        if len(names) > MAX_MODELS:  # never published as a document the fleet refuses
            names.sort(key=self._rank)  # the failed entries are left out first
            log.warning("reporting %d of %d models (at most %d a device): %s left out",
                        MAX_MODELS, len(names), MAX_MODELS, ", ".join(names[MAX_MODELS:]))
            names = sorted(names[:MAX_MODELS])
        models = {name: self._model_report(name) for name in names}
        one = dict(models[names[0]]) if len(names) == 1 else {}  # see ReportedState
        one.pop("serving", None)
        return ReportedState(schema_version=MODELS_SCHEMA_VERSION, models=models, **one,
                             fleet=self.config.fleet, device=self.config.device_id,
                             agent_version=__version__, runtimes=installed_runtimes(),
                             profile=self.config.profile,
                             decryption_keys=self.models.keys.key_ids,
                             arch=platform.machine() or None, labels=self.config.labels,
                             serving=self.models.ready, ts=int(time.time() * 1000))

    def _model_report(self, name: str) -> ModelReport:
        agent, runner = self.models.get(name), self.runners.get(name)
        model = agent.model if agent is not None else None
        if model is not None and model.name != name:  # never reported under another name
            log.error("model %s serves a bundle of model %s: reported as not serving",
                      name, model.name)
            model = None
        folder = model_dir(self.config.data_dir, name)
        slots = SlotStore(folder) if folder.is_dir() else None
        pointer = slots.pointer() if slots is not None else None
        previous = (slots.bundle(pointer.committed if pointer.committed != pointer.active
                                 else pointer.fallback)
                    if slots is not None and pointer is not None else None)
        update = update_report(runner.journal if runner else None)
        reason = self.models.broken().get(name)
        active = model.ref if model else None
        if reason is not None:  # installed, not served: what it holds, and why not
            if active is None and slots is not None and pointer is not None:
                active = _ref(slots.bundle(pointer.active), name)
            if update.state == UpdateState.IDLE.value and not update.detail:
                update = update.model_copy(update={"detail": f"not served: {reason}"[:500]})
        return ModelReport(active=active, previous=_ref(previous, name),
                           slot=pointer.active if pointer is not None else None,
                           update=update, serving=model is not None and reason is None)

    def publish_event(self, kind: str, detail: str = "", state: str | None = None,
                      bundle: BundleRef | None = None, of_the_model: bool = True) -> None:
        """``of_the_model``: an event without a bundle is about the one model served (off:
        about another, e.g. a model that cannot load)."""
        only = self.models.items()
        model = only[0][1].model if len(only) == 1 and of_the_model else None
        event = self.events.next(kind, detail, state=state,
                                 bundle=bundle or (model.ref if model else None))
        ref = event.bundle  # the log line names what the event is about, as --log-format json
        about = " ".join(part for part in (ref and f"{ref.name} {ref.version}", state, detail)
                         if part)  # the text line says what the json fields say
        log.info("%s: %s", kind, about or "-", extra={"state": state, "model": ref and ref.name,
                                                      "version": ref and ref.version})
        if self.mqtt:
            self.mqtt.publish(self.topic(Leaf.EVENTS), encode(event), qos=1, retain=False)

    def _connected(self) -> None:
        if self.config.ha_discovery and self.mqtt:
            publish_discovery(self.mqtt, self.config.fleet, self.config.device_id,
                              self.config.profile)
        self._publish_status(STATUS_ONLINE)
        self._publish_reported()
        for name, reason in self.models.broken().items():
            self.publish_event("model_failed", f"{name}: not served: {reason}",
                               of_the_model=False)

    def _publish_status(self, status: str, wait: bool = False) -> None:
        assert self.mqtt is not None
        topic, payload = self.topic(Leaf.STATUS), status.encode()
        if not wait:
            self.mqtt.publish(topic, payload, qos=1, retain=True)
            return
        try:
            self.mqtt.publish_wait(topic, payload, qos=1, retain=True, timeout=2.0)
        except EdgefleetError as exc:
            log.warning("could not publish %s status: %s", status, exc)

    def _publish_reported(self) -> None:
        if self.mqtt:
            self.mqtt.publish(self.topic(Leaf.REPORTED), encode(self.reported_state()),
                              qos=1, retain=True)

    def _model_changed(self, model: LoadedModel) -> None:
        self._publish_reported()
        self.publish_event("model_loaded", f"serving {model.name} {model.version}")

    def _journal_changed(self, journal: Journal) -> None:
        self.publish_event("update", journal.detail, state=journal.state.value,
                           bundle=target_ref(journal))
        self._publish_reported()

    def _desired_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return  # a cleared retained message
        try:
            desired = decode_desired(payload)
        except EdgefleetError as exc:
            log.warning("dropped malformed desired state on %s: %s", topic, exc)
            self.publish_event("payload_rejected", f"{topic}: {exc.message}")
            return
        with self._lock:
            self.desired = desired
        self._follow(desired)

    def _follow(self, desired: DesiredState | DesiredModels) -> None:
        """Hand each model's entry to that model's runner (a model named for the first time
        gets one); a model without an entry is not touched."""
        if self.mqtt is None:
            return  # no fleet: nothing follows the desired state
        entries = desired_entries(desired)
        self._drop_never_installed(set(entries))
        room = MAX_MODELS - self._counted()  # counted before any entry is handed out
        for name, entry in entries.items():
            log.info("desired state: %s %s (%s)", name, entry.version, entry.action)
            if name not in self.runners:
                if room <= 0:
                    why = (f"a device serves at most {MAX_MODELS} models; the models installed "
                           f"and those this desired state adds before it fill them")
                    log.warning("refused model %s: %s", name, why)
                    self.publish_event("model_refused", f"{name}: {why}", of_the_model=False)
                    continue
                room -= 1
            self._runner(name).desired(entry)

    def _never_installed(self, name: str) -> bool:
        """A runner whose first install ended without a model (a failed entry)."""
        runner, agent = self.runners.get(name), self.models.get(name)
        return (runner is not None and runner.journal.state is UpdateState.FAILED
                and agent is not None and agent.model is None and runner.idle)

    def _counted(self) -> int:
        """The models that count toward MAX_MODELS: those installed (serving, or broken);
        never an entry whose first install failed or is still on its way (a fleet entry
        whose download keeps failing must not keep a real model out)."""
        with self._runners_lock:
            return len({name for name, agent in self.models.items() if agent.model is not None}
                       | set(self.models.broken()))

    def _rank(self, name: str) -> int:
        """What the reported state keeps first when it must leave models out: the installed
        ones, then the first installs on their way, then the failed entries."""
        agent = self.models.get(name)
        if (agent is not None and agent.model is not None) or name in self.models.broken():
            return 0
        return 2 if self._never_installed(name) else 1

    def _drop_never_installed(self, wanted: set[str]) -> None:
        """The runners of failed entries the fleet no longer names go, with their folders."""
        with self._runners_lock:
            dropped = [name for name in self.runners
                       if name not in wanted and self._never_installed(name)]
            for name in dropped:
                self.runners.pop(name).stop()
                self.models.remove(name)
        if dropped:
            log.info("dropped %s: no longer desired, never installed", ", ".join(dropped))
            sweep_failed(self.config.data_dir, dropped)

    def _keyring_message(self, topic: str, payload: bytes) -> None:
        """A new fleet keyring: checked against the keys trusted now, kept, then trusted."""
        if not payload:
            return  # a cleared retained message changes nothing
        with self._lock:
            try:
                keyring = accept_keyring(payload, self.models.trusted, self.keyring)
                if keyring is not None:
                    save_keyring(self.config.data_dir / KEYRING_FILE, keyring)
            except (EdgefleetError, OSError) as exc:  # OSError: it could not be kept
                reason = exc.message if isinstance(exc, EdgefleetError) else str(exc)
                log.warning("refused the keyring on %s: %s", topic, reason)
                self.publish_event("keyring_rejected", f"{topic}: {reason}")
                return
            if keyring is None:
                return  # the one held already (retained, sent again on every connection)
            self.keyring, desired = keyring, self.desired
            self.models.trust(keyring.trusted())
        log.info("keyring serial %d applied: trusting %s", keyring.serial,
                 ", ".join(keyring.key_ids))
        self.publish_event("keyring_applied", f"serial {keyring.serial}: trusting "
                                              f"{', '.join(keyring.key_ids)}")
        for _, agent in self.models.items():
            model = agent.model
            if model is not None and model.bundle.key_id not in keyring.key_ids:
                log.warning("the active bundle %s is signed by %s, which keyring serial %d no "
                            "longer trusts: it will not load again after a restart",
                            model.name, model.bundle.key_id, keyring.serial)
        if desired is not None:
            self._follow(desired)  # a target refused for its key may verify now


def _held_keyring(path: Path) -> SignedKeyring | None:
    try:
        return load_keyring(path)
    except EdgefleetError as exc:  # the next keyring published is checked against agent.trusted
        log.warning("%s", exc)
        return None


def _ref(path: Path | None, name: str) -> BundleRef | None:
    if path is None:
        return None
    try:
        manifest, sha256 = read_manifest(path)
    except EdgefleetError:
        return None
    if manifest.name != name:
        return None  # a bundle of another model is no previous bundle of this one
    return BundleRef(name=manifest.name, version=manifest.version, sha256=sha256)
