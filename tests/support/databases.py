"""The tests' databases: migrated ones, their rows, and locks held on them."""

import asyncio
import uuid
from typing import Any

import asyncpg

from toolkit.databases import asyncpg_dsn, migrate_to_head, run_sql

# Nothing listens on the discard port: connecting is refused at once.
UNREACHABLE_DATABASE_URL = "postgresql://pat:secret@127.0.0.1:9/pat"


async def migrated(url: str) -> str:
    """`url`, once its database is migrated to head (in a thread: Alembic runs its own loop)."""
    await asyncio.to_thread(migrate_to_head, url)
    return url


async def table_rows(url: str) -> list[tuple[Any, ...]]:
    """Every row of `users`, every column, in a stable order."""
    rows = await run_sql(url, "SELECT * FROM users ORDER BY id")
    return [tuple(row.values()) for row in rows]


async def hold_row_lock(url: str, user_id: str) -> asyncpg.Connection:
    """A connection whose open transaction locks the user's row until it closes."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    await connection.execute("BEGIN")
    await connection.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", uuid.UUID(user_id))
    return connection


async def service_queries_waiting_for_locks(url: str, starting_with: str = "") -> int:
    """How many of the service's statements in `url`'s database are blocked on a lock now.

    `starting_with` narrows the count to statements whose SQL begins so (say
    "UPDATE users"): the health watcher and other servers' pools on the same
    PostgreSQL share the application_name, and a count that includes them can
    make a test pass for the wrong reason.
    """
    rows = await run_sql(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'pat-users' "
        "AND state = 'active' AND wait_event_type = 'Lock' AND starts_with(query, $1)",
        starting_with,
    )
    return int(rows[0]["n"])
