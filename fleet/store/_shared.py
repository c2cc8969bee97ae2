"""What scaled-out controllers share through the store besides devices and rollouts.

- the leadership lease (:mod:`edgefleet.fleet.lease`): one compare-and-swap transaction a tick,
  times in the database's clock; :func:`check_fence` makes a rollout save (or a request
  take) conditional on the lease being still the writer's;
- operator requests a follower relays to the leader (:mod:`edgefleet.fleet.relay`);
- telemetry shares: one row per controller and tick, a JSON batch of the per-device
  windows the leader's quality gates asked for (:mod:`edgefleet.fleet.telemetry`), read by the
  leader by (stream, seq) and pruned to the quality window;
- bundle bytes, so a controller serves a bundle another one was pushed;
- ``labels_seq``: which devices' group or tags changed since a controller last looked.

Each method is one transaction, like the rest of :class:`edgefleet.fleet.store.base.SqlStore`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from edgefleet.fleet.lease import Fence, Lease, LeaseLostError
from edgefleet.fleet.relay import DONE, FAILED, QUEUED, TAKEN, WITHDRAWN, OperatorRequest
from edgefleet.fleet.store._tables import LEASES, REQUESTS, marks
from edgefleet.fleet.store.backend import Backend, Tx

__all__ = ["SharedState", "check_fence", "next_labels_seq"]

_LEASE_COLUMNS = LEASES.select()
_REQUEST_COLUMNS = f"id, {REQUESTS.select()}"


def check_fence(tx: Tx, fence: Fence) -> None:
    """Lock the lease row; raise unless it is still held by ``fence``'s process and term."""
    row = tx.one(f"SELECT holder, nonce, generation FROM leases WHERE name = ?"
                 f"{tx.dialect.for_update}", (fence.name,))
    if row is None or (row[1], int(row[2])) != (fence.nonce, fence.generation):
        holder = f"controller {row[0]}" if row is not None and row[0] else "nobody"
        raise LeaseLostError(f"refused a write of a stale leader (lease generation "
                             f"{fence.generation}): the lease is now held by {holder}",
                             hint="this controller lost the lease; the current leader "
                                  "carries on, nothing was written")


def next_labels_seq(tx: Tx) -> int:
    row = tx.one("UPDATE meta SET value = value + 1 WHERE key = ? RETURNING value",
                 ("labels_seq",))
    assert row is not None  # create_schema inserts it
    return int(row[0])


class SharedState:
    """Mixed into :class:`edgefleet.fleet.store.base.SqlStore` (which sets ``_db``)."""

    _db: Backend

    # -- the lease -----------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, nonce: str, ttl_ms: int, url: str = "",
                      wanted: str = "") -> Lease:
        """Renew (same ``nonce``, not expired), take (expired or never held: generation + 1)
        or leave the lease; return the row as it is afterwards."""
        with self._db.transaction() as tx:
            tx.run(f"{LEASES.insert_new()}", (name, "", "", 0, 0, 0, "", ""))
            lease = self._lease(tx, name, lock=True)
            assert lease is not None  # inserted above if missing
            if lease.nonce == nonce and not lease.expired:
                tx.run("UPDATE leases SET expires_ms = ?, url = ?, wanted = ? WHERE name = ?",
                       (lease.now_ms + ttl_ms, url, wanted, name))
                return replace(lease, expires_ms=lease.now_ms + ttl_ms, url=url, wanted=wanted)
            if not lease.expired:
                return lease
            taken = replace(lease, holder=holder, nonce=nonce, generation=lease.generation + 1,
                          expires_ms=lease.now_ms + ttl_ms, acquired_ms=lease.now_ms,
                          url=url, wanted=wanted)
            tx.run(f"UPDATE leases SET {', '.join(f'{c} = ?' for c in LEASES.columns[1:])} "
                   "WHERE name = ?", (*_row(taken)[1:], name))
            return taken

    def release_lease(self, name: str, nonce: str) -> None:
        with self._db.transaction() as tx:
            tx.run("UPDATE leases SET expires_ms = 0, wanted = '' WHERE name = ? AND nonce = ?",
                   (name, nonce))

    def lease(self, name: str) -> Lease | None:
        with self._db.transaction(write=False) as tx:
            return self._lease(tx, name)

    @staticmethod
    def _lease(tx: Tx, name: str, lock: bool = False) -> Lease | None:
        row = tx.one(f"SELECT {_LEASE_COLUMNS}, {tx.dialect.now_ms} FROM leases "
                     f"WHERE name = ?{tx.dialect.for_update if lock else ''}", (name,))
        if row is None:
            return None
        record = LEASES.record(row[:-1])
        return Lease(**{**record, "generation": int(record["generation"]),
                        "expires_ms": int(record["expires_ms"]),
                        "acquired_ms": int(record["acquired_ms"])}, now_ms=int(row[-1]))

    # -- operator requests relayed to the leader -----------------------------------------

    def submit_request(self, kind: str, body: dict[str, Any], actor: str, now_ms: int) -> int:
        with self._db.transaction() as tx:
            row = tx.one(f"{REQUESTS.insert()} RETURNING id", REQUESTS.row(
                {"kind": kind, "body": body, "actor": actor, "state": QUEUED, "result": None,
                 "created_ms": now_ms, "taken_by": ""}))
        assert row is not None
        return int(row[0])

    def request(self, request_id: int) -> OperatorRequest | None:
        with self._db.transaction(write=False) as tx:
            row = tx.one(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE id = ?",
                         (request_id,))
        return None if row is None else _request(row)

    def withdraw_request(self, request_id: int) -> bool:
        """Withdraw a request nobody took yet; False: a leader has it (or had it)."""
        with self._db.transaction() as tx:
            return tx.run("UPDATE requests SET state = ? WHERE id = ? AND state = ?",
                          (WITHDRAWN, request_id, QUEUED)) == 1

    def take_requests(self, fence: Fence, taker: str) -> list[OperatorRequest]:
        """Every queued request, oldest first, marked taken by ``taker`` (fenced)."""
        with self._db.transaction(write=False) as tx:  # the usual answer, without a commit
            if tx.one("SELECT 1 FROM requests WHERE state = ? LIMIT 1", (QUEUED,)) is None:
                return []
        with self._db.transaction() as tx:
            check_fence(tx, fence)
            rows = tx.rows(f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE state = ? "
                           f"ORDER BY id", (QUEUED,))
            ids = [int(row[0]) for row in rows]
            if ids:
                tx.run(f"UPDATE requests SET state = ?, taken_by = ? WHERE id IN "
                       f"({marks(len(ids))})", (TAKEN, taker, *ids))
        return [_request(row) for row in rows]

    def finish_request(self, request_id: int, ok: bool, result: Any) -> None:
        with self._db.transaction() as tx:
            tx.run("UPDATE requests SET state = ?, result = ? WHERE id = ?",
                   (DONE if ok else FAILED, json.dumps(result), request_id))

    # -- telemetry shares ----------------------------------------------------------------

    def share_telemetry(self, stream: str, seq: int, body: str) -> None:
        with self._db.transaction() as tx:
            tx.run("INSERT INTO telemetry_shares (stream, seq, written_ms, body) "
                   f"VALUES (?, ?, {tx.dialect.now_ms}, ?)", (stream, seq, body))

    def shared_telemetry(self, exclude: str,
                         after: Mapping[str, int]) -> list[tuple[str, int, str]]:
        """Every share of another stream than ``exclude`` newer than ``after[stream]``.

        One controller writes a stream in order, one transaction at a time, so its seq
        commit in order: a reader that saw seq N of a stream has seen everything before.
        """
        skip = "".join(" AND NOT (stream = ? AND seq <= ?)" for _ in after)
        params: list[Any] = [exclude]
        for stream, seq in after.items():
            params += [stream, seq]
        with self._db.transaction(write=False) as tx:
            rows = tx.rows(f"SELECT stream, seq, body FROM telemetry_shares WHERE stream <> ?"
                           f"{skip} ORDER BY stream, seq", params)
        return [(str(stream), int(seq), str(body)) for stream, seq, body in rows]

    def prune_shared(self, telemetry_ms: int, requests_ms: int) -> None:
        """Drop telemetry shares older than ``telemetry_ms`` and settled requests older than
        ``requests_ms`` (both back from the database's clock)."""
        with self._db.transaction() as tx:
            now = tx.dialect.now_ms
            tx.run(f"DELETE FROM telemetry_shares WHERE written_ms < {now} - ?",
                   (telemetry_ms,))
            tx.run(f"DELETE FROM requests WHERE state IN (?, ?, ?) AND created_ms < {now} - ?",
                   (DONE, FAILED, WITHDRAWN, requests_ms))

    # -- bundle bytes --------------------------------------------------------------------

    def put_setting(self, key: str, value: Any, now_ms: int) -> None:
        """Set (or with ``None`` delete) one fleet-wide setting, a JSON value."""
        with self._db.transaction() as tx:
            if value is None:
                tx.run("DELETE FROM settings WHERE key = ?", (key,))
            else:
                tx.run("INSERT INTO settings (key, value, updated_ms) VALUES (?, ?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                       "updated_ms = excluded.updated_ms", (key, json.dumps(value), now_ms))

    def settings(self, prefix: str = "") -> dict[str, Any]:
        """Every setting whose key starts with ``prefix``."""
        with self._db.transaction(write=False) as tx:
            rows = tx.rows("SELECT key, value FROM settings WHERE key >= ? ORDER BY key",
                           (prefix,))
        return {key: json.loads(value) for key, value in rows if key.startswith(prefix)}

    def put_bundle(self, sha256: str, data: bytes) -> bool:
        """Keep a bundle's bytes (content-addressed: a second put is a no-op; False)."""
        with self._db.transaction() as tx:
            return tx.run("INSERT INTO bundles (sha256, size, data) VALUES (?, ?, ?) "
                          "ON CONFLICT (sha256) DO NOTHING", (sha256, len(data), data)) == 1

    def bundle_data(self, sha256: str) -> bytes | None:
        with self._db.transaction(write=False) as tx:
            row = tx.one("SELECT data FROM bundles WHERE sha256 = ?", (sha256,))
        return None if row is None else bytes(row[0])

    def bundle_shas(self) -> set[str]:
        with self._db.transaction(write=False) as tx:
            return {str(row[0]) for row in tx.rows("SELECT sha256 FROM bundles")}

    # -- operator labels -----------------------------------------------------------------

    def labels_since(self, seq: int) -> tuple[int, list[tuple[str, str | None,
                                                               frozenset[str]]]]:
        """The label sequence now, and (id, group, tags) of devices relabelled after ``seq``."""
        with self._db.transaction(write=False) as tx:
            row = tx.one("SELECT value FROM meta WHERE key = ?", ("labels_seq",))
            current = int(row[0]) if row else 0
            if current <= seq:
                return current, []
            rows = tx.rows("SELECT id, group_name, tags FROM devices WHERE labels_seq > ?",
                           (seq,))
        return current, [(str(i), group, frozenset(json.loads(tags))) for i, group, tags in rows]


def _row(lease: Lease) -> tuple[Any, ...]:
    return LEASES.row(lease.__dict__)


def _request(row: tuple[Any, ...]) -> OperatorRequest:
    record = REQUESTS.record(row[1:])
    return OperatorRequest(id=int(row[0]), kind=str(record["kind"]), body=record["body"],
                           actor=str(record["actor"]), state=str(record["state"]),
                           result=record["result"], created_ms=int(record["created_ms"]),
                           taken_by=str(record["taken_by"]))
