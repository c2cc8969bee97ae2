"""The ``Store`` protocol and its one SQL implementation, shared by SQLite and PostgreSQL.

A backend (:class:`edgefleet.fleet.store.backend.Backend`, one in
:mod:`edgefleet.fleet.store.sqlite` and one in :mod:`edgefleet.fleet.store.postgres`) only
connects, begins, commits, rolls back and translates its driver's exceptions; every
statement is written here once, with ``?`` placeholders (the PostgreSQL backend rewrites
them to ``%s``).
Each method is one transaction, serialised by the backend's lock, so a store can be
shared by the controller's threads.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import replace
from typing import Any, Protocol, TypeVar

from edgefleet.fleet.domain import AuditEntry, Device, ModelVersion
from edgefleet.fleet.errors import ConflictError, FleetError, NotFoundError, StoreError
from edgefleet.fleet.lease import Fence, Lease
from edgefleet.fleet.relay import OperatorRequest
from edgefleet.fleet.rollout.state import Rollout, RolloutState
from edgefleet.fleet.store._shared import SharedState, check_fence, next_labels_seq
from edgefleet.fleet.store._tables import (
    AUDIT,
    DEVICES,
    MIGRATIONS,
    MODELS,
    ROLLOUT_DEVICES,
    ROLLOUTS,
    SCHEMA_VERSION,
    TABLES_DDL,
    marks,
)
from edgefleet.fleet.store.backend import Backend, Tx
from edgefleet.fleet.store.labels import LabelState, SavedSelector, with_labels

__all__ = ["SqlStore", "Store"]

_IN_CHUNK = 500  # ids per ``IN (...)`` list, well under every driver's parameter limit
_T = TypeVar("_T")
log = logging.getLogger(__name__)


class Store(Protocol):
    """What the fleet controller keeps: devices, model versions, rollouts and history."""

    def upsert_devices(self, devices: Sequence[Device]) -> None: ...
    def insert_devices(self, devices: Sequence[Device]) -> None: ...
    def device(self, device_id: str) -> Device | None: ...
    def devices(self) -> list[Device]: ...
    def set_group(self, device_ids: Sequence[str], group: str | None) -> None: ...
    def set_tags(self, device_id: str, add: Iterable[str] = (),
                 remove: Iterable[str] = ()) -> Device: ...
    def delete_devices(self, device_ids: Sequence[str]) -> list[str]: ...
    def add_model(self, model: ModelVersion) -> bool: ...
    def model(self, name: str, version: str) -> ModelVersion | None: ...
    def model_by_sha(self, sha256: str) -> ModelVersion | None: ...
    def models(self, name: str | None = None) -> list[ModelVersion]: ...
    def new_rollout_id(self) -> str: ...
    def save_rollout(self, rollout: Rollout, changed: Iterable[str] | None = None,
                     fence: Fence | None = None) -> None: ...
    def rollout(self, rollout_id: str) -> Rollout | None: ...
    def rollouts(self, states: Iterable[RolloutState] | None = None) -> list[Rollout]: ...
    def add_audit(self, entry: AuditEntry) -> AuditEntry: ...
    def history(self, limit: int = 100, target: str | None = None,
                action: str | None = None) -> list[AuditEntry]: ...
    def close(self) -> None: ...
    # shared by scaled-out controllers (fleet.store._shared, docs/scale-out.md)
    def acquire_lease(self, name: str, holder: str, nonce: str, ttl_ms: int, url: str = "",
                      wanted: str = "") -> Lease: ...
    def release_lease(self, name: str, nonce: str) -> None: ...
    def lease(self, name: str) -> Lease | None: ...
    def submit_request(self, kind: str, body: dict[str, Any], actor: str,
                       now_ms: int) -> int: ...
    def request(self, request_id: int) -> OperatorRequest | None: ...
    def withdraw_request(self, request_id: int) -> bool: ...
    def take_requests(self, fence: Fence, taker: str) -> list[OperatorRequest]: ...
    def finish_request(self, request_id: int, ok: bool, result: Any) -> None: ...
    def share_telemetry(self, stream: str, seq: int, body: str) -> None: ...
    def shared_telemetry(self, exclude: str,
                         after: Mapping[str, int]) -> list[tuple[str, int, str]]: ...
    def prune_shared(self, telemetry_ms: int, requests_ms: int) -> None: ...
    def put_setting(self, key: str, value: Any, now_ms: int) -> None: ...
    def settings(self, prefix: str = "") -> dict[str, Any]: ...
    def put_bundle(self, sha256: str, data: bytes) -> bool: ...
    def bundle_data(self, sha256: str) -> bytes | None: ...
    def bundle_shas(self) -> set[str]: ...
    def labels_since(self, seq: int) -> tuple[int, list[tuple[str, str | None,
                                                              frozenset[str]]]]: ...
    # operator labels and saved selectors (fleet.store.labels)
    def set_labels(self, device_id: str, put: Mapping[str, str],
                   remove: Iterable[str] = ()) -> Device: ...
    def labels_of(self, device_ids: Sequence[str]) -> dict[str, dict[str, str]]: ...
    def save_selector(self, name: str, selector: str, actor: str, now_ms: int) -> None: ...
    def saved_selectors(self) -> list[SavedSelector]: ...
    def delete_selector(self, name: str) -> bool: ...


def create_schema(tx: Tx) -> None:
    """Create what is missing (idempotent), migrate an older schema, refuse a newer one.

    The schema version row is locked first, so controllers starting together on one
    PostgreSQL migrate once.
    """
    def run(statement: str) -> None:
        tx.run(statement.format(id_pk=tx.dialect.id_pk, key_text=tx.dialect.key_text,
                                blob=tx.dialect.blob))

    run(TABLES_DDL[0])  # meta: a new store starts at the current version
    for key, value in (("schema_version", SCHEMA_VERSION), ("rollout_seq", 0),
                       ("labels_seq", 0)):
        tx.run("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
               (key, value))
    row = tx.one(f"SELECT value FROM meta WHERE key = ?{tx.dialect.for_update}",
                 ("schema_version",))
    found = int(row[0]) if row else 0
    if not 1 <= found <= SCHEMA_VERSION:
        newer = found > SCHEMA_VERSION
        raise StoreError(f"the store has schema version {found}; this edgefleet reads only "
                         f"version {SCHEMA_VERSION}", transient=False,
                         hint="upgrade edgefleet" if newer else "the meta table was altered "
                              "by hand; restore it from a backup")
    for version in range(found, SCHEMA_VERSION):
        for statement in MIGRATIONS[version]:
            run(statement)
    if found != SCHEMA_VERSION:
        tx.run("UPDATE meta SET value = ? WHERE key = ?", (SCHEMA_VERSION, "schema_version"))
    for statement in TABLES_DDL[1:]:
        run(statement)


class SqlStore(SharedState, LabelState):
    """:class:`Store` over any :class:`Backend`."""

    def __init__(self, backend: Backend) -> None:
        self._db = backend
        try:
            with backend.transaction() as tx:
                create_schema(tx)
        except BaseException:
            with suppress(StoreError):
                backend.close()
            raise

    def close(self) -> None:
        self._db.close()

    # -- devices -----------------------------------------------------------------------

    # Rows a transaction writes are written in key order, and a label change takes the
    # labels_seq row before any device row, so two controllers writing overlapping devices
    # lock them in one order and cannot deadlock each other.

    def upsert_devices(self, devices: Sequence[Device]) -> None:
        rows = [DEVICES.row(device.as_dict()) for device in _by_id(devices)]
        with self._db.transaction() as tx:
            tx.many(DEVICES.upsert(), rows)

    def insert_devices(self, devices: Sequence[Device]) -> None:
        """Write the devices the store does not know yet; leave the others as they are."""
        rows = [DEVICES.row(device.as_dict()) for device in _by_id(devices)]
        with self._db.transaction() as tx:
            tx.many(DEVICES.insert_new(), rows)

    def device(self, device_id: str) -> Device | None:
        with self._db.transaction(write=False) as tx:
            row = tx.one(f"SELECT {DEVICES.select()} FROM devices WHERE id = ?", (device_id,))
            found = None if row is None else Device.from_dict(DEVICES.record(row))
            return None if found is None else with_labels(tx, [found])[0]

    def devices(self) -> list[Device]:
        with self._db.transaction(write=False) as tx:
            rows = tx.rows(f"SELECT {DEVICES.select()} FROM devices ORDER BY id")
            return with_labels(tx, [Device.from_dict(DEVICES.record(row)) for row in rows])

    def set_group(self, device_ids: Sequence[str], group: str | None) -> None:
        ids = sorted(set(device_ids))
        with self._db.transaction() as tx:
            missing = sorted(set(ids) - _known_devices(tx, ids))
            if missing:
                raise NotFoundError(f"no device {_listed(missing)}",
                                    hint="nothing was changed; check the ids against the "
                                         "device list")
            seq = next_labels_seq(tx)
            tx.many("UPDATE devices SET group_name = ?, labels_seq = ? WHERE id = ?",
                    [(group, seq, i) for i in ids])

    def set_tags(self, device_id: str, add: Iterable[str] = (),
                 remove: Iterable[str] = ()) -> Device:
        """Add, then remove (a tag in both ends up removed)."""
        added, removed = frozenset(add), frozenset(remove)
        with self._db.transaction() as tx:
            seq = next_labels_seq(tx)  # the sequence row first, then devices, as set_group
            row = tx.one(f"SELECT {DEVICES.select()} FROM devices WHERE id = ?"
                         f"{tx.dialect.for_update}", (device_id,))
            if row is None:
                raise NotFoundError(f"no device {device_id!r}",
                                    hint="check the id against the device list")
            device = Device.from_dict(DEVICES.record(row))
            device = device.with_changes(tags=(device.tags | added) - removed)
            tx.run("UPDATE devices SET tags = ?, labels_seq = ? WHERE id = ?",
                   (DEVICES.value("tags", device.as_dict()), seq, device_id))
        return device

    def delete_devices(self, device_ids: Sequence[str]) -> list[str]:
        """Forget devices (a decommission): their rows go, group and tags with them; the
        ids that were stored come back, sorted. Rollouts keep what they did to them."""
        ids = sorted(set(device_ids))
        with self._db.transaction() as tx:
            known = sorted(_known_devices(tx, ids))
            for start in range(0, len(known), _IN_CHUNK):
                chunk = known[start:start + _IN_CHUNK]
                tx.run(f"DELETE FROM devices WHERE id IN ({marks(len(chunk))})", chunk)
        return known

    # -- model versions ------------------------------------------------------------------

    def add_model(self, model: ModelVersion) -> bool:
        with self._db.transaction() as tx:
            if tx.run(MODELS.insert_new(), MODELS.row(model.as_dict())) == 1:
                return True
            row = tx.one("SELECT sha256 FROM models WHERE name = ? AND version = ?",
                         (model.name, model.version))
        stored = str(row[0]) if row else ""
        if stored == model.sha256:
            return False
        raise ConflictError(f"{model.key} is already stored with sha256 {stored[:12]}…; "
                            f"this bundle's sha256 is {model.sha256[:12]}…",
                            hint="other bytes need another version: bump the version and "
                                 "package again")

    def model(self, name: str, version: str) -> ModelVersion | None:
        return _first(self._models("WHERE name = ? AND version = ?", (name, version)))

    def model_by_sha(self, sha256: str) -> ModelVersion | None:
        return _first(self._models("WHERE sha256 = ?", (sha256,)))

    def models(self, name: str | None = None) -> list[ModelVersion]:
        return self._models("" if name is None else "WHERE name = ?",
                            () if name is None else (name,))

    def _models(self, where: str, params: Sequence[Any]) -> list[ModelVersion]:
        with self._db.transaction(write=False) as tx:
            rows = tx.rows(f"SELECT {MODELS.select()} FROM models {where} "
                           "ORDER BY name, pushed_ms, version", params)
        return [ModelVersion.from_dict(MODELS.record(row)) for row in rows]

    # -- rollouts ------------------------------------------------------------------------

    def new_rollout_id(self) -> str:
        with self._db.transaction() as tx:
            row = tx.one("UPDATE meta SET value = value + 1 WHERE key = ? RETURNING value",
                         ("rollout_seq",))
        if row is None:
            raise StoreError("the store has no rollout counter", transient=False,
                             hint="the meta table was altered by hand; restore it")
        return f"r{row[0]}"

    def save_rollout(self, rollout: Rollout, changed: Iterable[str] | None = None,
                     fence: Fence | None = None) -> None:
        """Upsert the header and the device rows named in ``changed`` (all when None).

        With ``fence``, only while the lease is still that one (same holder process and
        generation), checked and locked in the same transaction; otherwise nothing is
        written and :class:`edgefleet.fleet.lease.LeaseLostError` is raised.
        """
        ids = sorted(rollout.devices if changed is None else set(changed))
        unknown = [i for i in ids if i not in rollout.devices]
        if unknown:
            raise NotFoundError(f"rollout {rollout.id} has no device {_listed(unknown)}",
                                hint="nothing was saved; pass ids of the rollout's devices")
        rows = [ROLLOUT_DEVICES.row({"rollout_id": rollout.id, **rollout.devices[i].as_dict()})
                for i in ids]
        with self._db.transaction() as tx:
            if fence is not None:
                check_fence(tx, fence)
            tx.run(ROLLOUTS.upsert(), ROLLOUTS.row(rollout.summary()))
            tx.many(ROLLOUT_DEVICES.upsert(), rows)

    def rollout(self, rollout_id: str) -> Rollout | None:
        return _first(self._rollouts("WHERE r.id = ?", (rollout_id,)))

    def rollouts(self, states: Iterable[RolloutState] | None = None) -> list[Rollout]:
        """Newest first (by ``created_ms``, then by first save)."""
        if states is None:
            return self._rollouts("", ())
        wanted = sorted({RolloutState(state).value for state in states})
        return self._rollouts(f"WHERE r.state IN ({marks(len(wanted))})", wanted) if wanted else []

    def _rollouts(self, where: str, params: Sequence[Any]) -> list[Rollout]:
        with self._db.transaction(write=False) as tx:
            headers = tx.rows(f"SELECT {ROLLOUTS.select('r')} FROM rollouts r {where} "
                              "ORDER BY r.created_ms DESC, r.seq DESC", params)
            items = tx.rows(f"SELECT {ROLLOUT_DEVICES.select('d')} FROM rollout_devices d "
                            f"JOIN rollouts r ON r.id = d.rollout_id {where} "
                            "ORDER BY d.wave, d.device", params)
        devices: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        for item in items:
            try:
                record = ROLLOUT_DEVICES.record(item)
            except (TypeError, ValueError) as exc:  # a damaged row (its JSON): left out
                log.error("a device row of a stored rollout cannot be read, left out: %s",
                          str(exc)[:300])
                continue
            devices[record.pop("rollout_id")].append(record)
        loaded = (_rollout(header, devices) for header in headers)
        return [rollout for rollout in loaded if rollout is not None]

    # -- audit history -------------------------------------------------------------------

    def add_audit(self, entry: AuditEntry) -> AuditEntry:
        with self._db.transaction() as tx:
            row = tx.one(f"{AUDIT.insert()} RETURNING id", AUDIT.row(entry.as_dict()))
        assert row is not None  # INSERT ... RETURNING returns the row it inserted
        return replace(entry, id=int(row[0]))

    def history(self, limit: int = 100, target: str | None = None,
                action: str | None = None) -> list[AuditEntry]:
        """Newest first; ``target`` and ``action`` (``api.refused``) match exactly."""
        wanted = [(column, value) for column, value in (("target", target), ("action", action))
                  if value is not None]
        where = ("WHERE " + " AND ".join(f"{c} = ?" for c, _ in wanted)) if wanted else ""
        params = [value for _, value in wanted]
        with self._db.transaction(write=False) as tx:
            rows = tx.rows(f"SELECT id, {AUDIT.select()} FROM audit {where} "
                           "ORDER BY id DESC LIMIT ?", [*params, max(limit, 0)])
        return [AuditEntry.from_dict({"id": row[0], **AUDIT.record(row[1:])}) for row in rows]


def _known_devices(tx: Tx, ids: Sequence[str]) -> set[str]:
    known: set[str] = set()
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = ids[start:start + _IN_CHUNK]
        rows = tx.rows(f"SELECT id FROM devices WHERE id IN ({marks(len(chunk))})", chunk)
        known.update(str(row[0]) for row in rows)
    return known


def _rollout(row: Sequence[Any],
             devices: dict[str, list[dict[str, Any]]]) -> Rollout | None:
    """A stored rollout; one that cannot be read (an earlier edgefleet's, or damaged: its
    columns' JSON too) is logged and left out, never failing the list, /metrics or the
    controller's start (a selector that does not read back loads as unreadable, and its
    rollout is stopped)."""
    header: dict[str, Any] = {}
    try:
        header = ROLLOUTS.record(row)
        return Rollout.from_dict({**header, "devices": devices.get(header["id"], [])})
    except (FleetError, KeyError, TypeError, ValueError) as exc:
        log.error("rollout %s cannot be read, left out: %s: %s", str(header.get("id"))[:64],
                  type(exc).__name__, str(exc)[:300])
        return None


def _listed(ids: Sequence[str], shown: int = 5) -> str:
    text = ", ".join(repr(i) for i in ids[:shown])
    return text if len(ids) <= shown else f"{text} and {len(ids) - shown} more"


def _first(items: list[_T]) -> _T | None:
    return items[0] if items else None


def _by_id(devices: Sequence[Device]) -> list[Device]:
    """The devices in id order, one each (the last given wins)."""
    return sorted({d.id: d for d in devices}.values(), key=lambda d: d.id)
