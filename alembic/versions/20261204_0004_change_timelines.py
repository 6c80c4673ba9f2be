"""Resume tokens name their database: the WAL timelines the change feed has seen.

A resume token carries the cluster's system identifier, the database's OID
and the timeline it was issued on. A failover or a point-in-time restore
starts a new timeline; the feed notes each one with its first transaction,
and a token from an older timeline is honoured only for positions before it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_changes_timelines",
        sa.Column("timeline", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("first_xid", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("timeline", name=op.f("pk_user_changes_timelines")),
    )


def downgrade() -> None:
    op.drop_table("user_changes_timelines")
