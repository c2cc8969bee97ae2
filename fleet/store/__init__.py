"""The fleet controller's persistent store: SQLite by default, PostgreSQL for a shared one.

>>> store = open_store("sqlite:///var/lib/edgefleet/fleet.db")  # doctest: +SKIP
>>> store = open_store("postgresql://edgefleet@db.example:5432/fleet")  # doctest: +SKIP

See :class:`edgefleet.fleet.store.base.Store` for what it keeps.
"""

from __future__ import annotations

from pathlib import Path

from edgefleet.fleet.errors import StoreError
from edgefleet.fleet.store.base import Store
from edgefleet.fleet.store.sqlite import open_sqlite

__all__ = ["ACCEPTED_URLS", "Store", "open_store"]

ACCEPTED_URLS = ("sqlite:///ABSOLUTE/PATH.db", "a bare file path",
                 "postgresql://USER@HOST:PORT/DB (or postgres://...)")


def open_store(url: str | Path) -> Store:
    """Open (creating the schema if missing) the store that ``url`` names."""
    if isinstance(url, Path):
        return open_sqlite(str(url))
    scheme, separator, rest = url.partition("://")
    if not separator:
        return open_sqlite(url)
    if scheme == "sqlite":
        return open_sqlite(rest)
    if scheme in ("postgresql", "postgres"):
        return _open_postgres(url)
    raise StoreError(f"a store URL starting {scheme}:// is not understood", transient=False,
                     hint="use " + ", ".join(ACCEPTED_URLS))


def _open_postgres(url: str) -> Store:
    try:
        from edgefleet.fleet.store.postgres import open_postgres
    except ImportError as exc:
        raise StoreError(f"a PostgreSQL store needs psycopg ({exc})", transient=False,
                         hint="pip install 'edgefleet[fleet]'") from exc
    return open_postgres(url)
