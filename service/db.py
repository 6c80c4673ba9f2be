"""The one engine and the one session factory, and DATABASE_URL's accepted forms."""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, AdaptedConnection, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session
from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry

from service.config import Settings

logger = logging.getLogger(__name__)

ACCEPTED_SCHEMES = ("postgresql", "postgresql+asyncpg")
EXPECTED_FORM = "postgresql+asyncpg://USER:PASSWORD@HOST:5432/DBNAME (or postgresql://...)"


class DatabaseUrlError(ValueError):
    """DATABASE_URL is not a PostgreSQL URL. The message never repeats the URL."""


def normalize_url(raw: str, variable: str = "DATABASE_URL") -> URL:
    """Parse `raw` and switch it to the asyncpg driver.

    Both `postgresql://` and `postgresql+asyncpg://` are accepted, so the app,
    Alembic and docker-compose share one value; anything else is refused.
    """
    try:
        url = make_url(raw)
    except ArgumentError:
        raise DatabaseUrlError(f"{variable} is not a URL; expected {EXPECTED_FORM}") from None
    if url.drivername not in ACCEPTED_SCHEMES:
        raise DatabaseUrlError(
            f"{variable} has scheme {url.drivername!r}; expected {EXPECTED_FORM}"
        )
    return url.set(drivername="postgresql+asyncpg")


def create_engine(
    url: URL,
    settings: Settings,
    *,
    pool_size: int | None = None,
    max_overflow: int = 0,
    application_name: str = "pat-users",
    primary: bool = True,
) -> AsyncEngine:
    """An engine with the configured pool, or `pool_size` and `max_overflow`.

    `application_name` tells its connections apart in pg_stat_activity.
    Behind PgBouncer, connections to the primary check its statement_timeout
    (a standby's follows the primary's: ALTER ROLE and ALTER DATABASE replicate).
    """
    statement_timeout_ms = int(settings.db_statement_timeout_seconds * 1000)
    behind_pgbouncer = settings.db_pooler == "pgbouncer"
    server_settings = {"application_name": application_name}
    if not behind_pgbouncer:
        server_settings["statement_timeout"] = str(statement_timeout_ms)
    engine = create_async_engine(
        url,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=max_overflow if pool_size else settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        connect_args={
            "timeout": settings.db_connect_timeout_seconds,
            "server_settings": server_settings,
            **(_PGBOUNCER_DRIVER_ARGS if behind_pgbouncer else {}),
        },
    )
    if behind_pgbouncer and primary:
        _require_server_statement_timeout(engine, statement_timeout_ms)
    return engine


# PgBouncer in transaction mode runs each transaction (each statement, in
# autocommit) on whichever server connection is free. With its statement cache
# off, asyncpg prepares every statement unnamed and parses it again with each
# execution (asyncpg#1065): no statement outlives its round trip on a server
# connection, so none collides with another client's, none piles up, and
# autocommit works. SQLAlchemy's own cache stays on: it keeps each statement's
# result columns, which saves a Describe round trip per execution. No
# `prepared_statement_name_func`: named statements, even uniquely named, stay
# behind on server connections, and fail in autocommit.
_PGBOUNCER_DRIVER_ARGS = {"statement_cache_size": 0}

_SERVER_STATEMENT_TIMEOUT_MS = (
    "SELECT setting::bigint FROM pg_settings WHERE name = 'statement_timeout'"
)


class StatementTimeoutNotSet(RuntimeError):
    """Behind PgBouncer, PostgreSQL itself does not bound statements as configured."""


def _require_server_statement_timeout(engine: AsyncEngine, limit_ms: int) -> None:
    """Refuse every new connection on which a statement could outrun `limit_ms`.

    PgBouncer refuses statement_timeout in the startup packet, and a plain SET
    would stay on the server connection for other clients. `SET LOCAL` in each
    transaction would hold, but costs BEGIN, SET and COMMIT round trips on every
    RPC, whose statements otherwise run in autocommit with one round trip each.
    So the role or database sets statement_timeout (ALTER ROLE ... SET
    statement_timeout), and each new connection checks it, failing closed.
    """
    reported = False

    def check(dbapi_connection: DBAPIConnection, record: ConnectionPoolEntry) -> None:
        nonlocal reported
        assert isinstance(dbapi_connection, AdaptedConnection)
        timeout_ms = dbapi_connection.run_async(
            lambda driver: driver.fetchval(_SERVER_STATEMENT_TIMEOUT_MS)
        )
        if 0 < timeout_ms <= limit_ms:
            return
        error = StatementTimeoutNotSet(
            "DB_POOLER=pgbouncer: PgBouncer cannot pass statement_timeout on, so the "
            "role or database must set it, at most DB_STATEMENT_TIMEOUT_SECONDS "
            f"({limit_ms} ms), but it is {timeout_ms} ms (0: none); for example "
            f"ALTER ROLE <user> SET statement_timeout = '{limit_ms}ms'"
        )
        if not reported:
            reported = True
            logger.error("%s", error)
        raise error

    event.listen(engine.sync_engine, "connect", check)


def create_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: nothing to reload after a commit (RPCs return the
    # Core rows their statements gave back).
    return async_sessionmaker(engine, expire_on_commit=False)


@dataclass(frozen=True)
class PoolStatus:
    """The RPC pool at one moment (METRICS_PORT exports it)."""

    size: int  # connections kept open when idle: DB_POOL_SIZE
    checked_out: int  # connections in use now
    overflow: int  # connections open beyond `size`, up to DB_MAX_OVERFLOW
    waiters: int  # checkouts waiting for a connection to come back


def pool_status(engine: AsyncEngine) -> PoolStatus:
    """The engine's pool now; read anew each time, as `dispose()` replaces the pool."""
    pool = engine.pool
    assert isinstance(pool, AsyncAdaptedQueuePool)
    # overflow() starts at -size and counts every connection opened: below 0,
    # fewer than `size` are open, which is no overflow.
    return PoolStatus(pool.size(), pool.checkedout(), max(0, pool.overflow()), _waiters(pool))


def _waiters(pool: AsyncAdaptedQueuePool) -> int:
    """Checkouts waiting for a connection, read from private attributes.

    SQLAlchemy counts no waiters: a checkout waits in the asyncio.Queue its
    AsyncAdaptedQueue creates on first use (a memoized `_queue`), as one of
    that queue's `_getters`. tests/test_metrics.py checks this still counts them.
    """
    queue = pool._pool.__dict__.get("_queue")  # absent until the pool's first use
    return len(queue._getters) if queue is not None else 0


P = ParamSpec("P")
T = TypeVar("T")

AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


async def read(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[Concatenate[Session, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """`work(session, *args, **kwargs)` for a read, on a new session in autocommit mode.

    The session comes from the shared sessionmaker as always, but connecting,
    every statement and closing happen inside one `run_sync`: one greenlet per
    RPC instead of one per await, and no close task unless the call is
    cancelled. A read is one statement, which sees one snapshot anyway:
    skipping BEGIN and ROLLBACK saves two of its three round trips.
    """
    return await in_one_greenlet(sessions(), autocommit, work, *args, **kwargs)


async def write(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[Concatenate[Session, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """`work(session, *args, **kwargs)` in a transaction, its session's life in one greenlet.

    A transaction, although every write is a single statement: when the
    caller's deadline cancels the RPC, a statement that still completes (say,
    once a row lock is released) is rolled back instead of committing behind
    a DEADLINE_EXCEEDED.
    """
    return await in_one_greenlet(sessions(), transaction, work, *args, **kwargs)


async def in_one_greenlet(
    session: AsyncSession,
    run: Callable[Concatenate[Session, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """`run(sync_session, *args, **kwargs)`, the session's whole life, in one greenlet."""
    try:
        return await session.run_sync(run, *args, **kwargs)
    except asyncio.CancelledError:
        # Cancelled mid-statement (the caller's deadline): the connection is
        # busy and must be reset or discarded. That happens in a task of its
        # own, which a second cancellation of this one cannot cut short, as
        # AsyncSession's own `async with` does.
        closing = asyncio.ensure_future(session.close())
        closing.add_done_callback(_log_close_failure)
        await asyncio.shield(closing)
        raise


def _log_close_failure(closing: "asyncio.Future[None]") -> None:
    if not closing.cancelled() and (error := closing.exception()) is not None:
        logger.warning("closing a cancelled call's session failed: %r", error)


def autocommit(
    session: Session,
    work: Callable[Concatenate[Session, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    try:
        session.connection(execution_options=AUTOCOMMIT)
        result = work(session, *args, **kwargs)
    except Exception:
        session.close()
        raise
    session.close()
    return result


def transaction(
    session: Session,
    work: Callable[Concatenate[Session, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    try:
        session.begin()
        result = work(session, *args, **kwargs)
        session.commit()
    except Exception:
        session.close()  # rolls back
        raise
    session.close()
    return result


class Database:
    """Where UserService's database work runs: the primary, through the one sessionmaker.

    The servicer says only "read" or "write"; replicas.ReplicatedDatabase
    routes reads to standbys when DATABASE_REPLICA_URLS names some.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def read(
        self, work: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await read(self.sessions, work, *args, **kwargs)

    async def write(
        self, work: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await write(self.sessions, work, *args, **kwargs)
