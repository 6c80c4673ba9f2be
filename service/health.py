"""The standard grpc.health.v1 service, driven by a database watcher.

Both "" (the whole server) and pat.users.v1.UserService report SERVING only
while the database answers and its schema is at the migrations' head; the
watcher re-checks every HEALTH_CHECK_INTERVAL_SECONDS, so an outage shows as
NOT_SERVING within interval + timeout (1.5 s by default).

The watcher has a connection of its own: a pool busy with RPCs is load, not
an outage, and must not take the server out of a load balancer's rotation.
For the same reason its checks run on an event loop of their own, on a
thread: when RPCs keep the server's loop busy, a check's timeout still
measures the database, not the wait behind them (loop_lag.py measures that).

The RPC pool is renewed when the database comes back only if the checks had
lost their connection (the server went away or restarted); after a mere
timeout the pooled connections are still good and are kept.
"""

import asyncio
import logging

from grpc_health.v1 import health, health_pb2
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.check_loop import CheckLoop

USER_SERVICE_NAME = "pat.users.v1.UserService"
# Readiness: can this server answer UserService calls now?
SERVICE_NAMES = ("", USER_SERVICE_NAME)
# Liveness: is the process itself responsive? SERVING from start to shutdown,
# whatever the database does, so that an outage does not restart every pod.
LIVENESS_NAME = "liveness"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

logger = logging.getLogger(__name__)


class _Problem:
    """Why the service cannot serve now, and whether its connections were lost."""

    def __init__(self, reason: str, *, connection_lost: bool = False) -> None:
        self.reason = reason
        self.connection_lost = connection_lost


class DatabaseHealth:
    """Keeps the health servicer's statuses in step with the database."""

    def __init__(
        self,
        engine: AsyncEngine,
        app_engine: AsyncEngine,
        head_revision: str,
        *,
        interval: float,
        timeout: float = 1.0,
    ) -> None:
        """`engine` is the watcher's own (used on its own loop); `app_engine` the RPCs'."""
        self.servicer = health.aio.HealthServicer()
        # What the servicer answers for each name, kept here to be read (metrics.py).
        self.statuses: dict[str, int] = {}
        # How many checks the watcher has acted on: what shows it is alive.
        self.checks_done = 0
        self._engine = engine
        self._app_engine = app_engine
        self._head_revision = head_revision
        self._interval = interval
        self._timeout = timeout
        self._serving: bool | None = None
        self._connection_lost = False
        self._task: asyncio.Task[None] | None = None
        self._checks = CheckLoop("database-health")

    async def start(self) -> None:
        """NOT_SERVING until the first check passes, then keep watching."""
        await self._set(LIVENESS_NAME, SERVING)
        await self._set_all(NOT_SERVING)
        self._task = asyncio.create_task(self._watch(), name="database-health")

    async def enter_graceful_shutdown(self) -> None:
        """Every name NOT_SERVING for good; the watcher stops and closes its connection."""
        await self._stop_watching()
        await self.servicer.enter_graceful_shutdown()
        self.statuses = dict.fromkeys(self.statuses, NOT_SERVING)
        await self._checks.run(self._engine.dispose())
        self._checks.close()

    async def _stop_watching(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await self._check_once()
            await asyncio.sleep(self._interval)

    async def _check_once(self) -> None:
        problem = await self._checks.run(self._problem())
        try:
            await self._act_on(problem)
        finally:
            self.checks_done += 1

    async def _act_on(self, problem: _Problem | None) -> None:
        if problem is not None and problem.connection_lost:
            self._connection_lost = True
        serving = problem is None
        if serving == self._serving:
            return
        if problem is not None:
            logger.warning("health is NOT_SERVING: %s", problem.reason)
        else:
            await self._recovered()
        self._serving = serving
        await self._set_all(SERVING if serving else NOT_SERVING)

    async def _recovered(self) -> None:
        if self._serving is None:
            logger.info("database ready; health is SERVING")
        elif self._connection_lost:
            # The database went away: pooled connections from before are dead,
            # and without this the first RPC on each of them would fail.
            await self._app_engine.dispose()
            logger.info("database is back; pool renewed; health is SERVING")
        else:
            logger.info("database answers in time again; pool kept; health is SERVING")
        self._connection_lost = False

    async def _problem(self) -> _Problem | None:
        """Why the service cannot serve now, or None if it can. Runs on the check loop."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._engine.connect() as connection:
                    revision = await connection.scalar(
                        text("SELECT max(version_num) FROM alembic_version")
                    )
        except TimeoutError:
            return _Problem("the database did not answer in time")
        except ProgrammingError:  # alembic_version does not exist
            return _Problem("the database has no migrations applied")
        except Exception as error:  # the watcher must outlive every database failure
            reason = f"the database is unreachable ({type(error).__name__})"
            return _Problem(reason, connection_lost=True)
        if revision != self._head_revision:
            return _Problem(f"the schema is at {revision}, not at head {self._head_revision}")
        return None

    async def _set_all(self, status: int) -> None:
        for name in SERVICE_NAMES:
            await self._set(name, status)

    async def _set(self, name: str, status: int) -> None:
        await self.servicer.set(name, status)
        self.statuses[name] = status
