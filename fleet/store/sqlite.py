"""The SQLite backend (the default): one WAL-mode connection shared by threads under a lock."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from edgefleet.fleet.errors import StoreError
from edgefleet.fleet.store.backend import Backend, Dialect
from edgefleet.fleet.store.base import SqlStore

__all__ = ["SqliteBackend", "open_sqlite"]

_BUSY_TIMEOUT_S = 10.0  # how long a write waits for another process's write lock


class SqliteBackend(Backend):
    dialect = Dialect(id_pk="INTEGER PRIMARY KEY AUTOINCREMENT", key_text="TEXT",
                      for_update="", blob="BLOB",
                      now_ms="CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)")
    driver_errors = (sqlite3.Error,)

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__()

    def _connect(self) -> None:
        # isolation_level=None: no implicit transactions; _begin says BEGIN and COMMIT.
        self._conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                                     check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")  # durable across crashes in WAL
            self._conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error:
            self._conn.close()
            raise

    def _disconnect(self) -> None:
        self._conn.close()

    @contextmanager
    def _begin(self, write: bool) -> Iterator[sqlite3.Cursor]:
        # IMMEDIATE takes the write lock up front, so a read-then-write never fails midway
        # on another process's write; reads stay deferred and never block anyone in WAL.
        cursor = self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield cursor
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        else:
            self._conn.execute("COMMIT")
        finally:
            cursor.close()

    def translate(self, exc: Exception) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreError(f"SQLite database {self.path} stayed locked: {text}",
                              hint="another process is writing to it; retry, or stop the "
                                   "other controller using the same file")
        if isinstance(exc, sqlite3.OperationalError) and "unable to open" in text:
            return StoreError(f"SQLite cannot open {self.path}: {text}", transient=False,
                              hint="check that its directory exists and is writable")
        return StoreError(f"SQLite database {self.path} failed: {text}",
                          hint="check that the file is an edgefleet store, on a disk with "
                               "free space")


def open_sqlite(path: str) -> SqlStore:
    """A store in the SQLite file ``path`` (``:memory:`` for a private, throwaway one)."""
    if not path:
        raise StoreError("an empty path is not a SQLite database", transient=False,
                         hint="give a file path, e.g. sqlite:///var/lib/edgefleet/fleet.db")
    return SqlStore(SqliteBackend(path))
