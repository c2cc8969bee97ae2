"""What the fleet keeps: devices, model versions and the audit trail (plain frozen data).

Rollouts live in :mod:`edgefleet.fleet.rollout`. Everything here converts to and from plain
JSON dicts (``as_dict`` / ``from_dict``): the store keeps them, the API sends them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgefleet.agent.protocol.payloads import BundleRef
from edgefleet.agent.protocol.update_state import UpdateState

__all__ = ["AuditEntry", "Device", "ModelState", "ModelVersion", "ref_from_dict", "ref_to_dict"]


def ref_to_dict(ref: BundleRef | None) -> dict[str, str] | None:
    return None if ref is None else {"name": ref.name, "version": ref.version,
                                     "sha256": ref.sha256}


def ref_from_dict(data: Any) -> BundleRef | None:
    if not isinstance(data, dict):
        return None
    # Stored and API data were validated when they came in: no second validation.
    return BundleRef.model_construct(name=str(data["name"]), version=str(data["version"]),
                                     sha256=str(data["sha256"]))


@dataclass(frozen=True)
class ModelState:
    """One model of a device, as the device reported it."""

    active: BundleRef | None = None
    previous: BundleRef | None = None
    update_state: str = UpdateState.IDLE.value
    update_target: str | None = None  # sha256 of the bundle the update is about
    update_detail: str = ""
    update_since_ms: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"active": ref_to_dict(self.active), "previous": ref_to_dict(self.previous),
                "update_state": self.update_state, "update_target": self.update_target,
                "update_detail": self.update_detail, "update_since_ms": self.update_since_ms}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelState:
        return cls(active=ref_from_dict(data.get("active")),
                   previous=ref_from_dict(data.get("previous")),
                   update_state=str(data.get("update_state") or UpdateState.IDLE.value),
                   update_target=data.get("update_target"),
                   update_detail=str(data.get("update_detail") or ""),
                   update_since_ms=int(data.get("update_since_ms") or 0))


@dataclass(frozen=True)
class Device:
    """One device as the controller knows it: what it reported, plus group and tags."""

    id: str
    fleet: str
    online: bool = False
    group: str | None = None
    tags: frozenset[str] = frozenset()
    profile: str | None = None
    runtimes: dict[str, str] = field(default_factory=dict)
    # what the device reports of itself beyond that (kept in memory only, like
    # decryption_keys: its retained report restores them after a restart)
    arch: str | None = None  # CPU architecture (platform.machine())
    reported_labels: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # set by operators (stored)
    # key ids the device decrypts models with, as it reported them (None: not reported);
    # kept in memory only: a device's retained report restores it after a restart
    decryption_keys: tuple[str, ...] | None = None
    agent_version: str | None = None
    active: BundleRef | None = None
    previous: BundleRef | None = None
    update_state: str = UpdateState.IDLE.value  # as the device reported it
    update_target: str | None = None  # sha256 of the bundle the update is about
    update_detail: str = ""
    update_since_ms: int = 0  # when the device entered update_state (its own clock)
    first_seen_ms: int = 0
    last_seen_ms: int = 0
    # each model by name, from a report of version 2 (docs/protocol.md, "Several models");
    # None: the device reports one model (version 1) in the fields above, or has not
    # reported since the controller started (kept in memory only, as decryption_keys)
    models: dict[str, ModelState] | None = None

    def with_changes(self, **changes: Any) -> Device:
        return replace(self, **changes)

    @property
    def model_refs(self) -> list[tuple[str, str]]:
        """(name, version) of each model it runs, for selectors."""
        if self.models is None:
            return [(self.active.name, self.active.version)] if self.active else []
        return sorted((name, state.active.version) for name, state in self.models.items()
                      if state.active)

    @property
    def all_labels(self) -> dict[str, str]:
        """Its labels: those it reports, and those operators set (which win)."""
        return {**self.reported_labels, **self.labels} if self.reported_labels else self.labels

    def model(self, name: str) -> ModelState:
        """Model ``name`` on this device. A device of one model (version 1) answers with
        that model whatever the name: a rollout of another name replaces it, as it always
        did. A device of several answers with an empty state for a model it does not run."""
        if self.models is None:
            return ModelState(self.active, self.previous, self.update_state,
                              self.update_target, self.update_detail, self.update_since_ms)
        return self.models.get(name) or ModelState()

    @property
    def summary_state(self) -> str:
        """The update state that says most across its models (a failure first, then an
        update on its way, then a settled one): one state per device, for the views that
        count devices (a device of one model: its own)."""
        if not self.models:
            return self.update_state
        return max((state.update_state for state in self.models.values()), key=_telling)

    @property
    def model_names(self) -> list[str]:
        """The names of the models it serves (version 1: the one it reported)."""
        if self.models is None:
            return [self.active.name] if self.active else []
        return sorted(name for name, state in self.models.items() if state.active)

    def as_dict(self) -> dict[str, Any]:
        # Shallow on purpose: ``dataclasses.asdict`` deep-copies every BundleRef only for it
        # to be replaced here (20x slower over 10,000 devices).
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data.update(tags=sorted(self.tags), runtimes=dict(self.runtimes),
                    reported_labels=dict(self.reported_labels), labels=dict(self.labels),
                    active=ref_to_dict(self.active), previous=ref_to_dict(self.previous),
                    models=None if self.models is None else {
                        name: state.as_dict() for name, state in sorted(self.models.items())})
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Device:
        return cls(id=str(data["id"]), fleet=str(data["fleet"]), online=bool(data["online"]),
                   group=data.get("group"), tags=frozenset(data.get("tags") or ()),
                   profile=data.get("profile"), runtimes=dict(data.get("runtimes") or {}),
                   arch=data.get("arch"),
                   reported_labels=dict(data.get("reported_labels") or {}),
                   labels=dict(data.get("labels") or {}),
                   agent_version=data.get("agent_version"),
                   active=ref_from_dict(data.get("active")),
                   previous=ref_from_dict(data.get("previous")),
                   update_state=str(data.get("update_state") or UpdateState.IDLE.value),
                   update_target=data.get("update_target"),
                   update_detail=str(data.get("update_detail") or ""),
                   update_since_ms=int(data.get("update_since_ms") or 0),
                   first_seen_ms=int(data.get("first_seen_ms") or 0),
                   last_seen_ms=int(data.get("last_seen_ms") or 0),
                   models=_models_from(data.get("models")))


def _models_from(data: Any) -> dict[str, ModelState] | None:
    if not isinstance(data, dict):
        return None
    return {str(name): ModelState.from_dict(state) for name, state in data.items()
            if isinstance(state, dict)}


@dataclass(frozen=True)
class ModelVersion:
    """A pushed bundle: identity (name, version, manifest sha256), where it is, what it measured.

    ``manifest`` is the bundle's manifest as a JSON dict; ``path`` is where the controller
    keeps the ``.efb`` (content-addressed by ``sha256``).
    """

    name: str
    version: str
    sha256: str
    size: int
    format: str
    runtime: str
    min_runtime_version: str
    manifest: dict[str, Any]
    path: str
    pushed_ms: int
    pushed_by: str

    @property
    def ref(self) -> BundleRef:
        return BundleRef(name=self.name, version=self.version, sha256=self.sha256)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def metrics(self) -> dict[str, Any]:
        metrics = self.manifest.get("metrics")
        return metrics if isinstance(metrics, dict) else {}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelVersion:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class AuditEntry:
    """One line of history: who (token name) did what to which target, and how it ended."""

    ts_ms: int
    actor: str
    action: str
    target: str
    outcome: str = "ok"
    detail: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuditEntry:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


_SETTLED = {UpdateState.IDLE.value: 0, UpdateState.COMMITTED.value: 1,
            UpdateState.ROLLED_BACK.value: 3, UpdateState.FAILED.value: 4}


def _telling(state: str) -> int:
    """How much a model's update state says of its device (any state on its way: 2)."""
    return _SETTLED.get(state, 2)
