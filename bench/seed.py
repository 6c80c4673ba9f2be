"""Fill the users table fast, straight through asyncpg: one INSERT ... SELECT generate_series.

100,000 users through CreateUser would take longer than the whole benchmark;
one statement takes a second or two. Creation times are one second apart, so
ListUsers' (create_time, id) order is the insertion order.
"""

import asyncio

import asyncpg

from toolkit.databases import asyncpg_dsn

SEED = """
INSERT INTO users (email, display_name, create_time, update_time)
SELECT 'seed-' || n || '@example.com', 'Seeded user ' || n, t, t
FROM generate_series(1, $1) AS n,
     LATERAL (SELECT now() - ($1 - n) * interval '1 second' AS t) AS times
"""


async def _seed(url: str, users: int) -> None:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await connection.execute(SEED, users)
        await connection.execute("ANALYZE users")
    finally:
        await connection.close()


def seed(url: str, users: int) -> None:
    """Insert `users` users named seed-1@example.com ... (blocking)."""
    asyncio.run(_seed(url, users))
