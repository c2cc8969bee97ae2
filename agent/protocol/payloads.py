"""MQTT payload schemas, each carrying ``schema_version``, validated on the way in.

The desired and reported states have two versions (docs/protocol.md, "Several models"):
version 1 speaks of the one model a device serves; version 2 carries one entry per model
name. A device reads both desired versions (:func:`decode_desired`: a version 1 document
is the one entry of the model it names) and reports version 2; a controller reads both
reported versions (:meth:`ReportedState.model_reports`) and writes version 1 to a device
that reports version 1. A reader of version 1 only refuses a version 2 document by its
``schema_version``, with the reason and the fix.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import Field, StringConstraints, model_validator

from edgefleet.agent.protocol.errors import PayloadError, SchemaVersionError
from edgefleet.agent.protocol.schema import (
    NAME_PATTERN,
    SEMVER_PATTERN,
    SHA256_PATTERN,
    Document,
    decode_json,
    is_supported,
    validate_document,
)
from edgefleet.agent.protocol.update_state import UpdateState

__all__ = [
    "MAX_MODELS",
    "MODELS_SCHEMA_VERSION",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "BundleRef",
    "DeltaRef",
    "DesiredModels",
    "DesiredState",
    "Event",
    "ModelReport",
    "ReportedState",
    "Telemetry",
    "UpdateReport",
    "decode",
    "decode_desired",
    "decode_status",
    "decode_telemetry",
    "desired_entries",
    "encode",
]

# a device's own labels (``edgefleet agent run --label KEY=VALUE``), which fleet selectors
# read (``label:site=plant-a``): keys are names, values 1-64 printable characters
LabelKey = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
LabelValue = Annotated[str, StringConstraints(min_length=1, max_length=64,
                                              pattern=r"^[^\x00-\x1f\x7f]+$")]
MAX_LABELS = 32

STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"
SCHEMA_VERSION = 1
MODELS_SCHEMA_VERSION = 2  # the desired and reported states with one entry per model
MAX_MODELS = 16  # models one device serves (and entries one document carries)
_STATE_VERSIONS = frozenset({SCHEMA_VERSION, MODELS_SCHEMA_VERSION})

P = TypeVar("P", bound=Document)


class BundleRef(Document):
    """Which bundle: name, version and the sha256 of its manifest."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN)


class DeltaRef(Document):
    """A delta the device may rebuild the bundle from (optional, additive: an agent that
    predates deltas ignores it and downloads ``url``; docs/protocol.md, "Deltas")."""

    url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://[^\s]+$")
    sha256: str = Field(pattern=SHA256_PATTERN)  # of the delta file
    size: int = Field(gt=0)  # bytes of the delta file: the download never reads more
    base: str = Field(pattern=SHA256_PATTERN)  # sha256 of the bundle file it applies to
    result: str = Field(pattern=SHA256_PATTERN)  # sha256 of the bundle file it rebuilds


class DesiredState(Document):
    """Retained on ``state/desired``, written by the controller only."""

    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=SEMVER_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN)
    # http(s) only: a desired state must never make a device read its own files
    url: str = Field(min_length=1, max_length=2048, pattern=r"^https?://[^\s]+$")
    size: int = Field(ge=0)  # bytes of the bundle file: the download never reads more
    # the update attempt: the same id repeated is the same word, another id a new attempt
    # (a new rollout of a version the device rolled back installs it; docs/protocol.md)
    rollout: str | None = None
    action: Literal["install", "commit", "rollback"] = "install"
    auto_commit: bool = False
    issued_at: int = 0  # when the controller wrote it (changes on a re-send: no identity)
    delta: DeltaRef | None = None  # from the bundle the device reported, when worth it


class DesiredModels(Document):
    """Retained on ``state/desired`` (version 2): one entry a model name, each the version 1
    desired state of that model (its ``name`` is the key). A model without an entry is left
    as it is: a rollout of one model never touches the others."""

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({MODELS_SCHEMA_VERSION})

    schema_version: int = MODELS_SCHEMA_VERSION
    models: dict[str, DesiredState] = Field(max_length=MAX_MODELS)
    issued_at: int = 0

    @model_validator(mode="after")
    def _keys_name_their_entries(self) -> DesiredModels:
        for name, entry in self.models.items():
            if entry.name != name:
                raise ValueError(f"the entry of model {name[:64]!r} names bundle "
                                 f"{entry.name!r}: a model is named by its bundle")
            if entry.schema_version != SCHEMA_VERSION:
                raise ValueError(f"the entry of model {name[:64]!r} has schema_version "
                                 f"{entry.schema_version!r}, entries are version 1")
        return self


class UpdateReport(Document):
    """The ``update`` of a reported state: where the device's update is, and on what."""

    schema_version: int = SCHEMA_VERSION
    # an UpdateState's value; read as text, so a reader names an unknown one itself
    state: str = UpdateState.IDLE.value
    target: BundleRef | None = None
    detail: str = ""
    since: int = 0


class ModelReport(Document):
    """One model of a version 2 reported state: what it serves, its slots and its update."""

    active: BundleRef | None = None
    previous: BundleRef | None = None
    slot: str | None = None
    update: UpdateReport = Field(default_factory=UpdateReport)
    serving: bool = False


class ReportedState(Document):
    """Retained on ``state/reported``, written by the device only.

    Version 1 describes the device's one model in ``active``, ``previous``, ``slot``,
    ``update`` and ``serving``. Version 2 describes each model in ``models`` (name ->
    :class:`ModelReport`); its ``serving`` says every model serves, and ``active``,
    ``previous``, ``slot`` and ``update`` repeat the entry of the one model when it holds
    exactly one (else they are empty): a reader of one model reads them as before.
    """

    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = _STATE_VERSIONS

    schema_version: int = SCHEMA_VERSION
    fleet: str
    device: str
    agent_version: str
    active: BundleRef | None = None
    previous: BundleRef | None = None
    slot: str | None = None
    update: UpdateReport = Field(default_factory=UpdateReport)
    runtimes: dict[str, str] = Field(default_factory=dict)
    profile: str | None = None
    serving: bool = False
    # key ids of the X25519 keys this device opens encrypted models with (agent.protocol.
    # encryption); None: an agent that predates encrypted bundles (optional, additive)
    decryption_keys: list[str] | None = None
    # optional and additive (an older agent sends neither): the CPU architecture
    # (platform.machine()) and the labels the device was given, for fleet selectors
    arch: str | None = Field(default=None, max_length=64)
    labels: dict[LabelKey, LabelValue] | None = Field(default=None, max_length=MAX_LABELS)
    ts: int = 0
    models: dict[str, ModelReport] | None = Field(default=None, max_length=MAX_MODELS)

    @model_validator(mode="after")
    def _models_match_the_version(self) -> ReportedState:
        if (self.models is not None) != (self.schema_version >= MODELS_SCHEMA_VERSION):
            raise ValueError(f"models is given from schema_version {MODELS_SCHEMA_VERSION} "
                             f"on, and only there (this one is {self.schema_version})")
        for name, model in (self.models or {}).items():
            if model.active is not None and model.active.name != name:
                raise ValueError(f"model {name[:64]!r} serves bundle {model.active.name!r}: "
                                 f"a model is named by its bundle")
        return self

    def model_reports(self) -> dict[str, ModelReport]:
        """Each model's report, whatever the version (version 1: the one model it names)."""
        if self.models is not None:
            return dict(self.models)
        update = self.update
        named = self.active or (update.target if update else None) or self.previous
        if named is None:
            return {}
        return {named.name: ModelReport(active=self.active, previous=self.previous,
                                        slot=self.slot, update=update, serving=self.serving)}


class Event(Document):
    """QoS 1 on ``events``: one update transition or error, numbered by ``seq``."""

    schema_version: int = SCHEMA_VERSION
    seq: int = Field(ge=0)
    ts: int
    kind: str
    state: str | None = None
    detail: str = ""
    bundle: BundleRef | None = None


class Telemetry(Document):
    """One ``telemetry`` point in ThingsBoard's ``{"ts", "values"}`` shape.

    ``schema_version`` travels inside ``values`` so the outer shape stays ThingsBoard's.
    """

    ts: int
    values: dict[str, Any]


def encode(document: Document) -> bytes:
    return document.model_dump_json(exclude_none=False).encode()


def decode(cls: type[P], raw: bytes | str) -> P:
    return validate_document(cls, decode_json(raw, cls.__name__), cls.__name__)


def decode_desired(raw: bytes | str) -> DesiredState | DesiredModels:
    """A desired state of either version (checked against the version it says it is)."""
    data = decode_json(raw, "state/desired")
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(data, dict) and not is_supported(version, _STATE_VERSIONS):
        raise SchemaVersionError(
            f"state/desired has schema_version {version!r}; this edgefleet reads "
            f"{sorted(_STATE_VERSIONS)}",
            hint="upgrade edgefleet on this side, or produce the document with a matching "
                 "version")
    if version == MODELS_SCHEMA_VERSION:
        return validate_document(DesiredModels, data, "state/desired")
    return validate_document(DesiredState, data, "state/desired")


def desired_entries(desired: DesiredState | DesiredModels) -> dict[str, DesiredState]:
    """Model name -> its desired state (version 1: the one model it names)."""
    if isinstance(desired, DesiredModels):
        return dict(desired.models)
    return {desired.name: desired}


def decode_telemetry(raw: bytes | str) -> list[Telemetry]:
    """A single point or a replayed batch (JSON array) of points.

    The busiest payload a controller reads: checked by hand (the shape, ``ts``, the
    ``schema_version`` inside ``values``) rather than through a full model validation.
    """
    data = decode_json(raw, "telemetry")
    points = data if isinstance(data, list) else [data]
    result = []
    for point in points:
        if not isinstance(point, dict) or not isinstance(point.get("values"), dict):
            raise PayloadError("telemetry point must be {\"ts\": ms, \"values\": {...}}")
        ts, values = point.get("ts"), point["values"]
        if not isinstance(ts, int) or isinstance(ts, bool):
            raise PayloadError(f"telemetry ts must be an integer of milliseconds, got {ts!r}",
                               hint="see docs/protocol.md for the schema")
        version = values.get("schema_version")
        if not is_supported(version, Telemetry.SUPPORTED_VERSIONS):
            raise SchemaVersionError(
                f"telemetry has schema_version {version!r}; this edgefleet reads "
                f"{sorted(Telemetry.SUPPORTED_VERSIONS)}",
                hint="upgrade edgefleet on this side, or produce the document with a "
                     "matching version")
        result.append(Telemetry.model_construct(ts=ts, values=values))
    return result


def decode_status(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if text not in (STATUS_ONLINE, STATUS_OFFLINE):
        raise PayloadError(f"status must be 'online' or 'offline', got {text[:40]!r}")
    return text
