"""A deadlock or serialization failure is ABORTED with its own ErrorInfo reason.

PostgreSQL breaks a deadlock by rolling back one side; when that side is an
RPC, the caller is told to retry it, and nothing the RPC wrote survives.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.db import normalize_url
from service.errors import ERROR_DOMAIN, to_rpc_status
from tests.support import (
    asyncpg_dsn,
    create_user,
    eventually,
    failure_of,
    service_queries_waiting_for_locks,
    unique_email,
)
from tests.support.environment import missing


@pytest.fixture
async def own_transaction(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The test's own connection, in a transaction that never runs the deadlock check first.

    PostgreSQL's deadlock check runs in the backend that has waited
    deadlock_timeout for a lock: with 10 s here against the service's 1 s
    default, the service's backend finds the cycle and its transaction is the
    one rolled back.
    """
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await connection.execute("BEGIN")
        try:
            await connection.execute("SET LOCAL deadlock_timeout = '10s'")
        except asyncpg.InsufficientPrivilegeError:
            missing("setting deadlock_timeout needs a superuser role")
        yield connection
    finally:
        await connection.close()


async def test_the_rpc_that_deadlocks_is_aborted_and_writes_nothing(
    stub: UserServiceStub,
    database_url: str,
    own_transaction: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    user_a = await create_user(stub, display_name="A")
    user_b = await create_user(stub, display_name="B")
    contested_email = unique_email("contested")

    # The test's transaction holds B's row and the index entry for the new email.
    await own_transaction.execute(
        "UPDATE users SET email = $1 WHERE id = $2", contested_email, uuid.UUID(user_b.id)
    )
    # The RPC takes A's row, then waits to learn whether that email is taken.
    update_a = asyncio.ensure_future(
        stub.UpdateUser(
            pb.UpdateUserRequest(user=user_pb2.User(id=user_a.id, email=contested_email)),
            timeout=30,
        )
    )
    await eventually(
        lambda: service_queries_waiting_for_locks(database_url, starting_with="UPDATE users"), 1
    )
    # Now the test's transaction waits for A's row: a cycle. Once the service's
    # backend has waited 1 s it finds it, and rolls the RPC back.
    await own_transaction.execute(
        "UPDATE users SET display_name = 'written by the test' WHERE id = $1",
        uuid.UUID(user_a.id),
    )
    await own_transaction.execute("COMMIT")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await update_a
    failure = failure_of(raised.value)
    assert failure.code == grpc.StatusCode.ABORTED
    info = failure.detail(error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("DEADLOCK_DETECTED", ERROR_DOMAIN)
    assert "retry" in failure.message
    assert "deadlock detected" not in failure.message  # PostgreSQL's text stays in the log
    assert any(
        record.levelno == logging.WARNING and "DEADLOCK_DETECTED" in record.getMessage()
        for record in caplog.records
    )

    a_now = (await stub.GetUser(pb.GetUserRequest(id=user_a.id))).user
    b_now = (await stub.GetUser(pb.GetUserRequest(id=user_b.id))).user
    assert (a_now.email, a_now.display_name) == (user_a.email, "written by the test")
    assert (b_now.email, b_now.display_name) == (contested_email, "B")


async def test_a_serialization_failure_maps_to_aborted(
    stub: UserServiceStub, database_url: str
) -> None:
    """The mapping, fed a real 40001 from SQLAlchemy and asyncpg.

    No RPC can cause one: the service's transactions are READ COMMITTED, where
    PostgreSQL waits and re-reads instead of failing. So two REPEATABLE READ
    transactions of the test's own make one, and `to_rpc_status` maps it.
    """
    user = await create_user(stub)
    engine = create_async_engine(normalize_url(database_url))
    update = text("UPDATE users SET display_name = :name WHERE id = :id")
    try:
        async with engine.connect() as first, engine.connect() as second:
            await first.execution_options(isolation_level="REPEATABLE READ")
            await first.execute(text("SELECT 1"))  # its snapshot is taken now
            await second.execute(update, {"name": "second", "id": uuid.UUID(user.id)})
            await second.commit()
            with pytest.raises(DBAPIError) as raised:
                await first.execute(update, {"name": "first", "id": uuid.UUID(user.id)})
    finally:
        await engine.dispose()

    status = to_rpc_status(raised.value, "/pat.users.v1.UserService/UpdateUser")

    assert status.code == grpc.StatusCode.ABORTED.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("SERIALIZATION_FAILURE", ERROR_DOMAIN)
    assert "retry" in status.message
