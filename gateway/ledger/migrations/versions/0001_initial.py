"""The initial ledger: the append-only requests log and the issued keys.

Revision ID: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("row_id", sa.String(32), primary_key=True),
        sa.Column("request_id", sa.String(200), nullable=False),
        sa.Column("ts_us", sa.BigInteger, nullable=False),
        sa.Column("day", sa.String(10), nullable=False),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("user", sa.String(500)),
        sa.Column("model", sa.String(500)),
        sa.Column("stream", sa.Boolean, nullable=False),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
        sa.Column("total_tokens", sa.BigInteger, nullable=False),
        sa.Column("cost_nanos", sa.BigInteger, nullable=False),
        sa.Column("usage_source", sa.String(16), nullable=False),
        sa.Column("cost_source", sa.String(16), nullable=False),
        sa.Column("latency_us", sa.BigInteger, nullable=False),
        sa.Column("ttfb_us", sa.BigInteger),
        sa.Column("service_tier", sa.String(64)),
    )
    op.create_index("ix_requests_ts", "requests", ["ts_us"])
    op.create_index("ix_requests_key_ts", "requests", ["key_name", "ts_us"])
    op.create_index("ix_requests_user_ts", "requests", ["user", "ts_us"])
    op.create_table(
        "api_keys",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("sha256", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("created_us", sa.BigInteger, nullable=False),
        sa.Column("revoked_us", sa.BigInteger),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_table("requests")
