"""DB_POOLER=pgbouncer, against a real PgBouncer in transaction pooling mode.

`make test` also runs the contract's tests through PgBouncer (`pytest
--via-pgbouncer`). These cover what those cannot see: statements left on
server connections, the statement timeout, migrations going direct, and, as
controls, that the traps DB_POOLER=pgbouncer avoids are real on this PgBouncer.
"""

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.db import create_engine, normalize_url
from service.migrations import head_revision
from tests.support import (
    PGBOUNCER_POOL_SIZE,
    PROJECT_ROOT,
    PgBouncer,
    asyncpg_dsn,
    create_user,
    eventually,
    fails,
    health_status,
    prepared_statements_per_server_connection,
    run_sql,
    server_settings,
    serving,
    serving_through,
    set_database_statement_timeout,
    subprocess_env,
    update_held_on_a_row_lock,
    user_service,
    wait_until_serving,
)

NO_STATEMENTS_LEFT = [0] * PGBOUNCER_POOL_SIZE


def logins(bouncer: PgBouncer, url: str) -> int:
    """How many clients have logged in to PgBouncer for `url`'s database."""
    return bouncer.log.count(f"login attempt: db={make_url(url).database} ")


# Service replicas behind the one PgBouncer, each with a pool of its own.
REPLICAS = 3
# 4 calls per user at once, spread over the replicas' channels: under the
# service's 64 streams per connection.
USERS = 40


async def test_replicas_share_server_connections_and_leave_no_statements_behind(
    pgbouncer: PgBouncer, migrated_database: Callable[[], Awaitable[str]]
) -> None:
    url = await migrated_database()
    async with contextlib.AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(serving_through(pgbouncer, url))
            for _ in range(REPLICAS)
        ]
        stubs = [await stack.enter_async_context(user_service(replica)) for replica in replicas]

        def stub(i: int) -> UserServiceStub:
            return stubs[i % REPLICAS]

        # Every kind of statement, from every replica at once: with named
        # statements, clients sharing a server connection would collide.
        users = await asyncio.gather(*(create_user(stub(i)) for i in range(USERS)))
        await asyncio.gather(
            *(
                call
                for i, user in enumerate(users)
                for call in (
                    stub(i).GetUser(pb.GetUserRequest(id=user.id)),
                    stub(i + 1).LookupUser(pb.LookupUserRequest(email=user.email)),
                    stub(i + 2).ListUsers(pb.ListUsersRequest(page_size=10)),
                    stub(i).UpdateUser(
                        pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="x"))
                    ),
                )
            )
        )
    # More clients than server connections: they did share them.
    assert logins(pgbouncer, url) > PGBOUNCER_POOL_SIZE
    through = pgbouncer.url_for(url)
    assert await prepared_statements_per_server_connection(through) == NO_STATEMENTS_LEFT


async def test_control_named_statements_would_be_left_behind(
    pgbouncer: PgBouncer, new_database: Callable[[], str]
) -> None:
    """The count above can fail: unique statement names (SQLAlchemy's recipe) stay."""
    through = pgbouncer.url_for(new_database())
    engine = create_async_engine(
        normalize_url(through),
        poolclass=NullPool,
        connect_args={
            "statement_cache_size": 0,
            "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
        },
    )
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
    assert await prepared_statements_per_server_connection(through) != NO_STATEMENTS_LEFT


async def test_control_cached_statements_are_missing_on_other_server_connections(
    pgbouncer: PgBouncer, new_database: Callable[[], str]
) -> None:
    """asyncpg's own statement cache assumes one server session per client."""
    dsn = asyncpg_dsn(pgbouncer.url_for(new_database()))
    first, second = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
    try:
        await first.fetchval("SELECT 1")  # prepared, named and cached on server connection A
        async with second.transaction():  # holds A: `first` gets another one
            with pytest.raises(asyncpg.InvalidSQLStatementNameError, match="__asyncpg_stmt_"):
                await first.fetchval("SELECT 1")
    finally:
        await first.close()
        await second.close()


async def test_control_statement_timeout_at_connect_is_refused(
    pgbouncer: PgBouncer, new_database: Callable[[], str]
) -> None:
    """Why the engine cannot pass statement_timeout at connect behind PgBouncer."""
    through = pgbouncer.url_for(new_database())
    engine = create_engine(normalize_url(through), server_settings(through, db_pooler="none"))
    try:
        with pytest.raises(DBAPIError, match="unsupported startup parameter: statement_timeout"):
            async with engine.connect():
                pass
    finally:
        await engine.dispose()


async def test_statement_timeout_holds_through_pgbouncer(
    pgbouncer: PgBouncer, migrated_database: Callable[[], Awaitable[str]]
) -> None:
    url = await migrated_database()
    async with (
        serving_through(pgbouncer, url, db_statement_timeout_seconds=0.3) as running,
        user_service(running) as stub,
    ):
        failure, took = await update_held_on_a_row_lock(url, stub)
    assert failure.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server's own message, well before the caller's 10 s: the 0.3 s timeout cut it short.
    assert failure.message == "the database took too long; the work was cancelled"
    assert took < 2, f"took {took:.1f}s"


async def in_log(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return text in caplog.text


@pytest.mark.parametrize("database_timeout", [None, 60.0], ids=["unset", "over-the-limit"])
async def test_a_database_that_does_not_bound_statements_is_refused(
    pgbouncer: PgBouncer,
    migrated_database: Callable[[], Awaitable[str]],
    caplog: pytest.LogCaptureFixture,
    database_timeout: float | None,
) -> None:
    url = await migrated_database()
    if database_timeout is not None:
        await set_database_statement_timeout(url, database_timeout)
    async with (
        serving(pgbouncer.url_for(url), db_pooler="pgbouncer") as running,
        user_service(running) as stub,
    ):
        await eventually(lambda: in_log(caplog, "health is NOT_SERVING"), True)
        failure = await fails(stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), timeout=10))
        status = await health_status(f"127.0.0.1:{running.port}")
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert failure.code == grpc.StatusCode.INTERNAL
    # DB_STATEMENT_TIMEOUT_SECONDS is 30 s: the log says what to set.
    assert "ALTER ROLE <user> SET statement_timeout = '30000ms'" in caplog.text


async def test_alembic_migrates_directly_while_database_url_names_pgbouncer(
    pgbouncer: PgBouncer, new_database: Callable[[], str]
) -> None:
    url = new_database()
    env = subprocess_env(DATABASE_URL=pgbouncer.url_for(url), MIGRATION_DATABASE_URL=url)
    migration = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert migration.returncode == 0, migration.stderr
    assert logins(pgbouncer, url) == 0  # migrations, and their lock, went direct
    rows = await run_sql(url, "SELECT version_num FROM alembic_version")
    assert [row["version_num"] for row in rows] == [head_revision()]
    # The service, through PgBouncer, finds the schema at head; and its logins
    # show that the count above would have seen Alembic's.
    async with (
        serving_through(pgbouncer, url) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        await wait_until_serving(channel)
    assert logins(pgbouncer, url) > 0
