"""Create the users table.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), server_default=sa.func.gen_random_uuid(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "create_time", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "update_time", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("create_request_id", sa.Uuid(), nullable=True),
        sa.Column("create_request_digest", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint("char_length(email) <= 254", name=op.f("ck_users_email_length")),
        sa.CheckConstraint(
            "char_length(display_name) <= 200", name=op.f("ck_users_display_name_length")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("create_request_id", name=op.f("uq_users_create_request_id")),
    )
    op.create_index(
        "ix_users_lower_email_live",
        "users",
        [sa.text("lower(email)")],
        unique=True,
        postgresql_where=sa.text("delete_time IS NULL"),
    )
    op.create_index("ix_users_create_time_id", "users", ["create_time", "id"])


def downgrade() -> None:
    op.drop_index("ix_users_create_time_id", table_name="users")
    op.drop_index("ix_users_lower_email_live", table_name="users")
    op.drop_table("users")
