"""Who changed what: the outbox records the caller that made each write.

The service's write statements set the transaction-local setting
`pat_users.actor` (in their RETURNING list, so in the same round trip and
before the row's AFTER trigger fires); the trigger copies it into the
change. A write made outside the service leaves it empty.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As migration 0002's, plus the actor.
RECORD_CHANGE = """
CREATE OR REPLACE FUNCTION users_record_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_changes (
        xid, kind, id, email, display_name, create_time, update_time, delete_time, version,
        actor
    ) VALUES (
        pg_current_xact_id()::text::bigint,
        CASE
            WHEN TG_OP = 'INSERT' THEN 1
            WHEN OLD.delete_time IS NULL AND NEW.delete_time IS NOT NULL THEN 3
            WHEN OLD.delete_time IS NOT NULL AND NEW.delete_time IS NULL THEN 4
            ELSE 2
        END,
        NEW.id, NEW.email, NEW.display_name, NEW.create_time, NEW.update_time,
        NEW.delete_time, NEW.version,
        coalesce(current_setting('pat_users.actor', true), '')
    );
    PERFORM pg_notify('user_changes', '');
    RETURN NULL;
END
$$
"""

# Migration 0002's function, as it was.
RECORD_CHANGE_WITHOUT_ACTOR = """
CREATE OR REPLACE FUNCTION users_record_change() RETURNS trigger LANGUAGE plpgsql AS $$
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
    op.add_column(
        "user_changes",
        sa.Column("actor", sa.Text(), server_default=sa.text("''"), nullable=False),
    )
    op.execute(RECORD_CHANGE)


def downgrade() -> None:
    op.execute(RECORD_CHANGE_WITHOUT_ACTOR)
    op.drop_column("user_changes", "actor")
