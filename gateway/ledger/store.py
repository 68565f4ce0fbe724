"""The ledger database: booked requests, usage reports and issued keys, on SQLite or PostgreSQL.

SQLAlchemy Core gives one implementation for both backends (the dialect differences are a few
pragmas and the idempotent insert); Alembic creates and migrates the schema. Everything here is
synchronous: the request path never calls it; the writer thread and `asyncio.to_thread` do.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from decimal import Decimal
from operator import attrgetter
from pathlib import Path
from typing import Any

import alembic.command
import alembic.config
from sqlalchemy import Engine, Select, create_engine, event, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from gateway.config import CallerKey
from gateway.ledger.schema import api_keys, requests

GROUPS = ("user", "key", "model", "day")
_GROUP_COLUMNS = {
    "user": requests.c.user,
    "key": requests.c.key_name,
    "model": requests.c.model,
    "day": requests.c.day,
}
_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 7_416_501  # PostgreSQL advisory lock: one instance migrates at a time
NANOS_PER_USD = Decimal(1_000_000_000)
# A PostgreSQL that drops packets instead of refusing them would hold a connect (and every row behind
# it) for the system's TCP timeout, minutes; after this many seconds the writer spills instead.
_POSTGRES_CONNECT_TIMEOUT_S = 5
# Worker processes sharing one SQLite file wait this long for each other's write lock before failing
# (a batch takes milliseconds; a failed one is retried or spilled, never lost).
_SQLITE_BUSY_TIMEOUT_MS = 10_000
_KEY_BYTES = 32  # an issued key's randomness: 256 bits, never guessed


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One row of the `requests` table: its fields are the table's columns, in order (schema.py has
    their types; tests/test_ledger.py checks that the two agree)."""

    row_id: str
    request_id: str
    ts_us: int
    day: str
    key_name: str
    user: str | None
    model: str | None
    stream: bool
    outcome: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_nanos: int
    usage_source: str
    cost_source: str
    latency_us: int
    ttfb_us: int | None
    service_tier: str | None


ROW_FIELDS = tuple(field.name for field in fields(LedgerRow))  # the column list, for every other use
# A batch is written as INSERTs of these sizes only (61 rows: 3 x 16, 3 x 4, 1 x 1). The database
# drivers cache each distinct statement they run (sqlite3 keeps 128 compiled ones per connection,
# psycopg prepares repeated ones): one size per batch length made that memory grow for minutes
# under load. 256 rows x 19 parameters stays well under SQLite's 32,766 and PostgreSQL's 65,535.
_ROWS_PER_INSERT = (256, 64, 16, 4, 1)
# A row's values in ROW_FIELDS order; dataclasses.asdict deep-copies: too slow for thousands of rows.
row_values = attrgetter(*ROW_FIELDS)


_PING_ROW = LedgerRow(
    row_id="ping",
    request_id="ping",
    ts_us=0,
    day="1970-01-01",
    key_name="ping",
    user=None,
    model=None,
    stream=False,
    outcome="ok",
    status=200,
    prompt_tokens=0,
    completion_tokens=0,
    total_tokens=0,
    cost_nanos=0,
    usage_source="none",
    cost_source="none",
    latency_us=0,
    ttfb_us=None,
    service_tier=None,
)


@dataclass(frozen=True, slots=True)
class UsageTotal:
    group: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_nanos: int

    @property
    def estimated_cost(self) -> Decimal:
        """The exact total in USD."""
        return usd(self.cost_nanos)


@dataclass(frozen=True, slots=True)
class IssuedKey:
    name: str
    created_us: int
    revoked_us: int | None


class KeyNameTaken(Exception):
    """A key of that name exists or once existed."""


class KeyNotFound(Exception):
    """No issued key has that name."""


def usd(nanos: int) -> Decimal:
    """Nano-dollars as an exact decimal USD amount, without trailing zeros."""
    value = (Decimal(nanos) / NANOS_PER_USD).normalize()
    return value.quantize(Decimal(1)) if value == value.to_integral() else value


def sqlalchemy_url(url: str) -> str:
    """The config's URL (`sqlite:///...`, `postgresql://...`) with the driver SQLAlchemy should use."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


FileIdentity = tuple[int, int]  # (st_dev, st_ino): which file a path names


class Ledger:
    def __init__(self, url: str) -> None:
        is_sqlite = sqlalchemy_url(url).startswith("sqlite")
        connect_args = {} if is_sqlite else {"connect_timeout": _POSTGRES_CONNECT_TIMEOUT_S}
        self.engine: Engine = create_engine(
            sqlalchemy_url(url), pool_pre_ping=True, connect_args=connect_args
        )
        self.is_sqlite = is_sqlite
        database = self.engine.url.database
        # The SQLite file, watched by the writer: a path that names another file (or none) is noticed.
        self.sqlite_path = Path(database) if is_sqlite and database and database != ":memory:" else None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        marker = "?" if self.is_sqlite else "%s"
        self._insert_sql = {rows: _insert_sql(rows, marker) for rows in _ROWS_PER_INSERT}

    def close(self) -> None:
        self.engine.dispose()

    def file_identity(self) -> FileIdentity | None:
        """SQLite: the file its path names now (None: no file there, or none that can be reached: a
        folder of the path replaced by a file, no search permission). PostgreSQL: always None."""
        if self.sqlite_path is None:
            return None
        try:
            found = os.stat(self.sqlite_path)
        except OSError:
            return None
        return (found.st_dev, found.st_ino)

    def reopen(self) -> None:
        """Close every pooled connection: the next ones open whatever file the path names now."""
        self.engine.dispose()

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest revision; safe to run from many instances."""
        config = alembic.config.Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with self.engine.begin() as connection:
            if not self.is_sqlite:
                connection.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": _MIGRATION_LOCK})
            config.attributes["connection"] = connection
            alembic.command.upgrade(config, "head")

    def ping(self) -> None:
        """Raise unless the database takes a row now: a valid row inserted, then rolled back.

        More than `SELECT 1`: a missing table or a revoked INSERT is the database failing, not the
        rows. The writer asks after a batch failed, to tell a refused row from an unavailable ledger.
        """
        with self.engine.connect() as connection, connection.begin() as transaction:
            connection.exec_driver_sql(self._insert_sql[1], row_values(_PING_ROW))
            transaction.rollback()

    def insert(self, rows: Sequence[LedgerRow]) -> None:
        """Write rows in one transaction; rows already written (a retried batch) are skipped."""
        if not rows:
            return
        # One multi-row INSERT per chunk, straight to the driver. This thread shares the interpreter
        # lock with the event loop: an executemany would hand the lock back and forth once per row,
        # and SQLAlchemy's per-row parameter handling costs 5x the driver's.
        with self.engine.begin() as connection:
            at = 0
            for size in _ROWS_PER_INSERT:
                while len(rows) - at >= size:
                    params = tuple(value for row in rows[at : at + size] for value in row_values(row))
                    connection.exec_driver_sql(self._insert_sql[size], params)
                    at += size

    def usage(
        self, group_by: str, since_us: int | None = None, until_us: int | None = None
    ) -> list[UsageTotal]:
        """Totals per group over [since, until), the biggest spenders first."""
        group = _GROUP_COLUMNS[group_by]
        cost = func.sum(requests.c.cost_nanos)
        query = _totals(group).group_by(group)
        query = _within(query, since_us, until_us)
        query = query.order_by(group) if group_by == "day" else query.order_by(cost.desc(), group)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [UsageTotal(row[0], *(int(value or 0) for value in row[1:])) for row in rows]

    def usage_by_day(
        self, group_by: str, since_us: int | None = None, until_us: int | None = None
    ) -> list[tuple[str, UsageTotal]]:
        """Totals per UTC day and group over [since, until): (day, totals), days in order."""
        group = _GROUP_COLUMNS[group_by]
        query = _totals(requests.c.day, group).group_by(requests.c.day, group)
        query = _within(query, since_us, until_us).order_by(requests.c.day, group)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [(row[0], UsageTotal(row[1], *(int(value or 0) for value in row[2:]))) for row in rows]

    # --- issued keys ---------------------------------------------------------------------------------

    def create_key(self, name: str) -> str:
        """Issue a key; return it (the only time it is seen: only its SHA-256 is stored)."""
        key = "sk-gw-" + secrets.token_urlsafe(_KEY_BYTES)
        row = {"name": name, "sha256": hashlib.sha256(key.encode()).digest(), "created_us": _now_us()}
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(api_keys), row)
        except IntegrityError:
            raise KeyNameTaken(name) from None
        return key

    def list_keys(self) -> list[IssuedKey]:
        query = select(api_keys.c.name, api_keys.c.created_us, api_keys.c.revoked_us).order_by(
            api_keys.c.name
        )
        with self.engine.connect() as connection:
            return [IssuedKey(*row) for row in connection.execute(query)]

    def revoke_key(self, name: str) -> IssuedKey:
        with self.engine.begin() as connection:
            connection.execute(
                update(api_keys)
                .where(api_keys.c.name == name, api_keys.c.revoked_us.is_(None))
                .values(revoked_us=_now_us())
            )
            found = connection.execute(
                select(api_keys.c.name, api_keys.c.created_us, api_keys.c.revoked_us).where(
                    api_keys.c.name == name
                )
            ).first()
        if found is None:
            raise KeyNotFound(name)
        return IssuedKey(*found)

    def active_keys(self) -> list[CallerKey]:
        query = select(api_keys.c.name, api_keys.c.sha256).where(api_keys.c.revoked_us.is_(None))
        with self.engine.connect() as connection:
            return [CallerKey(name=name, sha256=bytes(digest)) for name, digest in connection.execute(query)]


def _now_us() -> int:
    return time.time_ns() // 1000


def _totals(*columns: Any) -> Select[Any]:
    """SELECT the given columns, then the request count and the token and cost sums."""
    return select(
        *columns,
        func.count(),
        func.sum(requests.c.prompt_tokens),
        func.sum(requests.c.completion_tokens),
        func.sum(requests.c.total_tokens),
        func.sum(requests.c.cost_nanos),
    )


def _within(query: Select[Any], since_us: int | None, until_us: int | None) -> Select[Any]:
    if since_us is not None:
        query = query.where(requests.c.ts_us >= since_us)
    if until_us is not None:
        query = query.where(requests.c.ts_us < until_us)
    return query


def _insert_sql(rows: int, marker: str) -> str:
    """INSERT of `rows` rows; a batch retried after an ambiguous failure is written once."""
    columns = ", ".join(f'"{name}"' for name in ROW_FIELDS)
    one_row = "(" + ", ".join([marker] * len(ROW_FIELDS)) + ")"
    values = ", ".join([one_row] * rows)
    return f"INSERT INTO requests ({columns}) VALUES {values} ON CONFLICT (row_id) DO NOTHING"  # noqa: S608


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    # WAL lets readers (reports) run while the writer writes; busy_timeout lets worker processes
    # sharing one file wait for each other instead of failing.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()
