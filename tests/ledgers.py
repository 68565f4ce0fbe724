"""Real ledger databases for the tests: a SQLite file, or a PostgreSQL database made and dropped per use."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import func, select

from gateway.ledger.schema import requests
from gateway.ledger.store import Ledger
from tests.eventually import eventually

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


def booked_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """Every row of the requests table, oldest first, as column name -> value."""
    with ledger.engine.connect() as connection:
        result = connection.execute(select(requests).order_by(requests.c.ts_us))
        return [dict(row._mapping) for row in result]


def count_rows(ledger: Ledger) -> int:
    """How many rows the requests table holds."""
    with ledger.engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(requests)).scalar_one())


def row_count(url: str) -> int:
    """How many rows the ledger at `url` holds."""
    ledger = Ledger(url)
    try:
        return count_rows(ledger)
    finally:
        ledger.close()


def all_rows(url: str) -> list[dict[str, Any]]:
    """Every row of the ledger at `url`, oldest first."""
    ledger = Ledger(url)
    try:
        return booked_rows(ledger)
    finally:
        ledger.close()


def rows_once_booked(url: str, count: int, *, within_s: float) -> list[dict[str, Any]]:
    """Every row of the ledger at `url`, once it holds at least `count` (rows are written off the
    request path)."""
    ledger = Ledger(url)
    try:
        eventually(
            lambda: count_rows(ledger),
            until=lambda rows: rows >= count,
            within_s=within_s,
            waiting_for=f"{count} rows in the ledger",
        )
        return booked_rows(ledger)
    finally:
        ledger.close()


def rows_of_request(url: str, request_id: str, *, within_s: float) -> list[dict[str, Any]]:
    """The rows booked for one request id, once there is one."""
    ledger = Ledger(url)
    try:
        return eventually(
            lambda: [row for row in booked_rows(ledger) if row["request_id"] == request_id],
            within_s=within_s,
            waiting_for=f"the row of request {request_id}",
        )
    finally:
        ledger.close()


def row_of_request(url: str, request_id: str, *, within_s: float) -> dict[str, Any]:
    """The one row booked for a request id, once it is there."""
    (row,) = rows_of_request(url, request_id, within_s=within_s)
    return row


@contextmanager
def connect(url: str) -> Iterator[Any]:
    """A plain connection of the test's own to the ledger database, outside the gateway (autocommit)."""
    if url.startswith("sqlite:///"):
        database = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            yield database
        finally:
            database.close()
    else:
        with psycopg.connect(url, autocommit=True) as connection:
            yield connection


@contextmanager
def requests_table_away(url: str) -> Iterator[None]:
    """Every write to the ledger fails while this lasts (its table has another name), then works again."""
    with connect(url) as database:
        database.execute("ALTER TABLE requests RENAME TO requests_away")
        try:
            yield
        finally:
            database.execute("ALTER TABLE requests_away RENAME TO requests")


def spill_files(spill_dir: Path) -> list[Path]:
    """The spill files in a spill folder (not the dead-letter file)."""
    return sorted(spill_dir.glob("spill-*.jsonl"))
