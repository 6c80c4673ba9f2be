"""Build, start and gracefully stop the grpc.aio server.

One port carries UserService, grpc.health.v1.Health and server reflection.
"""

import asyncio
import logging
import secrets
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine

from pat.users.v1 import user_service_pb2, user_service_pb2_grpc
from service.config import Settings
from service.db import create_engine, create_sessions, normalize_url
from service.errors import ErrorMappingInterceptor
from service.health import DatabaseHealth
from service.migrations import head_revision
from service.page_tokens import PageTokens
from service.servicer import UserService

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


@dataclass
class RunningServer:
    """A started server and what it owns."""

    server: grpc.aio.Server
    port: int
    health: DatabaseHealth
    engine: AsyncEngine

    async def stop(self, *, drain_seconds: float, grace_seconds: float) -> None:
        """Graceful stop: NOT_SERVING → drain → refuse new RPCs → finish in-flight ones."""
        logger.info("shutting down: health NOT_SERVING, draining for %.1fs", drain_seconds)
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(drain_seconds)
        logger.info("refusing new RPCs; in-flight RPCs have %.1fs to finish", grace_seconds)
        await self.server.stop(grace_seconds)
        await self.engine.dispose()
        logger.info("server stopped")


async def start(settings: Settings, database_url: str) -> RunningServer:
    url = normalize_url(database_url)
    engine = create_engine(url, settings)
    health = DatabaseHealth(
        create_engine(url, settings, pool_size=1),
        engine,
        head_revision(),
        interval=settings.health_check_interval_seconds,
    )
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor()],
        options=[
            ("grpc.max_connection_age_ms", int(settings.grpc_max_connection_age_seconds * 1000)),
            (
                "grpc.max_connection_age_grace_ms",
                int(settings.grpc_max_connection_age_grace_seconds * 1000),
            ),
        ],
    )
    user_service_pb2_grpc.add_UserServiceServicer_to_server(
        UserService(create_sessions(engine), PageTokens(_page_token_secret(settings))), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    await health.start()
    await server.start()
    logger.info("listening on port %d", port)
    return RunningServer(server, port, health, engine)


def _page_token_secret(settings: Settings) -> bytes:
    if settings.page_token_secret is not None:
        return settings.page_token_secret.get_secret_value().encode()
    logger.warning(
        "PAGE_TOKEN_SECRET is not set: page tokens will not survive a restart or cross replicas"
    )
    return secrets.token_bytes(32)
