"""`python -m service`: serve until SIGTERM or SIGINT, then stop gracefully.

With WORKERS > 1 this process supervises worker processes that serve (workers.py).
"""

import os

# The embedded PostgreSQL forks pg_ctl while gRPC's threads run; gRPC's fork
# handlers can crash such children. The service never forks to use gRPC.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from service.memory import return_memory_after_peaks

return_memory_after_peaks()  # before gRPC's threads exist

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError

from service.auth import CallersFileError
from service.config import Settings, with_page_token_secret
from service.db import DatabaseUrlError, normalize_url
from service.embedded import EmbeddedPostgresMissing, embedded_postgres
from service.logs import configure_logging
from service.migrations import upgrade_to_head
from service.server import Credentials, read_credentials, start
from service.tls import TlsFilesError
from service.workers import STOP_SIGNALS, SupervisorLink, attach_to_supervisor, supervise

logger = logging.getLogger("service")


class StartupSignals:
    """Until the event loop takes over, a stop signal is noted, not obeyed at once.

    Start-up then ends at the next step boundary, so an embedded PostgreSQL
    being started, or a migration being applied, is never cut off half-way.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note)
        # A worker starts with them blocked (workers.py): held until now, not fatal.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _note(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum).name
        logger.info("received %s during start-up; stopping", self.received)


async def serve(
    settings: Settings,
    database_url: str,
    credentials: Credentials,
    startup: StartupSignals,
    supervisor: SupervisorLink | None = None,
) -> None:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, _on_signal, signum, stop_requested)
    if startup.received:
        return
    running = await start(settings, database_url, credentials=credentials)
    if supervisor is not None:
        supervisor.listening(stop_requested)
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
        for replica_url in settings.database_replica_urls:
            normalize_url(replica_url, "DATABASE_REPLICA_URLS")
    except (DatabaseUrlError, ValidationError) as error:
        return _configuration_error(_one_line(error))
    configure_logging(settings)
    try:
        credentials = read_credentials(settings)
    except (TlsFilesError, CallersFileError) as error:
        return _configuration_error(_credentials_problem(error))
    settings = with_page_token_secret(settings)
    if settings.database_url is not None:
        return _run(settings, settings.database_url, credentials, startup)
    try:
        with embedded_postgres(settings.embedded_pg_dir) as database_url:
            if not startup.received:
                upgrade_to_head(database_url)
            return _run(settings, database_url, credentials, startup)
    except EmbeddedPostgresMissing as error:
        return _configuration_error(str(error))


def _run(
    settings: Settings, database_url: str, credentials: Credentials, startup: StartupSignals
) -> int:
    """Serve in this process or, with WORKERS > 1, supervise worker processes that do."""
    if settings.workers > 1:
        return asyncio.run(supervise(settings, database_url, startup))
    with _event_loop_runner(settings) as runner:
        runner.run(serve(settings, database_url, credentials, startup, attach_to_supervisor()))
    return 0


def _event_loop_runner(settings: Settings) -> asyncio.Runner:
    """uvloop where it is installed (Linux, the image) unless EVENT_LOOP=asyncio.

    grpc.aio runs on it unchanged (its completion queue is watched with
    add_reader), and the loop's own overhead per RPC shrinks.
    """
    if settings.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            logger.info("uvloop is not installed; using asyncio's event loop")
        else:
            logger.info("event loop: uvloop")
            return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def _configuration_error(problem: str) -> int:
    """Say what is wrong in one line; the exit status of a configuration error."""
    print(f"pat-users: configuration error: {problem}", file=sys.stderr)
    return 2


def _credentials_problem(error: TlsFilesError | CallersFileError) -> str:
    # Worded as when Settings' validators read these files (docs show such a line).
    if isinstance(error, CallersFileError):
        return f"AUTH_TOKENS_FILE: Value error, {error}"
    return f"Value error, {error}"


def _one_line(error: Exception) -> str:
    if isinstance(error, ValidationError):
        # A check of several variables together (a model validator) names none.
        return "; ".join(
            f"{'_'.join(str(part) for part in e['loc']).upper()}: {e['msg']}"
            if e["loc"]
            else e["msg"]
            for e in error.errors()
        )
    return str(error)


if __name__ == "__main__":
    sys.exit(main())
