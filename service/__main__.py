"""`python -m service`: serve until SIGTERM or SIGINT, then stop gracefully."""

import os

# The embedded PostgreSQL forks pg_ctl while gRPC's threads run; gRPC's fork
# handlers can crash such children. The service never forks to use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError

from service.config import Settings
from service.db import DatabaseUrlError, normalize_url
from service.embedded import EmbeddedPostgresMissing, embedded_postgres
from service.logs import configure_logging
from service.migrations import upgrade_to_head
from service.server import start

logger = logging.getLogger("service")


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupSignals:
    """Until the event loop takes over, a stop signal is noted, not obeyed at once.

    Start-up then ends at the next step boundary, so an embedded PostgreSQL
    being started, or a migration being applied, is never cut off half-way.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
        logger.info("received %s during start-up; stopping", self.received)


async def serve(settings: Settings, database_url: str, startup: StartupSignals) -> None:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, _on_signal, signum, stop_requested)
    if startup.received:
        return
    running = await start(settings, database_url)
    await stop_requested.wait()
    await running.stop(
        drain_seconds=settings.shutdown_drain_seconds,
        grace_seconds=settings.shutdown_grace_seconds,
    )


def _on_signal(signum: int, stop_requested: asyncio.Event) -> None:
    logger.info("received %s", signal.Signals(signum).name)
    stop_requested.set()


def main() -> int:
    startup = StartupSignals()
    try:
        settings = Settings()
        if settings.database_url is not None:
            normalize_url(settings.database_url)  # fail before anything starts
    except (DatabaseUrlError, ValidationError) as error:
        print(f"pat-users: configuration error: {_one_line(error)}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if settings.database_url is not None:
        asyncio.run(serve(settings, settings.database_url, startup))
        return 0
    try:
        with embedded_postgres(settings.embedded_pg_dir) as database_url:
            if not startup.received:
                upgrade_to_head(database_url)
            asyncio.run(serve(settings, database_url, startup))
    except EmbeddedPostgresMissing as error:
        print(f"pat-users: configuration error: {error}", file=sys.stderr)
        return 2
    return 0


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'_'.join(str(part) for part in e['loc']).upper()}: {e['msg']}"
            for e in error.errors()
        )
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
