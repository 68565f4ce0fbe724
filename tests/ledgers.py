"""Real ledger databases for the tests: a SQLite file, or a PostgreSQL database made and dropped per use."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

POSTGRES = "postgresql://postgres@127.0.0.1:5432"
BACKENDS = ("sqlite", "postgresql")


@contextmanager
def postgres_database() -> Iterator[str]:
    name = f"gw_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def ledger_database(backend: str, directory: Path) -> Iterator[str]:
    """A fresh, empty ledger URL on `backend`."""
    if backend == "postgresql":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{directory}/ledger-{uuid.uuid4().hex[:8]}.db"
