"""The database schema, as SQLAlchemy 2.0 typed declarative models.

Alembic migrations create exactly this; tests/test_migrations.py fails if the
two drift apart.
"""

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Identity,
    Index,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MAX_EMAIL_LENGTH = 254
MAX_DISPLAY_NAME_LENGTH = 200

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, server_default=func.gen_random_uuid())
    email: Mapped[str] = mapped_column(Text)
    display_name: Mapped[str] = mapped_column(Text, server_default="")
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    update_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    delete_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Bumped by every write; the etag is derived from it.
    version: Mapped[int] = mapped_column(BigInteger, server_default=text("1"))
    # CreateUser idempotency: the caller's request_id and a digest of the body.
    create_request_id: Mapped[uuid.UUID | None] = mapped_column(unique=True)
    create_request_digest: Mapped[bytes | None] = mapped_column(LargeBinary)

    __table_args__ = (
        # Emails are unique among live users, whatever their letter case.
        Index(
            "ix_users_lower_email_live",
            func.lower(email),
            unique=True,
            postgresql_where=delete_time.is_(None),
        ),
        # ListUsers' keyset order.
        Index("ix_users_create_time_id", create_time, id),
        # Last line of defence behind the servicer's validation.
        CheckConstraint(f"char_length(email) <= {MAX_EMAIL_LENGTH}", name="email_length"),
        CheckConstraint(
            f"char_length(display_name) <= {MAX_DISPLAY_NAME_LENGTH}", name="display_name_length"
        ),
    )


class UserChange(Base):
    """The outbox of WatchUsers: one row per committed write of a user.

    Filled by the trigger `users_record_change` (migration 0002), in the
    transaction of the write: a change exists if and only if its write
    committed. Feed order is (xid, seq). `seq` alone is not: identities are
    handed out before commit, so a later one can commit first; a reader reads
    only changes of transactions older than every transaction still running
    (xid < pg_snapshot_xmin), which can no longer gain an earlier change.
    The user's columns carry the same names as in `users`, so a change row
    converts like a user row.
    """

    __tablename__ = "user_changes"

    # pg_current_xact_id() of the writing transaction (an xid8, as bigint).
    xid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    # 1 created, 2 updated, 3 deleted, 4 undeleted: pat.users.v1.UserChange.Kind.
    kind: Mapped[int] = mapped_column(SmallInteger)
    change_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    id: Mapped[uuid.UUID]
    email: Mapped[str] = mapped_column(Text)
    display_name: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    update_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delete_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(BigInteger)
    # The caller whose write this was (migration 0003: the trigger reads the
    # write's `pat_users.actor` setting); empty for writes made outside the service.
    actor: Mapped[str] = mapped_column(Text, server_default=text("''"))

    __table_args__ = (
        CheckConstraint("kind BETWEEN 1 AND 4", name="kind"),
        # Retention deletes by age.
        Index("ix_user_changes_change_time", change_time),
    )


class ChangeHorizon(Base):
    """One row: the feed position up to which retention has deleted changes.

    A resume token at or after it can still be honoured; one before it cannot.
    """

    __tablename__ = "user_changes_horizon"

    singleton: Mapped[bool] = mapped_column(primary_key=True, server_default=text("true"))
    xid: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))

    __table_args__ = (CheckConstraint("singleton", name="singleton"),)


class Timeline(Base):
    """The WAL timelines the change feed has seen, each with its first transaction.

    A failover or a point-in-time restore starts a new timeline; a resume
    token from an older one is honoured only for positions before the
    first transaction of the timeline that followed it (outbox.require_resumable).
    """

    __tablename__ = "user_changes_timelines"

    timeline: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    first_xid: Mapped[int] = mapped_column(BigInteger)
