"""PostgreSQL for tests and benchmarks: throw-away servers, databases, statements, migrations."""

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from service.embedded import embedded_postgres
from service.migrations import upgrade_to_head
from toolkit import PROJECT_ROOT
from toolkit.service_process import subprocess_env


@contextmanager
def throwaway_postgres(prefix: str) -> Iterator[str]:
    """An embedded PostgreSQL in a new temporary folder (its name starts with `prefix`).

    Yields the server's URL; the server stops and its folder is deleted when the block exits.
    """
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as folder,
        embedded_postgres(Path(folder) / "pgdata") as url,
    ):
        yield url


def asyncpg_dsn(url: str) -> str:
    """A libpq-style DSN asyncpg accepts, from any of our URL forms."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def run_sql(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """One statement on a connection of its own; its rows."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


def execute(url: str, sql: str) -> Any:
    """Run one statement from blocking code, even while this thread runs an event loop.

    Returns the first value of its first row, if it has one.
    """

    async def on_a_connection_of_its_own() -> Any:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            return await connection.fetchval(sql)
        finally:
            await connection.close()

    with ThreadPoolExecutor(max_workers=1) as worker:
        return worker.submit(asyncio.run, on_a_connection_of_its_own()).result()


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE on the server of `server_url`; return the new database's URL."""
    execute(server_url, f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate_to_head(url: str, checkout: Path = PROJECT_ROOT) -> None:
    """Migrate `url`'s database to the head of `checkout`'s migrations (blocking).

    This checkout's are run in this process; another's (bench.floods
    --server-root) by that checkout's own code, in a process of its own.
    Alembic's env.py runs an event loop of its own: from async code, call
    this in a thread.
    """
    if checkout.resolve() == PROJECT_ROOT:
        upgrade_to_head(url)
        return
    script = "import sys; from service.migrations import upgrade_to_head as up; up(sys.argv[1])"
    subprocess.run(
        [sys.executable, "-c", script, url],
        cwd=checkout,
        env=subprocess_env(checkout),
        check=True,
    )


async def seed_users(url: str, count: int) -> str:
    """At least `count` live users (inserted in one statement); returns one user's id."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        have = await connection.fetchval("SELECT count(*) FROM users WHERE delete_time IS NULL")
        await connection.execute(
            "INSERT INTO users (email, display_name) "
            "SELECT 'flood-' || gen_random_uuid() || '@example.com', 'Flood user ' || n "
            "FROM generate_series(1, $1) AS n",
            max(0, count - have),
        )
        return str(
            await connection.fetchval("SELECT id FROM users ORDER BY create_time, id LIMIT 1")
        )
    finally:
        await connection.close()
