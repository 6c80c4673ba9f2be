"""Helpers the tests share: reading gRPC failures and the database's rows."""

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy.engine import make_url

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.config import Settings
from service.server import RunningServer, start

TEST_PAGE_TOKEN_SECRET = "test-page-token-secret"
# What a worker's RSS stays under in every flood (tests/test_overload.py), and
# what the Kubernetes memory limit must leave room above (tests/test_deploy.py).
WORKER_RSS_CEILING_MB = 400
PROJECT_ROOT = Path(__file__).resolve().parent.parent

DetailT = TypeVar("DetailT", bound=Message)

_DETAIL_TYPES: list[type[Message]] = [
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
]


@dataclass
class Failure:
    """What a caller sees of a failed RPC."""

    code: grpc.StatusCode
    message: str
    details: list[Message]

    def detail(self, kind: type[DetailT]) -> DetailT:
        found = [d for d in self.details if isinstance(d, kind)]
        assert len(found) == 1, f"expected one {kind.__name__} in {self.details}"
        return found[0]

    @property
    def bad_fields(self) -> list[str]:
        return [v.field for v in self.detail(error_details_pb2.BadRequest).field_violations]


async def fails(call: Awaitable[Any]) -> Failure:
    """Await an RPC that must fail and return its status with unpacked details."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return failure_of(raised.value)


def failure_of(error: grpc.aio.AioRpcError) -> Failure:
    """The status of a failed RPC with unpacked details, e.g. from asyncio.gather."""
    status = rpc_status.from_call(error)
    details = [_unpack(d) for d in status.details] if status is not None else []
    return Failure(error.code(), error.details() or "", details)


def _unpack(packed: any_pb2.Any) -> Message:
    for kind in _DETAIL_TYPES:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    raise AssertionError(f"unexpected detail type {packed.type_url}")


async def eventually(
    probe: Callable[[], Awaitable[Any]], expected: Any, within: float = 5.0
) -> None:
    """Poll `probe` until it returns `expected`; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while (last := await probe()) != expected:  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.05)
    assert last == expected


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


async def update_held_on_a_row_lock(url: str, stub: UserServiceStub) -> tuple[Failure, float]:
    """An UpdateUser whose row the test holds locked, with a 10 s deadline.

    Returns its failure and how many seconds it took: a server statement
    timeout ends it well before the caller's deadline.
    """
    user = await create_user(stub)
    lock = await hold_row_lock(url, user.id)
    try:
        request = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="late"))
        started = time.monotonic()
        failure = await fails(stub.UpdateUser(request, timeout=10))
        return failure, time.monotonic() - started
    finally:
        await lock.close()


# The unary ones; WatchUsers streams (tests/test_watch.py).
USER_SERVICE_RPCS = (
    "CreateUser",
    "GetUser",
    "BatchGetUsers",
    "LookupUser",
    "ListUsers",
    "UpdateUser",
    "DeleteUser",
    "UndeleteUser",
)


# Nothing listens on the discard port: connecting is refused at once.
UNREACHABLE_DATABASE_URL = "postgresql://pat:secret@127.0.0.1:9/pat"


async def health_status(address: str, service: str = "") -> int:
    """Health/Check's answer, asked on a fresh channel as a probe would."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


async def create_user(
    stub: UserServiceStub, email: str | None = None, display_name: str = "Test User"
) -> user_pb2.User:
    request = pb.CreateUserRequest(
        user=user_pb2.User(email=email or unique_email(), display_name=display_name)
    )
    return (await stub.CreateUser(request)).user


def asyncpg_dsn(url: str) -> str:
    """A libpq-style DSN asyncpg accepts, from any of our URL forms."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def table_rows(url: str) -> list[tuple[Any, ...]]:
    """Every row of `users`, every column, in a stable order."""
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = await connection.fetch("SELECT * FROM users ORDER BY id")
    finally:
        await connection.close()
    return [tuple(row.values()) for row in rows]


async def run_sql(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()


def _execute_blocking(server_url: str, sql: str) -> None:
    """Run one statement from sync code, even while the test's event loop runs."""

    async def execute() -> None:
        connection = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    with ThreadPoolExecutor(max_workers=1) as worker:
        worker.submit(asyncio.run, execute()).result()


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE on the server of `server_url`; return the new database's URL."""
    _execute_blocking(server_url, f'CREATE DATABASE "{name}"')
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def drop_database(server_url: str, name: str) -> None:
    _execute_blocking(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a `python -m service` or `alembic` child process."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GRPC_PORT")}
    env.update(overrides)
    return env


def server_settings(database_url: str, **overrides: object) -> Settings:
    """Settings for an in-process test server on an ephemeral loopback port."""
    values: dict[str, object] = {
        "database_url": database_url,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "shutdown_drain_seconds": 0,
        "shutdown_grace_seconds": 1,
        "health_check_interval_seconds": 0.2,
        "page_token_secret": TEST_PAGE_TOKEN_SECRET,
        # An in-process server shares its event loop with the test's clients,
        # whose own bursts would read as server lag and shed calls.
        "shed_loop_lag_seconds": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@asynccontextmanager
async def serving(database_url: str, **overrides: object) -> AsyncIterator[RunningServer]:
    """A real grpc.aio server in this process, stopped on exit."""
    running = await start(server_settings(database_url, **overrides), database_url)
    try:
        yield running
    finally:
        await running.stop(drain_seconds=0, grace_seconds=1)


@asynccontextmanager
async def user_service(running: RunningServer) -> AsyncIterator[UserServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield UserServiceStub(channel)


async def wait_until_serving(
    channel: grpc.aio.Channel, service: str = "", timeout: float = 15
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    async for reply in health.Watch(request, timeout=timeout):
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return


class ServiceProcess:
    """`python -m service` as a child process, its log collected as it runs."""

    def __init__(self, process: asyncio.subprocess.Process, until: str) -> None:
        self.process = process
        self.log: list[str] = []
        self.port = 0
        self._until = until
        self._reached = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read_log())

    @classmethod
    async def start(
        cls,
        env: dict[str, str],
        timeout: float = 60,
        command: Sequence[str] = (sys.executable, "-m", "service"),
        until: str = "listening on port",
    ) -> "ServiceProcess":
        """Start `command` in a process group of its own, as a terminal would.

        Returns once a log line contains `until` (by default: the port is open).
        """
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=PROJECT_ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        child = cls(process, until)
        try:
            async with asyncio.timeout(timeout):
                await child._reached.wait()
        except TimeoutError:
            await child.kill()
            raise AssertionError("service did not start:\n" + child.text) from None
        return child

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if match := re.search(r"listening on port (\d+)", line):
                self.port = int(match.group(1))
            if self._until in line:
                self._reached.set()

    @property
    def text(self) -> str:
        return "\n".join(self.log)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait(self, timeout: float = 60) -> int:
        async with asyncio.timeout(timeout):
            code = await self.process.wait()
            await self._reader
        return code

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the whole process group."""
        os.killpg(self.process.pid, signal.SIGINT)

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()


# PgBouncer, for DB_POOLER=pgbouncer: tests/test_pgbouncer.py and `pytest --via-pgbouncer`.

PGBOUNCER_MISSING = (
    "pgbouncer is not installed; .ci/run installs it (Debian: apt-get install pgbouncer)"
)
# Server connections per database: fewer than a test server's clients (pool 10,
# overflow 10, health 1), so they share them, yet enough for the tests that
# keep 10 RPCs waiting on one lock at once.
PGBOUNCER_POOL_SIZE = 12


def pgbouncer_binary() -> str | None:
    """The pgbouncer program; Debian installs it in /usr/sbin, off most users' PATH."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


@dataclass
class PgBouncer:
    """A real PgBouncer in transaction pooling mode, in front of the test PostgreSQL."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def url_for(self, direct_url: str) -> str:
        """The URL that reaches `direct_url`'s database (same role) through PgBouncer."""
        through = make_url(direct_url).set(host="127.0.0.1", port=self.port, query={})
        return through.render_as_string(hide_password=False)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_pgbouncer(binary: str, server_url: str, folder: Path) -> PgBouncer:
    """PgBouncer on a free loopback port, for every database of `server_url`'s server."""
    port = _free_port()
    config = folder / "pgbouncer.ini"
    config.write_text(_pgbouncer_ini(server_url, port))
    config.chmod(0o600)  # it holds the password; PgBouncer reads it before dropping root
    log_path = folder / "pgbouncer.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, *_unprivileged_user(server_url), str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    bouncer = PgBouncer(process, port, log_path)
    try:
        _wait_until_listening(bouncer)
    except BaseException:
        bouncer.stop()
        raise
    return bouncer


def _pgbouncer_ini(server_url: str, port: int) -> str:
    url = make_url(server_url)
    socket_folder = url.query.get("host")  # the embedded server's Unix socket
    upstream = {
        "host": socket_folder if isinstance(socket_folder, str) else url.host or "localhost",
        "port": str(url.port or 5432),
        "user": url.username or "postgres",
        "password": url.password or "",
    }
    connect = " ".join(f"{key}={_ini_quoted(value)}" for key, value in upstream.items() if value)
    # auth_type any: clients log in without a password, and PgBouncer logs in
    # to PostgreSQL as the test role. No server_reset_query_always: the service
    # must leave nothing behind on server connections by itself.
    return f"""\
[databases]
* = {connect}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pool_mode = transaction
default_pool_size = {PGBOUNCER_POOL_SIZE}
max_client_conn = 1000
auth_type = any
"""


def _ini_quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def _unprivileged_user(server_url: str) -> list[str]:
    """`-u USER` when we are root, which PgBouncer refuses to run as.

    The owner of PostgreSQL's socket folder can reach the socket (the embedded
    server's folder is private to it); over TCP, nobody will do.
    """
    if os.geteuid() != 0:
        return []
    socket_folder = make_url(server_url).query.get("host")
    owner = Path(socket_folder).owner() if isinstance(socket_folder, str) else "root"
    return ["-u", owner if owner != "root" else "nobody"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_listening(bouncer: PgBouncer, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if bouncer.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited:\n{bouncer.log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", bouncer.port)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"pgbouncer is not listening after {within}s:\n{bouncer.log}")


async def set_database_statement_timeout(url: str, seconds: float) -> None:
    """What README asks of operators behind PgBouncer: the database bounds statements."""
    name = make_url(url).database
    milliseconds = int(seconds * 1000)
    await run_sql(url, f"ALTER DATABASE \"{name}\" SET statement_timeout = '{milliseconds}ms'")


@asynccontextmanager
async def serving_through(
    bouncer: PgBouncer, database_url: str, **overrides: object
) -> AsyncIterator[RunningServer]:
    """A test server on `database_url`'s database through PgBouncer, set up as README says."""
    through = bouncer.url_for(database_url)
    settings = server_settings(through, db_pooler="pgbouncer", **overrides)
    await set_database_statement_timeout(database_url, settings.db_statement_timeout_seconds)
    # The change feed LISTENs on MIGRATION_DATABASE_URL: direct, as README says.
    pooled = {"db_pooler": "pgbouncer", "migration_database_url": database_url}
    async with serving(through, **pooled, **overrides) as running:
        yield running


async def prepared_statements_per_server_connection(through_pgbouncer: str) -> list[int]:
    """pg_prepared_statements' size on each server connection of the database's pool.

    Each probe keeps its transaction, and so its server connection, until all
    have counted: together they visit every server connection of the pool.
    Their own statements are unnamed (no statement cache) and not counted.
    """
    all_counted = asyncio.Barrier(PGBOUNCER_POOL_SIZE)

    async def count() -> int:
        connection = await asyncpg.connect(asyncpg_dsn(through_pgbouncer), statement_cache_size=0)
        try:
            async with connection.transaction():
                counted = await connection.fetchval("SELECT count(*) FROM pg_prepared_statements")
                await all_counted.wait()
        finally:
            await connection.close()
        return int(counted)

    return list(await asyncio.gather(*(count() for _ in range(PGBOUNCER_POOL_SIZE))))
