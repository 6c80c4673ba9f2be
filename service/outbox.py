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
    text,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from service.errors import ResumeTokenExpired
from service.models import ChangeHorizon, Timeline, UserChange

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


@dataclass(frozen=True)
class Origin:
    """Where feed positions come from: one database of one cluster, on one timeline of its WAL.

    The cluster's system_identifier and the database's OID tell databases
    apart: another database of the cluster, or a pg_dump restored into a
    new database or cluster, has another. A streaming standby has the same
    ones (base backups copy the control file), and so does a point-in-time
    restore: those two start a new timeline instead, and `require_resumable`
    tells which positions of the old one the new one still has.
    """

    system_identifier: int
    database_oid: int
    timeline: int

    def same_database(self, other: "Origin") -> bool:
        return (self.system_identifier, self.database_oid) == (
            other.system_identifier,
            other.database_oid,
        )


@dataclass(frozen=True)
class Snapshot:
    """The feed's view of the database now."""

    xmin: int  # the oldest transaction still running (or the next one, if none runs)
    xmax: int  # the next transaction id to be assigned
    timeline: int  # the WAL timeline being written


# The timeline is the first eight hex digits of the WAL file being written.
_SNAPSHOT = text(
    "SELECT pg_snapshot_xmin(s)::text::bigint, pg_snapshot_xmax(s)::text::bigint, "
    "('x' || substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8))::bit(32)::int "
    "FROM pg_current_snapshot() AS s"
)
_IDENTITY = text(
    "SELECT system_identifier, (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "FROM pg_control_system()"
)
_timelines = cast(Table, Timeline.__table__)
# The first timeline noted starts at xid 0: every position before it is its own.
_NOTE_TIMELINE = text(
    "INSERT INTO user_changes_timelines (timeline, first_xid) "
    "SELECT :timeline, CASE WHEN EXISTS (SELECT FROM user_changes_timelines) THEN :xmin ELSE 0 END "
    "ON CONFLICT (timeline) DO NOTHING"
)
_NEXT_TIMELINE = (
    select(_timelines.c.first_xid)
    .where(_timelines.c.timeline > bindparam("timeline"))
    .order_by(_timelines.c.timeline)
    .limit(1)
)


def snapshot(session: Session) -> Snapshot:
    xmin, xmax, timeline = session.connection().execute(_SNAPSHOT).one()
    return Snapshot(xmin, xmax, timeline)


def origin(session: Session) -> Origin:
    """This database's origin, its timeline noted (run in db.write)."""
    connection = session.connection()
    system_identifier, database_oid = connection.execute(_IDENTITY).one()
    now = snapshot(session)
    note_timeline(session, now)
    return Origin(int(system_identifier), int(database_oid), now.timeline)


def note_timeline(session: Session, now: Snapshot) -> None:
    """Record the first transaction of `now`'s timeline, unless a process did already.

    Seen within a poll of a failover or a restore: xmin then is the first
    transaction of the new timeline, or just after it if some ran meanwhile.
    """
    parameters = {"timeline": now.timeline, "xmin": now.xmin}
    session.connection().execute(_NOTE_TIMELINE, parameters)


def require_resumable(session: Session, position: Position, timeline: int) -> None:
    """ResumeTokenExpired unless this database still has the history up to `position`.

    `timeline`: the one the position was read on. A position of the current
    timeline must not be beyond what it has written; one of an older timeline
    must come before the first transaction of the timeline that followed it
    (later ones were lost with it: the tail a failover lost, or what a
    point-in-time restore undid). Positions retention deleted are gone too.
    """
    require_retained(session, position)
    now = snapshot(session)
    if timeline == now.timeline:
        end = Position(now.xmax, 0)
    elif timeline < now.timeline:
        first_xid = session.connection().execute(_NEXT_TIMELINE, {"timeline": timeline})
        found = first_xid.scalar_one_or_none()
        end = Position(found, 0) if found is not None else Position(0, 0)
    else:
        end = Position(0, 0)  # a timeline this database never had
    if position > end:
        raise ResumeTokenExpired()


# Transactions are known by their 32-bit xid in pg_stat_activity.
_OWNER = text(
    "SELECT pid, application_name FROM pg_stat_activity "
    "WHERE backend_xid::text::bigint = :xid % 4294967296 LIMIT 1"
)


def transaction_owner(session: Session, xid: int) -> tuple[int | None, str | None]:
    """The pid and application_name of the session running transaction `xid`, if it still runs."""
    found = session.connection().execute(_OWNER, {"xid": xid}).one_or_none()
    return (found.pid, found.application_name) if found is not None else (None, None)
