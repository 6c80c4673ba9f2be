"""The outbox of WatchUsers: user_changes, filled by a trigger on users.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# In the transaction of every write of a user: its change, with the writing
# transaction's id, and a NOTIFY (delivered at commit) that wakes the
# watchers' readers. Kinds are pat.users.v1.UserChange.Kind's numbers.
RECORD_CHANGE = """
CREATE FUNCTION users_record_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_changes (
        xid, kind, id, email, display_name, create_time, update_time, delete_time, version
    ) VALUES (
        pg_current_xact_id()::text::bigint,
        CASE
            WHEN TG_OP = 'INSERT' THEN 1
            WHEN OLD.delete_time IS NULL AND NEW.delete_time IS NOT NULL THEN 3
            WHEN OLD.delete_time IS NOT NULL AND NEW.delete_time IS NULL THEN 4
            ELSE 2
        END,
        NEW.id, NEW.email, NEW.display_name, NEW.create_time, NEW.update_time,
        NEW.delete_time, NEW.version
    );
    PERFORM pg_notify('user_changes', '');
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "user_changes",
        sa.Column("xid", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column(
            "change_time", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.Text(), nullable=False),
        sa.Column("display_name", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("kind BETWEEN 1 AND 4", name=op.f("ck_user_changes_kind")),
        sa.PrimaryKeyConstraint("xid", "seq", name=op.f("pk_user_changes")),
    )
    op.create_index("ix_user_changes_change_time", "user_changes", ["change_time"])
    op.create_table(
        "user_changes_horizon",
        sa.Column("singleton", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("xid", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("seq", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.CheckConstraint("singleton", name=op.f("ck_user_changes_horizon_singleton")),
        sa.PrimaryKeyConstraint("singleton", name=op.f("pk_user_changes_horizon")),
    )
    op.execute("INSERT INTO user_changes_horizon DEFAULT VALUES")
    op.execute(RECORD_CHANGE)
    op.execute(
        "CREATE TRIGGER users_record_change AFTER INSERT OR UPDATE ON users"
        " FOR EACH ROW EXECUTE FUNCTION users_record_change()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER users_record_change ON users")
    op.execute("DROP FUNCTION users_record_change()")
    op.drop_table("user_changes_horizon")
    op.drop_index("ix_user_changes_change_time", table_name="user_changes")
    op.drop_table("user_changes")
