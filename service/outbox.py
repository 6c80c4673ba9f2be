"""The queries behind WatchUsers: the outbox `user_changes`, read in feed order.

Like users.py, plain synchronous functions that take a Session (db.read and
db.write run them in one greenlet). The feed order is (xid, seq): the
writing transaction's id, then the change's identity. Only changes of
transactions older than every transaction still running are read (xid below
the snapshot's xmin): those can no longer be joined by an earlier change, so
a position in the feed never has to be revisited. A long write transaction
holds the feed back until it ends; it never makes a reader skip a change.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Row,
    Table,
    Text,
    bindparam,
    delete,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from service.errors import ResumeTokenExpired
from service.models import ChangeHorizon, UserChange

# A row of user_changes: the user's columns as in `users`, plus xid, seq, kind.
ChangeRow = Row[Any]

_changes = cast(Table, UserChange.__table__)
_horizon = cast(Table, ChangeHorizon.__table__)

# The oldest transaction still running, as the bigint user_changes.xid holds.
_XMIN = func.pg_snapshot_xmin(func.pg_current_snapshot()).cast(Text).cast(BigInteger)
# Any fixed bigint: one process at a time deletes old changes.
RETENTION_LOCK_KEY = 0x7061747573657263


@dataclass(frozen=True, order=True)
class Position:
    """A place in the feed: right after the change (xid, seq)."""

    xid: int
    seq: int


_in_feed_order = tuple_(_changes.c.xid, _changes.c.seq)
_AFTER = (
    select(_changes)
    .where(
        _in_feed_order > tuple_(bindparam("after_xid"), bindparam("after_seq")),
        _changes.c.xid < bindparam("xmin"),
    )
    .order_by(_changes.c.xid, _changes.c.seq)
    .limit(bindparam("limit"))
)
_NOW = select(_XMIN)
_HORIZON = select(_horizon.c.xid, _horizon.c.seq)


def now(session: Session) -> Position:
    """A position no change committed from here on comes before."""
    return Position(session.connection().execute(_NOW).scalar_one(), 0)


def read_after(session: Session, after: Position, limit: int) -> tuple[list[ChangeRow], Position]:
    """Up to `limit` changes after `after`, and the position right after what was read.

    When fewer than `limit` came back, every change below the snapshot's xmin
    has been read, so the position moves on to xmin itself: a reader stays
    near "now" even while nothing changes. Raises ResumeTokenExpired when
    retention has deleted changes after `after`: checked after reading, so a
    deletion racing with the read is caught too.
    """
    connection = session.connection()
    xmin = connection.execute(_NOW).scalar_one()
    parameters = {"after_xid": after.xid, "after_seq": after.seq, "xmin": xmin, "limit": limit}
    rows = list(connection.execute(_AFTER, parameters))
    require_retained(session, after)
    if len(rows) == limit:
        return rows, Position(rows[-1].xid, rows[-1].seq)
    return rows, max(after, Position(xmin, 0))


def require_retained(session: Session, position: Position) -> None:
    """ResumeTokenExpired unless every change after `position` is still kept."""
    horizon = session.connection().execute(_HORIZON).one()
    if position < Position(horizon.xid, horizon.seq):
        raise ResumeTokenExpired()


# The last of the oldest `batch` changes that is older than the cutoff.
_OLDEST = (
    select(_changes.c.xid, _changes.c.seq, _changes.c.change_time)
    .where(_changes.c.xid < _XMIN)
    .order_by(_changes.c.xid, _changes.c.seq)
    .limit(bindparam("batch"))
    .subquery()
)
_EXPIRY_BOUND = (
    select(_OLDEST.c.xid, _OLDEST.c.seq)
    .where(_OLDEST.c.change_time < bindparam("cutoff"))
    .order_by(_OLDEST.c.xid.desc(), _OLDEST.c.seq.desc())
    .limit(1)
)
_DELETE_UP_TO = delete(_changes).where(
    _in_feed_order <= tuple_(bindparam("bound_xid"), bindparam("bound_seq"))
)
_MOVE_HORIZON = update(_horizon).values(xid=bindparam("bound_xid"), seq=bindparam("bound_seq"))
_TRY_RETENTION_LOCK = select(func.pg_try_advisory_xact_lock(RETENTION_LOCK_KEY))


def expire(session: Session, cutoff: datetime, batch: int) -> int:
    """Delete up to about `batch` of the oldest changes older than `cutoff`.

    Deletes a prefix of the feed and moves the horizon to its end in the same
    transaction (run it in db.write): tokens before the horizon are then
    refused, never silently served with a gap. Returns how many were deleted;
    0 also when another process holds the retention lock.
    """
    connection = session.connection()
    if not connection.execute(_TRY_RETENTION_LOCK).scalar_one():
        return 0
    bound = connection.execute(_EXPIRY_BOUND, {"batch": batch, "cutoff": cutoff}).one_or_none()
    if bound is None:
        return 0
    parameters = {"bound_xid": bound.xid, "bound_seq": bound.seq}
    deleted = connection.execute(_DELETE_UP_TO, parameters).rowcount
    connection.execute(_MOVE_HORIZON, parameters)
    return int(deleted)
