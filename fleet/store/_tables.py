"""The store's schema and the mapping between rows and the domain's plain dicts.

Both backends run the same SQL text. The DDL has three dialect slots, filled from
:class:`edgefleet.fleet.store.base.Dialect`: ``{id_pk}`` (an auto-numbered primary key),
``{key_text}`` (text that sorts by code point on both backends, whatever the server's
locale) and ``{blob}`` (bytes); the queries have two, a row lock for read-modify-write
and the database's clock in milliseconds (leases). Structured values the code only needs
back whole (spec, manifest, tags, runtimes, refs, audit detail) are JSON text; what is
queried gets a real column.

Schema 2 (scale-out, docs/scale-out.md) added ``leases``, ``requests`` (operator actions
relayed to the leader), ``telemetry_shares``, ``bundles`` (bundle bytes, so every
controller can serve every bundle) and ``devices.labels_seq`` (which devices' group or
tags changed since a controller last looked); :data:`MIGRATIONS` brings a version 1
store there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AUDIT", "DEVICES", "LEASES", "MIGRATIONS", "MODELS", "REQUESTS", "ROLLOUTS",
           "ROLLOUT_DEVICES", "SCHEMA_VERSION", "TABLES_DDL", "Table", "marks"]

SCHEMA_VERSION = 2

TABLES_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key {key_text} PRIMARY KEY, value BIGINT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS devices (
        id {key_text} PRIMARY KEY, fleet TEXT NOT NULL, online BOOLEAN NOT NULL,
        group_name {key_text}, tags TEXT NOT NULL, profile TEXT, runtimes TEXT NOT NULL,
        agent_version TEXT, active TEXT, previous TEXT, update_state TEXT NOT NULL,
        update_target TEXT, update_detail TEXT NOT NULL, update_since_ms BIGINT NOT NULL,
        first_seen_ms BIGINT NOT NULL, last_seen_ms BIGINT NOT NULL,
        labels_seq BIGINT NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS devices_group ON devices (group_name)",
    "CREATE INDEX IF NOT EXISTS devices_labels ON devices (labels_seq)",
    """CREATE TABLE IF NOT EXISTS models (
        name {key_text} NOT NULL, version {key_text} NOT NULL, sha256 TEXT NOT NULL,
        size BIGINT NOT NULL, format TEXT NOT NULL, runtime TEXT NOT NULL,
        min_runtime_version TEXT NOT NULL, manifest TEXT NOT NULL, path TEXT NOT NULL,
        pushed_ms BIGINT NOT NULL, pushed_by TEXT NOT NULL, PRIMARY KEY (name, version))""",
    "CREATE INDEX IF NOT EXISTS models_sha256 ON models (sha256)",
    """CREATE TABLE IF NOT EXISTS rollouts (
        id {key_text} PRIMARY KEY, seq BIGINT NOT NULL, spec TEXT NOT NULL,
        state TEXT NOT NULL, wave INTEGER NOT NULL, wave_started_ms BIGINT NOT NULL,
        started_in_wave INTEGER NOT NULL, reason TEXT NOT NULL, created_ms BIGINT NOT NULL,
        updated_ms BIGINT NOT NULL, created_by TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS rollouts_state ON rollouts (state)",
    """CREATE TABLE IF NOT EXISTS rollout_devices (
        rollout_id {key_text} NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
        device {key_text} NOT NULL, wave INTEGER NOT NULL, state TEXT NOT NULL,
        since_ms BIGINT NOT NULL, targeted_ms BIGINT NOT NULL, sent_ms BIGINT NOT NULL,
        reason TEXT NOT NULL,
        previous TEXT, PRIMARY KEY (rollout_id, device))""",
    """CREATE TABLE IF NOT EXISTS audit (
        id {id_pk}, ts_ms BIGINT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
        target TEXT NOT NULL, outcome TEXT NOT NULL, detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_target ON audit (target, id)",
    """CREATE TABLE IF NOT EXISTS leases (
        name {key_text} PRIMARY KEY, holder TEXT NOT NULL, nonce TEXT NOT NULL,
        generation BIGINT NOT NULL, expires_ms BIGINT NOT NULL, acquired_ms BIGINT NOT NULL,
        url TEXT NOT NULL, wanted TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS requests (
        id {id_pk}, kind TEXT NOT NULL, body TEXT NOT NULL, actor TEXT NOT NULL,
        state TEXT NOT NULL, result TEXT, created_ms BIGINT NOT NULL,
        taken_by TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS requests_state ON requests (state, id)",
    """CREATE TABLE IF NOT EXISTS telemetry_shares (
        stream {key_text} NOT NULL, seq BIGINT NOT NULL, written_ms BIGINT NOT NULL,
        body TEXT NOT NULL, PRIMARY KEY (stream, seq))""",
    "CREATE INDEX IF NOT EXISTS telemetry_shares_written ON telemetry_shares (written_ms)",
    """CREATE TABLE IF NOT EXISTS bundles (
        sha256 {key_text} PRIMARY KEY, size BIGINT NOT NULL, data {blob} NOT NULL)""",
    # small fleet-wide settings shared by every controller (e.g. drift:MODEL), JSON values
    """CREATE TABLE IF NOT EXISTS settings (
        key {key_text} PRIMARY KEY, value TEXT NOT NULL, updated_ms BIGINT NOT NULL)""",
    # labels operators give devices (fleet devices label), read by selectors (label:K=V);
    # new tables need no schema version: a store of this version gains them at start
    """CREATE TABLE IF NOT EXISTS device_labels (
        device {key_text} NOT NULL, key {key_text} NOT NULL, value TEXT NOT NULL,
        PRIMARY KEY (device, key))""",
    # saved selectors: dynamic groups (fleet groups create NAME --where SELECTOR)
    """CREATE TABLE IF NOT EXISTS saved_selectors (
        name {key_text} PRIMARY KEY, selector TEXT NOT NULL, created_ms BIGINT NOT NULL,
        created_by TEXT NOT NULL)""",
)

# schema version -> the statements that bring a store of that version to the next one
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE devices ADD COLUMN labels_seq BIGINT NOT NULL DEFAULT 0",),
}


def marks(count: int) -> str:
    """``?, ?, ?`` for an ``IN (...)`` list or a ``VALUES`` row."""
    return ", ".join("?" * count)


_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))  # one encoder, not one a row


def _dumps(value: Any) -> str | None:
    return None if value is None else _JSON.encode(value)


def _loads(value: Any) -> Any:
    return None if value is None else json.loads(value)


@dataclass(frozen=True)
class Table:
    """A table whose rows are the ``as_dict`` of a domain object (or part of it).

    ``renamed`` maps a column to its dict key where they differ; ``computed`` holds
    insert-only columns given as SQL expressions (never overwritten by an upsert);
    ``kept`` columns are written by an insert but never overwritten by an upsert.
    """

    name: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    json: frozenset[str] = frozenset()
    renamed: Mapping[str, str] = field(default_factory=dict)
    computed: Mapping[str, str] = field(default_factory=dict)
    kept: frozenset[str] = frozenset()

    def row(self, data: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(_dumps(data[self._field(c)]) if c in self.json else data[self._field(c)]
                     for c in self.columns)

    def value(self, column: str, data: Mapping[str, Any]) -> Any:
        """One column's stored value of ``data`` (JSON text for a JSON column)."""
        value = data[self._field(column)]
        return _dumps(value) if column in self.json else value

    def record(self, row: Sequence[Any]) -> dict[str, Any]:
        return {self._field(c): _loads(v) if c in self.json else v
                for c, v in zip(self.columns, row, strict=True)}

    def select(self, alias: str = "") -> str:
        prefix = f"{alias}." if alias else ""
        return ", ".join(prefix + c for c in self.columns)

    def insert(self) -> str:
        names = ", ".join((*self.columns, *self.computed))
        values = ", ".join((*("?" * len(self.columns)), *self.computed.values()))
        return f"INSERT INTO {self.name} ({names}) VALUES ({values})"

    def upsert(self) -> str:
        updates = ", ".join(f"{c} = excluded.{c}" for c in self.columns
                            if c not in self.key and c not in self.kept)
        return f"{self.insert()} ON CONFLICT ({', '.join(self.key)}) DO UPDATE SET {updates}"

    def insert_new(self) -> str:
        return f"{self.insert()} ON CONFLICT ({', '.join(self.key)}) DO NOTHING"

    def _field(self, column: str) -> str:
        return self.renamed.get(column, column)


DEVICES = Table(
    "devices",
    ("id", "fleet", "online", "group_name", "tags", "profile", "runtimes", "agent_version",
     "active", "previous", "update_state", "update_target", "update_detail", "update_since_ms",
     "first_seen_ms", "last_seen_ms"),
    key=("id",), json=frozenset({"tags", "runtimes", "active", "previous"}),
    renamed={"group_name": "group"},
    # group and tags belong to operators (set_group, set_tags): a device's own report,
    # written by whichever controller saw it, never overwrites them
    kept=frozenset({"group_name", "tags"}))

MODELS = Table(
    "models",
    ("name", "version", "sha256", "size", "format", "runtime", "min_runtime_version",
     "manifest", "path", "pushed_ms", "pushed_by"),
    key=("name", "version"), json=frozenset({"manifest"}))

# ``seq`` orders rollouts created in the same millisecond: set once, on the first save.
ROLLOUTS = Table(
    "rollouts",
    ("id", "spec", "state", "wave", "wave_started_ms", "started_in_wave", "reason",
     "created_ms", "updated_ms", "created_by"),
    key=("id",), json=frozenset({"spec"}),
    computed={"seq": "(SELECT COALESCE(MAX(seq), 0) + 1 FROM rollouts)"})

ROLLOUT_DEVICES = Table(
    "rollout_devices",
    ("rollout_id", "device", "wave", "state", "since_ms", "targeted_ms", "sent_ms", "reason",
     "previous"),
    key=("rollout_id", "device"), json=frozenset({"previous"}))

# ``id`` is assigned by the database (``INSERT ... RETURNING id``), so it is not a column here.
AUDIT = Table(
    "audit", ("ts_ms", "actor", "action", "target", "outcome", "detail"),
    key=("id",), json=frozenset({"detail"}))

LEASES = Table(
    "leases", ("name", "holder", "nonce", "generation", "expires_ms", "acquired_ms", "url",
               "wanted"), key=("name",))

REQUESTS = Table(
    "requests", ("kind", "body", "actor", "state", "result", "created_ms", "taken_by"),
    key=("id",), json=frozenset({"body", "result"}))
