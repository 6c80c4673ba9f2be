"""A real PgBouncer in transaction pooling mode, in front of a test or bench PostgreSQL."""

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from toolkit.ports import free_port

PGBOUNCER_MISSING = (
    "pgbouncer is not installed; .ci/run installs it (Debian: apt-get install pgbouncer)"
)


def pgbouncer_binary() -> str | None:
    """The pgbouncer program; Debian installs it in /usr/sbin, off most users' PATH."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


@dataclass
class PgBouncer:
    """A started PgBouncer: its process, its port and its log."""

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
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_pgbouncer(
    server_url: str,
    folder: Path,
    *,
    pool_size: int,
    max_db_connections: int = 0,
    max_clients: int = 1000,
) -> PgBouncer:
    """PgBouncer on a free loopback port, for every database of `server_url`'s server.

    `pool_size` server connections per database and role; `max_db_connections`
    caps a database's connections whatever the roles (0: no cap). Its
    configuration and log go in `folder`. Returns once it listens.
    """
    binary = pgbouncer_binary()
    if binary is None:
        raise FileNotFoundError(PGBOUNCER_MISSING)
    port = free_port()
    config = folder / "pgbouncer.ini"
    config.write_text(_config(server_url, port, pool_size, max_db_connections, max_clients))
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


def _config(
    server_url: str, port: int, pool_size: int, max_db_connections: int, max_clients: int
) -> str:
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
    # to PostgreSQL as the server URL's role. No server_reset_query_always:
    # the service must leave nothing behind on server connections by itself.
    return f"""\
[databases]
* = {connect}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
pool_mode = transaction
default_pool_size = {pool_size}
max_db_connections = {max_db_connections}
max_client_conn = {max_clients}
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


def _wait_until_listening(bouncer: PgBouncer, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if bouncer.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited:\n{bouncer.log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", bouncer.port)):
            return
        time.sleep(0.05)
    raise RuntimeError(f"pgbouncer is not listening after {within}s:\n{bouncer.log}")
