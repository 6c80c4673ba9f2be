"""What callers see when the database misbehaves: retryable codes, no internals."""

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from tests.support import (
    UNREACHABLE_DATABASE_URL,
    create_user,
    eventually,
    fails,
    health_status,
    hold_row_lock,
    more_health_checks,
    run_sql,
    service_queries_waiting_for_locks,
    serving,
    update_held_on_a_row_lock,
    user_service,
)

# Things that must never reach a caller.
LEAKS = ("SELECT", "UPDATE", "users", "Traceback", "asyncpg", "sqlalchemy", "postgres", "127.0.0.1")


def assert_no_internals(message: str) -> None:
    for leak in LEAKS:
        assert leak not in message, f"{leak!r} leaked in {message!r}"


async def test_unreachable_database_is_unavailable() -> None:
    async with serving(UNREACHABLE_DATABASE_URL) as running, user_service(running) as stub:
        failure = await fails(stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), timeout=10))
        assert failure.code == grpc.StatusCode.UNAVAILABLE
        assert_no_internals(failure.message)
        assert "secret" not in failure.message


# The caller's deadline: short, yet long enough on a busy machine to see the
# RPC's UPDATE waiting in PostgreSQL before the deadline cancels it.
CANCEL_DEADLINE = 1.0


async def test_caller_deadline_cancels_the_database_work(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()

    def waiting_updates() -> Awaitable[int]:
        return service_queries_waiting_for_locks(url, starting_with="UPDATE users")

    async with serving(url) as running, user_service(running) as stub:
        user = await create_user(stub)
        lock = await hold_row_lock(url, user.id)
        try:
            request = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="late"))
            call = asyncio.ensure_future(fails(stub.UpdateUser(request, timeout=CANCEL_DEADLINE)))
            # First see the RPC's UPDATE queued behind the lock, before its deadline: had it
            # never got there, "no UPDATE is waiting" below would prove nothing.
            await eventually(waiting_updates, 1, within=CANCEL_DEADLINE)
            failure = await call
            assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
            # The blocked UPDATE is cancelled in PostgreSQL, not left waiting for the lock.
            await eventually(waiting_updates, 0)
        finally:
            await lock.close()
        # Nothing was written, and the pool is healthy again.
        assert (
            await stub.GetUser(pb.GetUserRequest(id=user.id))
        ).user.display_name == user.display_name
        assert running.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_statement_timeout_is_deadline_exceeded(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with (
        serving(url, db_statement_timeout_seconds=0.3) as running,
        user_service(running) as stub,
    ):
        failure, took = await update_held_on_a_row_lock(url, stub)
        assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # The client's own 10 s deadline would give DEADLINE_EXCEEDED too: the server's
        # message and a failure well before that deadline show the 0.3 s statement
        # timeout cut the wait for the lock short.
        assert failure.message == "the database took too long; the work was cancelled"
        assert took < 2, f"took {took:.1f}s"
        assert_no_internals(failure.message)


async def test_exhausted_pool_is_unavailable(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    settings = {"db_pool_size": 1, "db_max_overflow": 0, "db_pool_timeout_seconds": 0.3}
    async with serving(url, **settings) as running, user_service(running) as stub:
        user = await create_user(stub)
        lock = await hold_row_lock(url, user.id)
        try:
            blocked = asyncio.ensure_future(
                stub.UpdateUser(
                    pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="x"))
                )
            )
            await eventually(
                lambda: service_queries_waiting_for_locks(url), 1
            )  # the one connection waits
            failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=10))
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            assert_no_internals(failure.message)
            # A busy pool is load, not an outage: health keeps saying SERVING,
            # after checks seen to run while the pool is busy.
            await more_health_checks(running, 3)
            assert (
                await health_status(f"127.0.0.1:{running.port}")
                == health_pb2.HealthCheckResponse.SERVING
            )
        finally:
            await lock.close()
        assert (await blocked).user.display_name == "x"


async def test_unexpected_error_is_generic_internal(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with serving(url) as running, user_service(running) as stub:
        user = await create_user(stub, email="private@example.com")
        # Break the schema under the running service: its SELECT now fails in SQL.
        await run_sql(url, "ALTER TABLE users RENAME COLUMN display_name TO name")
        failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id)))
        assert failure.code == grpc.StatusCode.INTERNAL
        assert failure.message == "internal error"
        assert failure.details == []
