"""What one GetUser's database step costs in CPU, without gRPC: the floor under the ratios.

Three ways to read one user, each CALLS times with IN_FLIGHT at once on the
bench's database and event loop, in this process (no server, no network
client competing for the CPU), timed as this process's CPU per call:

- raw: bench/baseline.py's pool acquire, `fetchrow`, release, as it answers GetUser;
- session floor: an AsyncSession from the service's sessionmaker checks a
  connection out in autocommit, runs the raw path's `fetchrow` on that
  connection's asyncpg driver, and closes: SQLAlchemy's execution left out,
  the least that "one AsyncSession from the shared sessionmaker per RPC" costs;
- service: `db.read(sessions, users.get, id)`, the service's whole step.

The ratio targets leave the service little CPU per call beyond the
baseline's (at 0.85, 1/0.85 - 1 = 18 % more): the session floor's excess
over the raw path, set against that budget, says how far a design that
keeps the session can go.
"""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy.orm import Session
from sqlalchemy.util import await_only

from bench.baseline import GET, create_pool, event_loop_runner
from bench.sections import Bench
from service import db, users
from service.config import Settings

CALLS = 20_000
IN_FLIGHT = 32
WARMUP_CALLS = 1_000


def session_cost(bench: Bench, url: str) -> None:
    with event_loop_runner() as runner:
        costs = runner.run(_costs(url, bench.pool_size, uuid.UUID(bench.read_id)))
    bench.report.figures["session_cost_us"] = costs
    bench.report.note(
        f"GetUser's database step alone, CPU per call ({IN_FLIGHT} in flight, no gRPC):"
        f" raw asyncpg {costs['raw']:.0f} µs; the same statement on the asyncpg connection"
        f" of an AsyncSession (checkout, close) {costs['session_floor']:.0f} µs;"
        f" the service's db.read {costs['service']:.0f} µs"
    )


async def _costs(url: str, pool_size: int, user_id: uuid.UUID) -> dict[str, float]:
    engine = db.create_engine(db.normalize_url(url), Settings(), pool_size=pool_size)
    sessions = db.create_sessions(engine)
    pool = await create_pool(url, pool_size)

    async def raw() -> None:
        async with pool.acquire() as connection:
            await connection.fetchrow(GET, user_id)

    async def session_floor() -> None:
        await sessions().run_sync(_fetch_on_driver, user_id)

    async def service() -> None:
        await db.read(sessions, users.get, user_id)

    try:
        return {
            "raw": await _cpu_per_call(raw),
            "session_floor": await _cpu_per_call(session_floor),
            "service": await _cpu_per_call(service),
        }
    finally:
        await pool.close()
        await engine.dispose()


def _fetch_on_driver(session: Session, user_id: uuid.UUID) -> None:
    connection = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    driver = connection.connection.driver_connection
    assert driver is not None
    await_only(driver.fetchrow(GET, user_id))
    session.close()


async def _cpu_per_call(call: Callable[[], Awaitable[None]]) -> float:
    """Microseconds of this process's CPU per call, IN_FLIGHT calls at a time."""

    async def caller(calls: int) -> None:
        for _ in range(calls):
            await call()

    await caller(WARMUP_CALLS)
    started = time.process_time()
    await asyncio.gather(*(caller(CALLS // IN_FLIGHT) for _ in range(IN_FLIGHT)))
    return round((time.process_time() - started) * 1e6 / (CALLS // IN_FLIGHT * IN_FLIGHT), 1)
