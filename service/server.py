"""Build, start and gracefully stop the grpc.aio server.

One port carries UserService, grpc.health.v1.Health and server reflection.
The per-RPC wrapper of every UserService handler (admission, undecodable
requests, error mapping) is composed here, once, when the handlers are
registered: a server interceptor would cost a coroutine chain on every call.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

import asyncio
import logging
import resource
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from pat.users.v1 import user_service_pb2, user_service_pb2_grpc
from service.admission import Admission
from service.change_feed import ChangeFeed, FeedSettings
from service.config import Settings
from service.db import create_engine, create_sessions, normalize_url
from service.errors import Behavior, Undecodable, UndecodableRequest, abort, tolerant
from service.health import DatabaseHealth
from service.loop_lag import LoopLag
from service.memory import trim_forever
from service.migrations import head_revision
from service.page_tokens import PageTokens
from service.resume_tokens import ResumeTokens
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
    admission: Admission
    loop_lag: LoopLag
    memory_trim: asyncio.Task[None]
    feed: ChangeFeed

    async def stop(self, *, drain_seconds: float, grace_seconds: float) -> None:
        """Graceful stop: NOT_SERVING → drain → refuse new RPCs → finish in-flight ones."""
        logger.info("shutting down: health NOT_SERVING, draining for %.1fs", drain_seconds)
        await self.health.enter_graceful_shutdown()
        await self.feed.close()  # watches end now, resumable: they would hold the drain
        await asyncio.sleep(drain_seconds)
        logger.info("refusing new RPCs; in-flight RPCs have %.1fs to finish", grace_seconds)
        await self.server.stop(grace_seconds)
        await self.engine.dispose()
        await self.loop_lag.stop()
        self.memory_trim.cancel()
        logger.info("server stopped")


async def start(settings: Settings, database_url: str) -> RunningServer:
    url = normalize_url(database_url)
    engine = create_engine(url, settings)
    health = DatabaseHealth(
        create_engine(url, settings, pool_size=1, application_name="pat-users-health"),
        engine,
        head_revision(),
        interval=settings.health_check_interval_seconds,
        timeout=settings.health_check_timeout_seconds,
    )
    loop_lag = LoopLag(settings.loop_lag_warning_seconds)
    admission = Admission(
        settings.rpc_limit,
        settings.max_unsent_response_bytes,
        loop_lag,
        settings.shed_loop_lag_seconds,
    )
    server = grpc.aio.server(options=_server_options(settings))
    sessions = create_sessions(engine)
    token_secret = _page_token_secret(settings)
    resume_tokens = ResumeTokens(token_secret)
    feed = ChangeFeed(sessions, resume_tokens, _direct_dsn(settings, url), _feed_settings(settings))
    servicer = UserService(sessions, PageTokens(token_secret), feed, resume_tokens)
    _add_guarded(
        user_service_pb2_grpc.add_UserServiceServicer_to_server, servicer, server, admission
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(SERVICE_NAMES, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    loop_lag.start()
    await health.start()
    feed.start()
    await server.start()
    logger.info(
        "listening on port %d (at most %d UserService calls in progress)", port, admission.limit
    )
    memory_trim = asyncio.create_task(trim_forever(), name="memory-trim")
    return RunningServer(server, port, health, engine, admission, loop_lag, memory_trim, feed)


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments that bound what one client or connection can hold."""
    return [
        ("grpc.max_connection_age_ms", _ms(settings.grpc_max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.grpc_max_connection_age_grace_seconds)),
        ("grpc.max_connection_idle_ms", _ms(settings.grpc_max_connection_idle_seconds)),
        ("grpc.server_handshake_timeout_ms", _ms(settings.grpc_handshake_timeout_seconds)),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.keepalive_time_ms", _ms(settings.grpc_keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(settings.grpc_keepalive_timeout_seconds)),
        ("grpc.max_allowed_incoming_connections", _connection_limit(settings)),
        ("grpc.max_receive_message_length", settings.grpc_max_request_bytes),
        # Calls gRPC has accepted but the event loop has not picked up yet. At
        # gRPC's defaults (1,000 / 3,000) a burst is dropped there with
        # CANCELLED before admission control can answer OVERLOADED; these
        # wait instead, and admission answers each within microseconds.
        ("grpc.server.max_pending_requests", PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
        # WORKERS processes share the port (grpc's default on Linux, relied on by workers.py).
        ("grpc.so_reuseport", 1),
        # Keepalive abuse: a client pinging more often than this, or pinging an
        # idle connection at all, gets two strikes and then GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(KEEPALIVE_MIN_PING_SECONDS)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


# Calls accepted by gRPC before the server picks them up: 300 connections
# with 64 streams each fit. Past twice this, gRPC itself drops calls (CANCELLED).
PENDING_CALLS = 20_000
# Clients may send keepalive pings during calls, no more often than this.
KEEPALIVE_MIN_PING_SECONDS = 10
# File descriptors kept back from client connections: the database pool, the
# health watcher's connection, logs, the embedded PostgreSQL's pipes.
RESERVED_FILE_DESCRIPTORS = 128


def _connection_limit(settings: Settings) -> int:
    """GRPC_MAX_CONNECTIONS, or what the open-file limit leaves after the reserve.

    Past the limit, new connections are closed at once, so the process never
    runs out of descriptors for its own database connections.
    """
    if settings.grpc_max_connections is not None:
        return settings.grpc_max_connections
    reserve = RESERVED_FILE_DESCRIPTORS + settings.db_pool_size + settings.db_max_overflow
    return max(1, _raise_open_file_limit() - reserve)


def _raise_open_file_limit() -> int:
    """Lift the soft open-file limit to the hard one (as Go does); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class _Handlers:
    """Stands in for the server in a generated `add_*Servicer_to_server`, to get its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.by_method: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers also come through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, by_method: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.by_method = service, by_method


def _add_guarded(
    add_to_server: Any, servicer: object, server: grpc.aio.Server, admission: Admission
) -> None:
    """Register `servicer` with every unary handler wrapped by `_guarded`."""
    handlers = _Handlers()
    add_to_server(servicer, handlers)
    guarded = {
        name: _guarded_handler(handler, f"/{handlers.service}/{name}", admission)
        if handler.unary_unary is not None
        else _guarded_stream_handler(handler, f"/{handlers.service}/{name}")
        for name, handler in handlers.by_method.items()
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(handlers.service, guarded),)
    )
    server.add_registered_method_handlers(handlers.service, guarded)


def _guarded_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, admission: Admission
) -> grpc.RpcMethodHandler[Any, Any]:
    # UserService has unary RPCs only; a streaming one needs a wrapper of its own.
    assert handler.unary_unary is not None
    assert handler.request_deserializer is not None
    assert handler.response_serializer is not None
    # The wrapper serializes the answer itself and hands grpc bytes: grpc then
    # holds only those until the caller takes them, not the message object too.
    return grpc.unary_unary_rpc_method_handler(
        _guarded(handler.unary_unary, handler.response_serializer, method, admission),
        request_deserializer=tolerant(handler.request_deserializer),
    )


def _guarded(
    behavior: Behavior, serialize: Callable[[Any], bytes], method: str, admission: Admission
) -> Behavior:
    """`behavior` admitted under the caps, its answer serialized, every error mapped."""

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            admission.enter(context)
            try:
                if isinstance(request, Undecodable):
                    raise UndecodableRequest()
                response = serialize(await behavior(request, context))
            finally:
                admission.leave()
            admission.sending(context, len(response))
            return response
        except grpc.aio.AbortError:
            raise  # the handler already chose its status
        except Exception as error:
            await abort(context, error, method)

    return guarded


def _guarded_stream_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A server-streaming handler (WatchUsers) with undecodable requests and errors mapped.

    Not admitted under MAX_CONCURRENT_RPCS: a watch lasts as long as its
    caller wants; the change feed caps watches (MAX_WATCHERS) itself.
    """
    assert handler.unary_stream is not None
    assert handler.request_deserializer is not None
    behavior: Behavior = handler.unary_stream

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            if isinstance(request, Undecodable):
                raise UndecodableRequest()
            await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler already chose its status
        except Exception as error:
            await abort(context, error, method)

    return grpc.unary_stream_rpc_method_handler(
        guarded,
        request_deserializer=tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _direct_dsn(settings: Settings, database_url: URL) -> str:
    """Where the change feed LISTENs: PostgreSQL itself, never a transaction pooler."""
    direct = (
        normalize_url(settings.migration_database_url, "MIGRATION_DATABASE_URL")
        if settings.migration_database_url
        else database_url
    )
    return direct.set(drivername="postgresql").render_as_string(hide_password=False)


def _feed_settings(settings: Settings) -> FeedSettings:
    return FeedSettings(
        poll_seconds=settings.change_poll_seconds,
        heartbeat_seconds=settings.watch_heartbeat_seconds,
        buffer_batches=settings.watch_buffer_batches,
        max_watchers=settings.max_watchers,
        retention=settings.change_retention,
        retention_interval_seconds=settings.change_retention_interval_seconds,
    )


def _page_token_secret(settings: Settings) -> bytes:
    if settings.page_token_secret is not None:
        return settings.page_token_secret.get_secret_value().encode()
    logger.warning(
        "PAGE_TOKEN_SECRET is not set: page tokens will not survive a restart or cross replicas"
    )
    return secrets.token_bytes(32)
