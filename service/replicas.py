"""Streaming standbys (DATABASE_REPLICA_URLS): which reads they serve, and how they are watched.

A read (GetUser, BatchGetUsers, LookupUser, ListUsers) goes to a standby
when one qualifies, else to the primary; every write, WatchUsers, health and
the statement_timeout check stay on the primary. A standby qualifies while

- its last background check succeeded and found it still in recovery,
- its lag is at most REPLICA_MAX_LAG_SECONDS, and
- when the call carries a consistency token (consistency.py), it has
  replayed at least the token's position: known from a check or an earlier
  read, or else asked first, in the read's own session (replay only moves
  forward, so the read then sees that far); short of it, the primary answers.

Lag is the age of the newest primary position the standby is known to have
replayed: every REPLICA_CHECK_INTERVAL_SECONDS the watcher notes the
primary's WAL insert position and the time it asked, then each standby's
replay position. A standby at or past a position the primary had at time t
holds everything committed by t, so it is at most now - t behind, on this
process's own clock. An idle primary keeps the same position, which the
standby has, so a healthy standby never looks stale however quiet the
primary is; replication that stops shows as lag growing from that moment.

The checks run on an event loop of their own (check_loop.py), at most one
query per database per interval, and reads never wait for them: a read
compares numbers the last check left. A read that a standby fails (it is
down, unreachable, or cancelled the statement for a recovery conflict) is
retried once on the primary, and the standby is out until a check finds it
well again. A standby found promoted is out, with an ERROR: a split-brain
write target is worse than a slow read.

Each answer's position (consistency tokens) is read after the call's own
statements, on its connection: `pg_last_wal_replay_lsn()` on a standby,
`pg_current_wal_insert_lsn()` on the primary (after COMMIT for a write).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, AdaptedConnection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from service import db
from service.check_loop import CheckLoop
from service.config import Settings
from service.consistency import CallConsistency, current_call, invalid_token
from service.db import Database, create_engine, normalize_url
from service.errors import ServiceError, is_transaction_conflict, is_unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

PRIMARY = "primary"  # the target label of reads the primary served

# Positions as integers: pg_lsn minus '0/0' is its byte offset.
_STANDBY_POSITION = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint"
_PRIMARY_POSITION = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
_PRIMARY_CHECK = text(_PRIMARY_POSITION)
_STANDBY_STATE = text(
    "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint"
)


@dataclass
class Replica:
    """One standby: its pool, and what was last learned of it."""

    name: str  # "replica-1": the metrics label and the log's name for it
    host: str  # where it is, without credentials (logged once, at start)
    engine: AsyncEngine  # the pool reads use
    check_engine: AsyncEngine  # the watcher's own connection, on the check loop
    up: bool = False  # its last check succeeded, and no call failed on it since
    replayed: int = 0  # a position it has replayed (it may be further on)
    fresh_until: float = 0.0  # time.monotonic() until which its lag is within bound
    lag_seconds: float = float("inf")
    state: str = "starting"  # as last logged: serving, lagging, unreachable, promoted


class ReplicaSet:
    """The standbys, their watcher, and the choice of one for a read."""

    def __init__(self, settings: Settings, primary_url: URL) -> None:
        self._interval = settings.replica_check_interval_seconds
        self._max_lag = settings.replica_max_lag_seconds
        self._timeout = settings.health_check_timeout_seconds
        self.replicas = [
            _replica(number, raw, settings)
            for number, raw in enumerate(settings.database_replica_urls, start=1)
        ]
        self._primary_check = create_engine(
            primary_url, settings, pool_size=1, application_name="pat-users-replica-check"
        )
        # (time asked, the primary's position then), oldest first: enough to
        # tell any lag up to the bound, and a little more.
        self._samples: deque[tuple[float, int]] = deque(
            maxlen=int(self._max_lag / self._interval) + 3
        )
        self.primary_position = 0  # the primary's position at the last check
        self.rounds = 0  # checks of every database completed so far
        self.reads = {PRIMARY: 0} | {replica.name: 0 for replica in self.replicas}
        self._next = 0
        self._checks = CheckLoop("replica-checks")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        for replica in self.replicas:
            logger.info("%s is %s", replica.name, replica.host)
        self._task = asyncio.create_task(self._checks.run(self._watch()), name="replica-checks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for replica in self.replicas:
            await replica.engine.dispose()
        await self._checks.run(self._dispose_checks())
        self._checks.close()

    def choose(self, call: CallConsistency | None) -> tuple[Replica, int | None] | None:
        """A standby for this read, or None: the primary. Round robin among those that qualify.

        With it, the position it must first show it has replayed: the call's
        token's, when the standby is not yet known to be that far (None: it is).
        """
        if call is not None and call.primary_only:
            return None
        required = call.required if call is not None else None
        now = time.monotonic()
        fresh = [r for r in self._in_turn() if r.up and now < r.fresh_until]
        for replica in fresh:
            if required is None or replica.replayed >= required:
                return self._took(replica), None
        if fresh:  # none known to be there yet: the next in turn is asked, in the read
            return self._took(fresh[0]), required
        return None

    def _in_turn(self) -> list[Replica]:
        return self.replicas[self._next :] + self.replicas[: self._next]

    def _took(self, replica: Replica) -> Replica:
        self._next = (self.replicas.index(replica) + 1) % len(self.replicas)
        return replica

    def failed(self, replica: Replica, error: Exception) -> None:
        """A call failed on `replica`: out until a check finds it well."""
        replica.up = False
        self._became(replica, "unreachable", f"a read failed ({type(error).__name__})")

    async def _watch(self) -> None:
        while True:
            await self._check_once()
            await asyncio.sleep(self._interval)

    async def _check_once(self) -> None:
        asked = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                position = await _scalar(self._primary_check, _PRIMARY_CHECK)
        except Exception as error:  # the primary is away: no sample; lags grow
            logger.debug("reading the primary's position failed: %r", error)
        else:
            self._samples.append((asked, position))
            self.primary_position = position
        await asyncio.gather(*(self._check(replica) for replica in self.replicas))
        self.rounds += 1

    async def _check(self, replica: Replica) -> None:
        try:
            async with asyncio.timeout(self._timeout), replica.check_engine.connect() as c:
                in_recovery, replayed = (await c.execute(_STANDBY_STATE)).one()
        except Exception as error:  # the watcher must outlive every failure
            replica.up = False
            self._became(replica, "unreachable", f"its check failed ({type(error).__name__})")
            return
        if not in_recovery:
            replica.up = False
            self._became(replica, "promoted", "it is no longer in recovery")
            return
        replica.replayed = replayed or 0
        caught_up = self._caught_up_at(replica.replayed)
        now = time.monotonic()
        replica.lag_seconds = now - caught_up if caught_up is not None else float("inf")
        replica.fresh_until = caught_up + self._max_lag if caught_up is not None else 0.0
        replica.up = True
        if now < replica.fresh_until:
            self._became(replica, "serving", "it serves reads")
        elif replica.state != "starting":  # a first check knows no earlier primary position
            why = f"it is not known to be within {self._max_lag:g} s of the primary"
            self._became(replica, "lagging", why)

    def _caught_up_at(self, replayed: int) -> float | None:
        """When the primary last held no more than `replayed` (None: before the samples)."""
        for asked, position in reversed(self._samples):
            if position <= replayed:
                return asked
        return None

    def _became(self, replica: Replica, state: str, why: str) -> None:
        """Log a change of state, once."""
        if state == replica.state:
            return
        replica.state = state
        if state == "promoted":
            logger.error("%s: %s; taken out of reads (split brain?)", replica.name, why)
        elif state == "serving":
            logger.info("%s: %s", replica.name, why)
        else:
            logger.warning("%s: %s; its reads go to the primary", replica.name, why)

    async def _dispose_checks(self) -> None:
        await self._primary_check.dispose()
        for replica in self.replicas:
            await replica.check_engine.dispose()


def _replica(number: int, raw_url: str, settings: Settings) -> Replica:
    url = normalize_url(raw_url, "DATABASE_REPLICA_URLS")
    engine = create_engine(
        url,
        settings,
        pool_size=settings.replica_pool_size,
        max_overflow=settings.db_max_overflow,
        primary=False,
    )
    check_engine = create_engine(
        url, settings, pool_size=1, application_name="pat-users-replica-check", primary=False
    )
    host = url.set(username=None, password=None, query={}).render_as_string()
    return Replica(f"replica-{number}", host, engine, check_engine)


async def _scalar(engine: AsyncEngine, statement: TextClause) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(statement)).scalar_one())


class ReplicatedDatabase(Database):
    """Reads on an up-to-date standby when there is one, else on the primary; writes on the
    primary. Each answer notes its position on the call (consistency.py)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], replicas: ReplicaSet) -> None:
        super().__init__(sessions)
        self._replicas = replicas

    async def read(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = current_call()
        chosen = self._replicas.choose(call)
        if chosen is not None:
            replica, unconfirmed = chosen
            try:
                outcome, position = await db.in_one_greenlet(
                    self.sessions(bind=replica.engine), _read_at, _STANDBY_POSITION, work, *args,
                    at_least=unconfirmed, **kwargs,
                )  # fmt: skip
            except Exception as error:
                if not _standby_failed(error):
                    raise
                self._replicas.failed(replica, error)  # and the primary answers instead
            else:
                replica.replayed = max(replica.replayed, position)
                if outcome is not _NOT_YET:
                    return self._settle(replica.name, call, outcome, position)
        # A token past the primary's last known position is checked against its current one.
        unverified = call.required if call is not None else None
        if unverified is not None and unverified <= self._replicas.primary_position:
            unverified = None
        outcome, position = await db.in_one_greenlet(
            self.sessions(), _read_at, _PRIMARY_POSITION, work, *args,
            at_least=unverified, forged_if_short=True, **kwargs,
        )  # fmt: skip
        return self._settle(PRIMARY, call, outcome, position)

    async def write(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result, position = await db.in_one_greenlet(
            self.sessions(), _committed_at, work, *args, **kwargs
        )
        call = current_call()
        if call is not None:
            call.answered_at(position)
        return result

    def _settle(
        self,
        target: str,
        call: CallConsistency | None,
        outcome: T | ServiceError | _NotYet,
        position: int,
    ) -> T:
        self._replicas.reads[target] += 1
        if call is not None:
            call.answered_at(position)
        if isinstance(outcome, ServiceError):
            raise outcome
        assert not isinstance(outcome, _NotYet)
        return outcome


class _NotYet:
    """A standby's answer when it had not replayed the call's position: the primary's turn."""


_NOT_YET = _NotYet()


def _read_at(
    session: Session,
    position: str,
    work: Callable[..., T],
    /,
    *args: Any,
    at_least: int | None = None,
    forged_if_short: bool = False,
    **kwargs: Any,
) -> tuple[T | ServiceError | _NotYet, int]:
    """A read in autocommit, as db.read runs it, answered at a position (`_answered_at`)."""
    return db.autocommit(
        session, _answered_at, position, work, *args,
        at_least=at_least, forged_if_short=forged_if_short, **kwargs,
    )  # fmt: skip


def _answered_at(
    session: Session,
    position: str,
    work: Callable[..., T],
    /,
    *args: Any,
    at_least: int | None,
    forged_if_short: bool,
    **kwargs: Any,
) -> tuple[T | ServiceError | _NotYet, int]:
    """`work`'s answer (a domain error is an answer too), then the position it was given at.

    `at_least`: a position this database must first show it is at. Short of
    it, a standby declines (`_NOT_YET`); the primary (`forged_if_short`)
    refuses the token: a position the primary has not reached was never
    issued by it, so the token is forged, or from another database.
    """
    if at_least is not None:
        reached = _position(session, position)
        if reached < at_least:
            if forged_if_short:
                raise invalid_token("names a position this database has not reached")
            return _NOT_YET, reached
    try:
        outcome: T | ServiceError | _NotYet = work(session, *args, **kwargs)
    except ServiceError as answer:
        outcome = answer
    return outcome, _position(session, position)


class NotAStandby(RuntimeError):
    """A replica URL names a server that was never in recovery (it has no replay position)."""


def _position(session: Session, sql: str) -> int:
    """The WAL position `sql` reads, on the session's connection, through the driver itself.

    A round trip either way; through SQLAlchemy's execution it cost this
    process twice the CPU (80 µs against 35, measured).
    """
    driver = session.connection().connection.dbapi_connection
    assert isinstance(driver, AdaptedConnection)
    try:
        found = driver.run_async(lambda connection: connection.fetchval(sql))
    except Exception as error:
        raise _as_sqlalchemy_raises(session, sql, error) from error
    if found is None:
        raise NotAStandby("pg_last_wal_replay_lsn() is NULL: not a standby")
    return int(found)


# The driver's errors that say its connection is gone (closed, reset, terminated).
_CONNECTION_GONE = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)


def _as_sqlalchemy_raises(session: Session, sql: str, error: Exception) -> sa_exc.DBAPIError:
    """The driver's own error, raised past SQLAlchemy, as SQLAlchemy would have raised it.

    errors.py reads SQLAlchemy's errors (their SQLSTATE, a lost connection);
    a connection that is gone is discarded, as SQLAlchemy discards one, so
    the pool does not hand it out again.
    """
    gone = isinstance(error, _CONNECTION_GONE)
    if gone:
        session.connection().invalidate(error)
    return sa_exc.DBAPIError(sql, None, error, connection_invalidated=gone)


def _standby_failed(error: Exception) -> bool:
    """An error that says the standby, not the call, failed: the primary answers instead."""
    return is_unavailable(error) or is_transaction_conflict(error) or isinstance(error, NotAStandby)


def _committed_at(
    session: Session, work: Callable[..., T], /, *args: Any, **kwargs: Any
) -> tuple[T, int]:
    """`work` in a transaction, then the primary's insert position, read after COMMIT.

    Read after COMMIT returned, so at or after the commit record's end: a
    standby that replayed it shows the write. Before COMMIT it would be too
    early (the commit record comes after). The insert position, not the
    flush position: with synchronous_commit off a COMMIT returns before its
    record is flushed, but never before it is inserted.
    """
    result = db.transaction(session, work, *args, **kwargs)
    try:
        session.connection(execution_options=db.AUTOCOMMIT)
        position = _position(session, _PRIMARY_POSITION)
    finally:
        session.close()
    return result, position
