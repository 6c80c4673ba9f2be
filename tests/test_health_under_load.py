"""Health tells the truth under load: a busy event loop or a slow check is not an outage.

The in-process server shares the test's event loop, so blocking that loop is
exactly what CPU-bound work in a handler does to the server.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from grpc_health.v1 import health_pb2

from pat.users.v1 import user_service_pb2 as pb
from service.server import RunningServer
from tests.support import (
    asyncpg_dsn,
    create_user,
    eventually,
    health_status,
    hog_the_loop,
    more_health_checks,
    run_sql,
    serving,
    user_service,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def running(migrated_database: Callable[[], Awaitable[str]]) -> AsyncIterator[RunningServer]:
    url = await migrated_database()
    async with serving(url, health_check_timeout_seconds=0.5) as server:
        await eventually(lambda: health_status(f"127.0.0.1:{server.port}"), SERVING)
        yield server


async def test_a_stalled_event_loop_is_logged_not_read_as_an_outage(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # Many stalls, each longer than the health check's timeout, with a single
    # loop iteration between them: a check on the server's loop cannot finish.
    for _ in range(6):
        hog_the_loop(0.6)
        await asyncio.sleep(0)
    # The watcher acts on the checks it ran meanwhile, then runs more.
    await more_health_checks(running, 3)
    assert await health_status(f"127.0.0.1:{running.port}") == SERVING
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "NOT_SERVING" in m or "pool renewed" in m]
    lags = [int(m.split()[3]) for m in messages if m.startswith("event loop lag ")]
    assert lags, messages
    assert max(lags) >= 600
    assert running.loop_lag.worst >= 0.6


async def test_a_slow_database_flips_health_but_keeps_the_pool(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url = running.engine.url.render_as_string(hide_password=False)
    async with user_service(running) as stub:
        user = await create_user(stub)
        pooled_before = await service_backends(url)
        # The watcher's query waits on this lock: the database answers too slowly.
        blocker = await asyncpg_connect(url)
        await blocker.execute("BEGIN; LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
        try:
            await eventually(lambda: health_status(f"127.0.0.1:{running.port}"), NOT_SERVING)
        finally:
            await blocker.close()
        await eventually(lambda: health_status(f"127.0.0.1:{running.port}"), SERVING)
        # The same pooled connections serve RPCs: a slow check did not throw them away.
        assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user.id == user.id
        assert pooled_before <= await service_backends(url)
    messages = [record.getMessage() for record in caplog.records]
    assert any("did not answer in time" in m for m in messages), messages
    assert any("pool kept" in m for m in messages), messages
    assert not any("pool renewed" in m for m in messages)


async def asyncpg_connect(url: str):  # type: ignore[no-untyped-def]
    import asyncpg

    return await asyncpg.connect(asyncpg_dsn(url))


async def service_backends(url: str) -> set[int]:
    """Backend process ids of the service's idle pooled connections."""
    rows = await run_sql(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'pat-users' AND state = 'idle'",
    )
    return {row["pid"] for row in rows}
