"""The pool under overload: bounded waits with a retryable status, and clean cancellation.

More concurrent calls than connections wait for a connection at most until
the pool timeout (or their deadline) and then get UNAVAILABLE; thousands of
calls cancelled in the middle of their query leave no query running in
PostgreSQL and every connection back in the pool.
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from service.server import RunningServer
from tests.support import (
    create_user,
    eventually,
    fails,
    hold_row_lock,
    run_sql,
    service_queries_waiting_for_locks,
    serving,
    user_service,
)

POOL_SIZE = 4
CANCELLED_CALLS = 10_000
WAVE = 100  # calls in flight at once while cancelling


@pytest.fixture
async def small_pool(
    migrated_database: Callable[[], Awaitable[str]],
) -> AsyncIterator[tuple[RunningServer, str]]:
    url = await migrated_database()
    settings = {
        "db_pool_size": POOL_SIZE,
        "db_max_overflow": 0,
        "db_pool_timeout_seconds": 0.5,
        "max_concurrent_rpcs": 2 * WAVE,
        "max_concurrent_rpcs_per_caller": 2 * WAVE,  # one caller's calls fill the pool
    }
    async with serving(url, **settings) as running:
        yield running, url


async def service_queries_running(url: str) -> int:
    rows = await run_sql(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'pat-users' AND state <> 'idle'",
    )
    return int(rows[0]["n"])


def rename(user_id: str, name: str) -> pb.UpdateUserRequest:
    return pb.UpdateUserRequest(user=user_pb2.User(id=user_id, display_name=name))


async def test_calls_past_the_pool_wait_for_the_pool_timeout_then_unavailable(
    small_pool: tuple[RunningServer, str],
) -> None:
    running, url = small_pool
    async with user_service(running) as stub:
        user = await create_user(stub)
        lock = await hold_row_lock(url, user.id)
        try:
            holders = [
                asyncio.ensure_future(stub.UpdateUser(rename(user.id, f"h{n}"), timeout=30))
                for n in range(POOL_SIZE)
            ]
            await eventually(lambda: service_queries_waiting_for_locks(url, "UPDATE"), POOL_SIZE)
            started = time.monotonic()
            failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=30))
            waited = time.monotonic() - started
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            assert 0.4 < waited < 3  # the pool timeout (0.5 s), not the 30 s deadline
            # A deadline shorter than the pool timeout ends the wait first.
            failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=0.2))
            assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await lock.close()
        assert len({(await call).user.etag for call in holders}) == POOL_SIZE


async def test_thousands_of_calls_cancelled_mid_query_leave_nothing_behind(
    small_pool: tuple[RunningServer, str], caplog: pytest.LogCaptureFixture
) -> None:
    running, url = small_pool
    async with user_service(running) as stub:
        user = await create_user(stub)
        lock = await hold_row_lock(url, user.id)
        outcomes: Counter[grpc.StatusCode] = Counter()
        try:
            await eventually(lambda: service_queries_running(url), 0)
            for first in range(0, CANCELLED_CALLS, WAVE):
                # Every call blocks on the row lock (or waits for a connection)
                # until its deadline cancels it. The first wave lives long
                # enough to see every connection in the middle of its UPDATE.
                deadline = 2.0 if first == 0 else 0.05
                calls = asyncio.gather(
                    *(
                        stub.UpdateUser(rename(user.id, f"c{n}"), timeout=deadline)
                        for n in range(first, first + WAVE)
                    ),
                    return_exceptions=True,
                )
                if first == 0:
                    await eventually(
                        lambda: service_queries_waiting_for_locks(url, "UPDATE"), POOL_SIZE
                    )
                for result in await calls:
                    assert isinstance(result, grpc.aio.AioRpcError), result
                    outcomes[result.code()] += 1
        finally:
            await lock.close()
        assert set(outcomes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
        # Thousands were cancelled by their deadline; the rest waited past the pool
        # timeout behind connections being reset after a cancellation.
        assert outcomes[grpc.StatusCode.DEADLINE_EXCEEDED] > CANCELLED_CALLS // 10, outcomes
        # No query is left running, and every connection is back in the pool.
        await eventually(lambda: service_queries_running(url), 0)
        await eventually(lambda: asyncio.sleep(0, running.engine.pool.checkedout()), 0)  # type: ignore[attr-defined]
        assert running.engine.pool.checkedin() <= POOL_SIZE  # type: ignore[attr-defined]
        # Cleaning up after a cancelled call is not itself cancelled half-way.
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []
        # The pool serves at full width again, and nothing was written.
        replies = await asyncio.gather(
            *(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=5) for _ in range(2 * POOL_SIZE))
        )
        assert {reply.user.etag for reply in replies} == {user.etag}
