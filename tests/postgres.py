"""PostgreSQL for the store tests: the real server at ``EDGEFLEET_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/test``), one fresh schema a test; when it cannot be
reached the tests fail naming the cause, they are never skipped."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

__all__ = ["PG_URL", "admin_connection", "postgres_schema"]

PG_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def admin_connection() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
    pytest.fail(f"PostgreSQL at {PG_URL} cannot be reached ({reason}); these tests need a "
                "running server: start it, or set EDGEFLEET_TEST_POSTGRES", pytrace=False)


def postgres_schema() -> Iterator[str]:
    """A URL whose search_path (and application_name) is a fresh schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex}"
    with admin_connection() as admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            separator = "&" if "?" in PG_URL else "?"
            yield (f"{PG_URL}{separator}options=-csearch_path%3D{schema}"
                   f"&application_name={schema}")
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
