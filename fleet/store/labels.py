"""Labels operators give devices, and saved selectors (dynamic groups), in the store.

Operator labels (``fleet devices label ID site=plant-a``) live in ``device_labels``, one
row a key; a change takes ``labels_seq`` like a group or tag change, so scaled-out
controllers pick it up (``labels_since`` names the device, :meth:`LabelState.labels_of`
reads its labels). Saved selectors live in ``saved_selectors`` as the text the operator
wrote (parsed again when read: the text is the contract, checked when it was saved).

Each method is one transaction, like the rest of :class:`edgefleet.fleet.store.base.SqlStore`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from edgefleet.fleet.domain import Device
from edgefleet.fleet.errors import ConflictError, NotFoundError
from edgefleet.fleet.store._shared import next_labels_seq
from edgefleet.fleet.store._tables import DEVICES, marks
from edgefleet.fleet.store.backend import Backend, Tx

__all__ = ["LabelState", "SavedSelector", "with_labels"]

_IN_CHUNK = 500


@dataclass(frozen=True)
class SavedSelector:
    """A dynamic group: a name for a selector."""

    name: str
    selector: str
    created_ms: int
    created_by: str


def with_labels(tx: Tx, devices: list[Device]) -> list[Device]:
    """``devices`` with the labels operators gave them."""
    labels = _labels(tx, [d.id for d in devices]) if len(devices) <= _IN_CHUNK else (
        _all_labels(tx))
    return [d.with_changes(labels=labels[d.id]) if d.id in labels else d for d in devices]


def _labels(tx: Tx, ids: Sequence[str]) -> dict[str, dict[str, str]]:
    found: defaultdict[str, dict[str, str]] = defaultdict(dict)
    for start in range(0, len(ids), _IN_CHUNK):
        chunk = list(ids[start:start + _IN_CHUNK])
        for device, key, value in tx.rows("SELECT device, key, value FROM device_labels "
                                          f"WHERE device IN ({marks(len(chunk))})", chunk):
            found[str(device)][str(key)] = str(value)
    return dict(found)


def _all_labels(tx: Tx) -> dict[str, dict[str, str]]:
    found: defaultdict[str, dict[str, str]] = defaultdict(dict)
    for device, key, value in tx.rows("SELECT device, key, value FROM device_labels"):
        found[str(device)][str(key)] = str(value)
    return dict(found)


class LabelState:
    """Mixed into :class:`edgefleet.fleet.store.base.SqlStore` (which sets ``_db``)."""

    _db: Backend

    def set_labels(self, device_id: str, put: Mapping[str, str],
                   remove: Iterable[str] = ()) -> Device:
        """Set, then remove (a key in both ends up removed); the device as it is then."""
        with self._db.transaction() as tx:
            seq = next_labels_seq(tx)  # the sequence row first, then the device's (lock order)
            row = tx.one(f"SELECT {DEVICES.select()} FROM devices WHERE id = ?"
                         f"{tx.dialect.for_update}", (device_id,))
            if row is None:
                raise NotFoundError(f"no device {device_id!r}",
                                    hint="check the id against the device list")
            tx.many("INSERT INTO device_labels (device, key, value) VALUES (?, ?, ?) "
                    "ON CONFLICT (device, key) DO UPDATE SET value = excluded.value",
                    [(device_id, key, value) for key, value in sorted(put.items())])
            tx.many("DELETE FROM device_labels WHERE device = ? AND key = ?",
                    [(device_id, key) for key in sorted(set(remove))])
            tx.run("UPDATE devices SET labels_seq = ? WHERE id = ?", (seq, device_id))
            return with_labels(tx, [Device.from_dict(DEVICES.record(row))])[0]

    def labels_of(self, device_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        """The operator labels of these devices (those without any are left out)."""
        with self._db.transaction(write=False) as tx:
            return _labels(tx, sorted(set(device_ids)))

    def save_selector(self, name: str, selector: str, actor: str, now_ms: int) -> None:
        with self._db.transaction() as tx:
            added = tx.run("INSERT INTO saved_selectors (name, selector, created_ms, "
                           "created_by) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                           (name, selector, now_ms, actor))
        if added != 1:
            raise ConflictError(f"group {name!r} already exists",
                                hint=f"delete it first: edgefleet fleet groups delete {name}")

    def saved_selectors(self) -> list[SavedSelector]:
        with self._db.transaction(write=False) as tx:
            rows = tx.rows("SELECT name, selector, created_ms, created_by FROM saved_selectors "
                           "ORDER BY name")
        return [SavedSelector(str(n), str(s), int(ms), str(by)) for n, s, ms, by in rows]

    def delete_selector(self, name: str) -> bool:
        with self._db.transaction() as tx:
            return tx.run("DELETE FROM saved_selectors WHERE name = ?", (name,)) == 1
