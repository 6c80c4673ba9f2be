"""The one engine and the one session factory, and DATABASE_URL's accepted forms."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from service.config import Settings

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
    application_name: str = "pat-users",
) -> AsyncEngine:
    """An engine with the configured pool, or a fixed `pool_size` and no overflow.

    `application_name` tells its connections apart in pg_stat_activity.
    """
    statement_timeout_ms = int(settings.db_statement_timeout_seconds * 1000)
    return create_async_engine(
        url,
        pool_size=pool_size or settings.db_pool_size,
        max_overflow=0 if pool_size else settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        connect_args={
            "timeout": settings.db_connect_timeout_seconds,
            "server_settings": {
                "application_name": application_name,
                "statement_timeout": str(statement_timeout_ms),
            },
        },
    )


def create_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: rows stay readable after commit, for to_proto.
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def read_session(
    sessions: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session for a read that is one statement: it runs in autocommit mode.

    One statement sees one consistent snapshot anyway, and skipping BEGIN and
    ROLLBACK saves two of a read's three round trips to PostgreSQL.
    """
    async with sessions() as session:
        await session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        yield session


P = ParamSpec("P")
T = TypeVar("T")

_AUTOCOMMIT = {"isolation_level": "AUTOCOMMIT"}


async def read(
    sessions: async_sessionmaker[AsyncSession],
    work: Callable[Concatenate[Session, P], T],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """`work(session, *args, **kwargs)` for a read, on a new session in autocommit mode.

    The session comes from the shared sessionmaker as always, but connecting,
    every statement and closing happen inside one `run_sync`: one greenlet per
    RPC instead of one per await, and no shielded close task. A read is one
    statement, which sees one snapshot anyway: skipping BEGIN and ROLLBACK
    saves two of its three round trips.
    """
    return await sessions().run_sync(_autocommit, work, *args, **kwargs)


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
    return await sessions().run_sync(_transaction, work, *args, **kwargs)


def _autocommit(
    session: Session,
    work: Callable[Concatenate[Session, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    try:
        session.connection(execution_options=_AUTOCOMMIT)
        return work(session, *args, **kwargs)
    finally:
        # Also on cancellation: the connection goes back to the pool (reset,
        # or discarded if a cancelled query left it unusable).
        session.close()


def _transaction(
    session: Session,
    work: Callable[Concatenate[Session, P], T],
    /,
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    try:
        with session.begin():
            return work(session, *args, **kwargs)
    finally:
        session.close()
