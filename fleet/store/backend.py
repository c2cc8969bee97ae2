"""The connection a store runs its statements on: a :class:`Backend` (one per database
kind) opens a :class:`Tx` at a time behind a lock, and translates its driver's exceptions
into :class:`~edgefleet.fleet.errors.StoreError` here only; :class:`Dialect` holds the few
words the databases spell differently."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from edgefleet.fleet.errors import StoreError

__all__ = ["Backend", "Dialect", "DriverCursor", "Tx"]


@dataclass(frozen=True)
class Dialect:
    """The few words the backends spell differently."""

    id_pk: str  # an auto-numbered integer primary key, never reusing a number
    key_text: str  # text compared by code point (so both backends sort ids alike)
    for_update: str  # suffix of a SELECT that locks the rows it reads
    blob: str  # a column of bytes
    now_ms: str  # the database's clock, integer milliseconds since the epoch


class DriverCursor(Protocol):
    """The part of a DB-API cursor the store uses (``sqlite3`` and ``psycopg`` both fit)."""

    @property
    def rowcount(self) -> int: ...
    def execute(self, sql: str, params: Sequence[Any], /) -> object: ...
    def executemany(self, sql: str, params: Iterable[Sequence[Any]], /) -> object: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Tx:
    """One open transaction: statements in the shared ``?`` style, rows as tuples."""

    def __init__(self, cursor: DriverCursor, dialect: Dialect,
                 sql: Callable[[str], str]) -> None:
        self._cursor, self.dialect, self._sql = cursor, dialect, sql

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cursor.execute(self._sql(sql), params)
        return self._cursor.rowcount

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(self._sql(sql), rows)

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._cursor.execute(self._sql(sql), params)
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cursor.execute(self._sql(sql), params)
        return [tuple(row) for row in self._cursor.fetchall()]


class Backend(ABC):
    """A connection behind a lock; driver exceptions become :class:`StoreError` here only."""

    dialect: Dialect
    driver_errors: tuple[type[Exception], ...]

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        with self._translated():
            self._connect()

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Tx]:
        """One transaction: committed if the block ends normally, rolled back otherwise."""
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed", hint="open it again with open_store()",
                                 transient=False)
            with self._translated(), self._begin(write) as cursor:
                yield Tx(cursor, self.dialect, self._sql)

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                with self._translated():
                    self._disconnect()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except self.driver_errors as exc:
            raise self.translate(exc) from exc

    def _sql(self, sql: str) -> str:
        return sql

    @abstractmethod
    def _connect(self) -> None: ...

    @abstractmethod
    def _disconnect(self) -> None: ...

    @abstractmethod
    def _begin(self, write: bool) -> AbstractContextManager[DriverCursor]: ...

    @abstractmethod
    def translate(self, exc: Exception) -> StoreError: ...
