"""grpc.health.v1: SERVING only when the schema is at head and the database answers."""

import asyncio
import logging
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.health import USER_SERVICE_NAME
from service.server import RunningServer
from tests.support import (
    UNREACHABLE_DATABASE_URL,
    eventually,
    fails,
    health_status,
    migrated,
    more_health_checks,
    serving,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def address(running: RunningServer) -> str:
    return f"127.0.0.1:{running.port}"


@pytest.mark.parametrize("service", ["", USER_SERVICE_NAME])
async def test_serving_when_migrated_and_reachable(
    server: RunningServer, channel: grpc.aio.Channel, service: str
) -> None:
    assert await health_status(address(server), service) == SERVING


async def test_liveness_stays_serving_while_the_database_is_unreachable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.health")

    async def watcher_saw_outage() -> bool:
        return any(
            "health is NOT_SERVING: the database is unreachable" in record.getMessage()
            for record in caplog.records
        )

    async with serving(UNREACHABLE_DATABASE_URL) as running:
        # Readiness is NOT_SERVING from the start anyway: wait until the watcher has
        # actually found the database unreachable, so liveness is asked after an outage
        # was seen, not before anyone looked.
        await eventually(watcher_saw_outage, True)
        assert await health_status(address(running), "liveness") == SERVING
        assert await health_status(address(running), "") == NOT_SERVING
        assert await health_status(address(running), USER_SERVICE_NAME) == NOT_SERVING


async def test_unknown_service_is_not_found(
    server: RunningServer, channel: grpc.aio.Channel
) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    failure = await fails(health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")))
    assert failure.code == grpc.StatusCode.NOT_FOUND


async def test_not_serving_until_migrations_reach_head(new_database: Callable[[], str]) -> None:
    url = new_database()  # empty: no alembic_version yet
    async with (
        serving(url) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=USER_SERVICE_NAME))
        updates = aiter(watch)
        assert (await anext(updates)).status == NOT_SERVING
        await more_health_checks(running, 3)  # watcher rounds seen to run: still not serving
        assert await health_status(address(running)) == NOT_SERVING

        await migrated(url)
        async with asyncio.timeout(5):
            assert (await anext(updates)).status == SERVING  # Watch streams the change
        assert await health_status(address(running)) == SERVING
        watch.cancel()
