"""What the REST API sends and takes, as typed dicts: one per schema of ``fleet/openapi.json``
(``components/schemas``), with the same name and fields (``tests/test_api_contract.py``
checks they agree). :class:`edgefleet.fleet.client.FleetClient` returns them; they are the
JSON the controller sent, so ``--json`` prints them as they came.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

__all__ = [
    "Alert",
    "Alerts",
    "AuditEntry",
    "BundleRef",
    "ControllerStatus",
    "Device",
    "DeviceModel",
    "DriftPolicies",
    "DriftPolicy",
    "DriftRow",
    "GateOptions",
    "Gates",
    "GroupRequest",
    "Health",
    "KeyEntry",
    "Keyring",
    "KeyringPublished",
    "ModelVersion",
    "Overview",
    "PushResult",
    "Removal",
    "Rollout",
    "RolloutDevice",
    "RolloutOptions",
    "RolloutRequest",
    "RolloutSpec",
    "RolloutSummary",
    "SavedGroup",
    "TagsRequest",
    "TokenInfo",
    "VersionQuality",
]


class BundleRef(TypedDict):
    name: str
    version: str
    sha256: str


class _ControllerStatus(TypedDict):
    id: str | None
    role: Literal["single", "leader", "follower"]
    leader: str | None


class ControllerStatus(_ControllerStatus, total=False):
    """Which controller answered, and who leads; the lease fields only when scaled out."""

    leader_url: str | None
    generation: int
    lease_s: float | None
    expires_in_ms: int
    shared_telemetry: str | None
    telemetry_merged: int


class VersionQuality(TypedDict):
    inferences: int
    p50_ms: float | None
    p95_ms: float | None
    error_rate: float | None
    agreement: float | None


class _Counts(TypedDict):
    fleet: str
    devices: int
    online: int
    versions: dict[str, int]
    update_states: dict[str, int]
    telemetry_points: int
    rejected: int
    rejected_by: dict[str, int]
    outbox: int
    controller: ControllerStatus


class Health(_Counts):
    ok: Literal[True]


class Overview(_Counts):
    quality: dict[str, VersionQuality]


class Device(TypedDict):
    id: str
    fleet: str
    online: bool
    group: str | None
    tags: list[str]
    profile: str | None
    runtimes: dict[str, str]
    decryption_keys: list[str] | None
    agent_version: str | None
    active: BundleRef | None
    previous: BundleRef | None
    update_state: str
    update_target: str | None
    update_detail: str
    update_since_ms: int
    first_seen_ms: int
    last_seen_ms: int
    arch: str | None
    reported_labels: dict[str, str]
    labels: dict[str, str]
    models: dict[str, DeviceModel] | None  # several models (protocol version 2), by name


class DeviceModel(TypedDict):
    """One model of a device of several."""

    active: BundleRef | None
    previous: BundleRef | None
    update_state: str
    update_target: str | None
    update_detail: str
    update_since_ms: int


class Removal(TypedDict):
    """What a decommission did: removed ids, kept ids with why, the revocation command."""

    removed: list[str]
    skipped: dict[str, str]
    revoke: dict[str, str] | None


class SavedGroup(TypedDict):
    """A dynamic group: a selector saved under a name."""

    name: str
    where: str
    devices: int
    created_by: str
    created_ms: int
    members: list[str]  # the first 100


class TokenInfo(TypedDict):
    name: str
    role: str


class ModelVersion(TypedDict):
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


class PushResult(TypedDict):
    model: ModelVersion
    added: bool


class AuditEntry(TypedDict):
    ts_ms: int
    actor: str
    action: str
    target: str
    outcome: str
    detail: dict[str, Any]
    id: int | None


class Gates(TypedDict):
    max_failures_pct: float
    min_success_pct: float
    max_p95_ratio: float | None
    max_error_rate_pct: float | None
    min_agreement_pct: float | None
    min_samples: int


class RolloutSpec(TypedDict):
    model: BundleRef
    url: str
    size: int
    selectors: list[str]
    waves: list[str]
    rate_per_min: float | None
    exponential: float
    device_timeout_s: float
    soak_s: float
    gates: Gates
    start_at_ms: int | None
    windows: list[str]


class RolloutSummary(TypedDict):
    id: str
    spec: RolloutSpec
    state: str
    wave: int
    waves: int
    wave_started_ms: int
    started_in_wave: int
    reason: str
    created_ms: int
    updated_ms: int
    created_by: str
    counts: dict[str, int]
    total: int
    waiting_until_ms: int | None


class RolloutDevice(TypedDict):
    device: str
    wave: int
    state: str
    since_ms: int
    targeted_ms: int
    sent_ms: int
    reason: str
    previous: BundleRef | None


class Rollout(RolloutSummary):
    devices: list[RolloutDevice]


class GateOptions(TypedDict, total=False):
    max_failures_pct: float
    min_success_pct: float
    max_p95_ratio: float
    max_error_rate_pct: float
    min_agreement_pct: float
    min_samples: int


class _Selectors(TypedDict):
    selectors: list[str]


class RolloutOptions(_Selectors, total=False):
    """A rollout's options (docs/fleet.md): to which devices, and how."""

    waves: list[str]
    rate_per_min: float | None
    exponential: float
    device_timeout_s: float
    soak_s: float
    gates: GateOptions
    start_at: str  # ISO 8601 with a zone (docs/fleet.md, "When rollouts run")
    windows: list[str]  # maintenance windows, e.g. "Mon-Fri 22:00-04:00 Europe/Berlin"


class RolloutRequest(RolloutOptions):
    model: str


class _GroupRequest(TypedDict):
    devices: list[str]


class GroupRequest(_GroupRequest, total=False):
    group: str | None  # None or left out: out of their group


class TagsRequest(TypedDict, total=False):
    add: list[str]
    remove: list[str]


class DriftPolicy(TypedDict):
    psi: float
    min_samples: int
    clear_after: int


class DriftPolicies(TypedDict):
    default: DriftPolicy
    models: dict[str, DriftPolicy]


class Alert(TypedDict):
    device: str
    model: str
    feature: str
    psi: float
    threshold: float
    samples: int
    since_ms: int
    last_ms: int


class DriftRow(TypedDict):
    model: str
    feature: str
    devices: int
    firing: int
    psi_max: float
    psi_mean: float


class Alerts(TypedDict):
    alerts: list[Alert]
    summary: list[DriftRow]


class KeyEntry(TypedDict):
    key_id: str
    name: str


class _KeyringSummary(TypedDict):
    serial: int
    issued: str
    signed_by: list[str]
    keys: list[KeyEntry]


class Keyring(_KeyringSummary):
    document: dict[str, Any]


class KeyringPublished(_KeyringSummary):
    changed: bool
    stranded: list[str]
    published: bool
