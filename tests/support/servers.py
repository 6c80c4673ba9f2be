"""Servers for tests: a real grpc.aio server in this process, and health as a probe asks it."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.config import Settings
from service.server import RunningServer, start
from tests.support.timing import eventually

TEST_PAGE_TOKEN_SECRET = "test-page-token-secret"
# What a worker's RSS stays under in every flood (tests/test_overload.py), and
# what the Kubernetes memory limit must leave room above (tests/test_deploy.py).
WORKER_RSS_CEILING_MB = 400


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


async def more_health_checks(running: RunningServer, count: int = 3, within: float = 15.0) -> None:
    """Until the server's health watcher has acted on `count` more checks.

    What a test asserts a check did not do (flip health, leave a span) is
    only shown once checks have run: this sees them run. The first may have
    begun before this call; each later one began after the watcher had acted
    on the one before. Only this server's watcher counts: another server's on
    the same database (the shared test server's) shows nothing about this one.
    """
    target = running.health.checks_done + count

    async def done() -> int:
        return min(running.health.checks_done, target)

    await eventually(done, target, within)


@asynccontextmanager
async def user_service(running: RunningServer) -> AsyncIterator[UserServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield UserServiceStub(channel)


async def health_status(address: str, service: str = "") -> int:
    """Health/Check's answer, asked on a fresh channel as a probe would."""
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)
