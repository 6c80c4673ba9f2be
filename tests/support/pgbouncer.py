"""The tests behind PgBouncer (DB_POOLER=pgbouncer): tests/test_pgbouncer.py and `--via-pgbouncer`."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from sqlalchemy.engine import make_url

from service.server import RunningServer
from tests.support.servers import server_settings, serving
from toolkit.databases import asyncpg_dsn, run_sql
from toolkit.pgbouncer import PgBouncer, start_pgbouncer

# Server connections per database: fewer than a test server's clients (pool 10,
# overflow 10, health 1), so they share them, yet enough for the tests that
# keep 10 RPCs waiting on one lock at once.
PGBOUNCER_POOL_SIZE = 12


def start_test_pgbouncer(server_url: str, folder: Path) -> PgBouncer:
    """PgBouncer in front of every database of the tests' PostgreSQL, PGBOUNCER_POOL_SIZE each."""
    return start_pgbouncer(server_url, folder, pool_size=PGBOUNCER_POOL_SIZE)


async def set_database_statement_timeout(url: str, seconds: float) -> None:
    """What docs/pgbouncer.md asks of operators behind PgBouncer: the database bounds statements."""
    name = make_url(url).database
    milliseconds = int(seconds * 1000)
    await run_sql(url, f"ALTER DATABASE \"{name}\" SET statement_timeout = '{milliseconds}ms'")


@asynccontextmanager
async def serving_through(
    bouncer: PgBouncer, database_url: str, **overrides: object
) -> AsyncIterator[RunningServer]:
    """A test server on `database_url`'s database through PgBouncer, set up as the docs say."""
    through = bouncer.url_for(database_url)
    settings = server_settings(through, db_pooler="pgbouncer", **overrides)
    await set_database_statement_timeout(database_url, settings.db_statement_timeout_seconds)
    # The change feed LISTENs on MIGRATION_DATABASE_URL: direct, as the docs say.
    pooled = {"db_pooler": "pgbouncer", "migration_database_url": database_url}
    async with serving(through, **pooled, **overrides) as running:
        yield running


async def prepared_statements_per_server_connection(through_pgbouncer: str) -> list[int]:
    """pg_prepared_statements' size on each server connection of the database's pool.

    Each probe keeps its transaction, and so its server connection, until all
    have counted: together they visit every server connection of the pool.
    Their own statements are unnamed (no statement cache) and not counted.
    """
    all_counted = asyncio.Barrier(PGBOUNCER_POOL_SIZE)

    async def count() -> int:
        connection = await asyncpg.connect(asyncpg_dsn(through_pgbouncer), statement_cache_size=0)
        try:
            async with connection.transaction():
                counted = await connection.fetchval("SELECT count(*) FROM pg_prepared_statements")
                await all_counted.wait()
        finally:
            await connection.close()
        return int(counted)

    return list(await asyncio.gather(*(count() for _ in range(PGBOUNCER_POOL_SIZE))))
