"""The ledger's tables (SQLAlchemy Core), shared by SQLite and PostgreSQL.

`requests` is append-only: one row per request, never updated, so concurrent writers from many
workers and instances never contend on a hot row. Money is an integer count of nano-dollars.
Times are integer microseconds since the epoch (UTC) plus the UTC day as text, so that ranges and
per-day groups are the same plain comparisons on every backend.

This is the one list of the ledger's columns: LedgerRow (store.py) mirrors `requests`, and the
INSERT, the spill file and the dead letters take their names from it. A migration copies the tables
as they were at its revision, as history: it is never derived from this file.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, LargeBinary, MetaData, String, Table

# The lengths of the text columns, in characters: what the gateway clips or refuses before
# booking (accounting), and the names the config, the admin API and the CLI accept.
REQUEST_ID_CHARS = 200
KEY_NAME_CHARS = 200
USER_CHARS = 500
MODEL_CHARS = 500
SERVICE_TIER_CHARS = 64

metadata = MetaData()

requests = Table(
    "requests",
    metadata,
    Column("row_id", String(32), primary_key=True),  # the gateway's own id: retried batches stay idempotent
    Column("request_id", String(REQUEST_ID_CHARS), nullable=False),
    Column("ts_us", BigInteger, nullable=False),
    Column("day", String(10), nullable=False),
    Column("key_name", String(KEY_NAME_CHARS), nullable=False),
    Column("user", String(USER_CHARS)),
    Column("model", String(MODEL_CHARS)),
    Column("stream", Boolean, nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("status", Integer, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),
    Column("completion_tokens", BigInteger, nullable=False),
    Column("total_tokens", BigInteger, nullable=False),
    Column("cost_nanos", BigInteger, nullable=False),
    Column("usage_source", String(16), nullable=False),  # upstream | estimated | none
    Column("cost_source", String(16), nullable=False),  # upstream | price_table | none
    Column("latency_us", BigInteger, nullable=False),
    Column("ttfb_us", BigInteger),
    Column("service_tier", String(SERVICE_TIER_CHARS)),
    Index("ix_requests_ts", "ts_us"),
    Index("ix_requests_key_ts", "key_name", "ts_us"),
    Index("ix_requests_user_ts", "user", "ts_us"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("name", String(KEY_NAME_CHARS), primary_key=True),
    Column("sha256", LargeBinary(32), nullable=False, unique=True),
    Column("created_us", BigInteger, nullable=False),
    Column("revoked_us", BigInteger),
)
