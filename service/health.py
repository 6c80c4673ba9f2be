"""The standard grpc.health.v1 service, driven by a database watcher.

Both "" (the whole server) and pat.users.v1.UserService report SERVING only
while the database answers and its schema is at the migrations' head; the
watcher re-checks every HEALTH_CHECK_INTERVAL_SECONDS, so an outage shows as
NOT_SERVING within interval + timeout (1.5 s by default).

The watcher has a connection of its own: a pool busy with RPCs is load, not
an outage, and must not take the server out of a load balancer's rotation.
"""

import asyncio
import logging

from grpc_health.v1 import health, health_pb2
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

USER_SERVICE_NAME = "pat.users.v1.UserService"
# Readiness: can this server answer UserService calls now?
SERVICE_NAMES = ("", USER_SERVICE_NAME)
# Liveness: is the process itself responsive? SERVING from start to shutdown,
# whatever the database does, so that an outage does not restart every pod.
LIVENESS_NAME = "liveness"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

logger = logging.getLogger(__name__)


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
        """`engine` is the watcher's own; `app_engine` the one RPCs use."""
        self.servicer = health.aio.HealthServicer()
        self._engine = engine
        self._app_engine = app_engine
        self._head_revision = head_revision
        self._interval = interval
        self._timeout = timeout
        self._serving: bool | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """NOT_SERVING until the first check passes, then keep watching."""
        await self.servicer.set(LIVENESS_NAME, SERVING)
        await self._set_all(NOT_SERVING)
        self._task = asyncio.create_task(self._watch(), name="database-health")

    async def enter_graceful_shutdown(self) -> None:
        """Every name NOT_SERVING for good; the watcher stops and closes its connection."""
        await self._stop_watching()
        await self.servicer.enter_graceful_shutdown()
        await self._engine.dispose()

    async def _stop_watching(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await self._check_once()
            await asyncio.sleep(self._interval)

    async def _check_once(self) -> None:
        reason = await self._problem()
        serving = reason is None
        if serving == self._serving:
            return
        if not serving:
            logger.warning("health is NOT_SERVING: %s", reason)
        elif self._serving is None:
            logger.info("database ready; health is SERVING")
        else:
            # Pooled connections from before the outage are dead; without this,
            # the first RPC on each of them would fail.
            await self._app_engine.dispose()
            logger.info("database is back; pool renewed; health is SERVING")
        self._serving = serving
        await self._set_all(SERVING if serving else NOT_SERVING)

    async def _problem(self) -> str | None:
        """Why the service cannot serve now, or None if it can."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._engine.connect() as connection:
                    revision = await connection.scalar(
                        text("SELECT max(version_num) FROM alembic_version")
                    )
        except TimeoutError:
            return "the database did not answer in time"
        except ProgrammingError:  # alembic_version does not exist
            return "the database has no migrations applied"
        except Exception as error:  # the watcher must outlive every database failure
            return f"the database is unreachable ({type(error).__name__})"
        if revision != self._head_revision:
            return f"the schema is at {revision}, not at head {self._head_revision}"
        return None

    async def _set_all(self, status: int) -> None:
        for name in SERVICE_NAMES:
            await self.servicer.set(name, status)
