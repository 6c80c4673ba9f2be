"""Build, start and gracefully stop the grpc.aio server.

One port carries UserService, grpc.health.v1.Health and server reflection.
The per-RPC wrapper of every UserService handler (authentication, admission,
undecodable requests, error mapping, the access log) is composed here, once,
when the handlers are registered: a server interceptor would cost a
coroutine chain on every call.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

import asyncio
import logging
import resource
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from pat.users.v1 import user_service_pb2, user_service_pb2_grpc
from service.access_log import AccessLog, new_access_log
from service.admission import Admission
from service.auth import ANONYMOUS, Authenticator, new_authenticator
from service.change_feed import ChangeFeed, FeedSettings
from service.config import Settings
from service.db import create_engine, create_sessions, normalize_url
from service.errors import (
    Behavior,
    Unauthenticated,
    Undecodable,
    UndecodableRequest,
    abort,
    tolerant,
)
from service.health import DatabaseHealth
from service.loop_lag import LoopLag
from service.memory import trim_forever
from service.migrations import head_revision, migration_database_url
from service.page_tokens import PageTokens
from service.resume_tokens import ResumeTokens
from service.servicer import UserService
from service.tls import add_port

if TYPE_CHECKING:  # loaded only when enabled: _start_metrics, _start_tracing
    from opentelemetry.sdk.trace.export import SpanExporter

    from service.metrics import Metrics
    from service.tracing import Tracing

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
    metrics: Metrics | None = None
    tracing: Tracing | None = None
    # HEALTH_PORT's plaintext server, carrying grpc.health.v1 alone.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None

    async def stop(self, *, drain_seconds: float, grace_seconds: float) -> None:
        """Graceful stop: NOT_SERVING → drain → refuse new RPCs → finish in-flight ones."""
        logger.info("shutting down: health NOT_SERVING, draining for %.1fs", drain_seconds)
        await self.health.enter_graceful_shutdown()
        await self.feed.close()  # watches end now, resumable: they would hold the drain
        await asyncio.sleep(drain_seconds)
        logger.info("refusing new RPCs; in-flight RPCs have %.1fs to finish", grace_seconds)
        await self.server.stop(grace_seconds)
        if self.health_server is not None:  # probes saw NOT_SERVING until now
            await self.health_server.stop(0)
        await self.engine.dispose()
        await self.loop_lag.stop()
        self.memory_trim.cancel()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.tracing is not None:
            await self.tracing.stop()  # exports the last spans
        logger.info("server stopped")


async def start(
    settings: Settings, database_url: str, *, span_exporter: SpanExporter | None = None
) -> RunningServer:
    """Start serving; `span_exporter` (tests) turns tracing on and receives the spans."""
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
    metrics = _start_metrics(settings, engine, admission, loop_lag, health)
    tracing = _start_tracing(settings, span_exporter)
    server = grpc.aio.server(
        options=_server_options(settings),
        interceptors=_interceptors(tracing, metrics),
    )
    sessions = create_sessions(engine)
    token_secret = _page_token_secret(settings)
    resume_tokens = ResumeTokens(token_secret)
    feed = ChangeFeed(sessions, resume_tokens, _direct_dsn(settings, url), _feed_settings(settings))
    servicer = UserService(sessions, PageTokens(token_secret), feed, resume_tokens)
    guards = Guards(
        new_authenticator(settings.auth_tokens_file, settings.tls_client_ca_file),
        admission,
        new_access_log(settings.access_log, settings.log_format),
    )
    _add_guarded(user_service_pb2_grpc.add_UserServiceServicer_to_server, servicer, server, guards)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    _add_reflection(server, settings.reflection, guards.authenticator)
    port = add_port(server, f"{settings.grpc_host}:{settings.grpc_port}", settings)
    loop_lag.start()
    await health.start()
    feed.start()
    await server.start()
    health_server, health_port = await _start_health_port(settings, health)
    logger.info(
        "listening on port %d (at most %d UserService calls in progress)", port, admission.limit
    )
    memory_trim = asyncio.create_task(trim_forever(), name="memory-trim")
    return RunningServer(
        server,
        port,
        health,
        engine,
        admission,
        loop_lag,
        memory_trim,
        feed,
        metrics=metrics,
        tracing=tracing,
        health_server=health_server,
        health_port=health_port,
    )


async def _start_health_port(
    settings: Settings, health: DatabaseHealth
) -> tuple[grpc.aio.Server | None, int | None]:
    """HEALTH_PORT: grpc.health.v1 alone, in plaintext, for probes that carry no credentials.

    The same servicer as on GRPC_PORT, so both ports give the same answers,
    NOT_SERVING from the first moment of a shutdown included. WORKERS share
    it as they share GRPC_PORT (SO_REUSEPORT; workers.py reserves it when 0).
    """
    if settings.health_port is None:
        return None, None
    server = grpc.aio.server(options=_health_server_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.health_port}")
    await server.start()
    logger.info("health (plaintext, grpc.health.v1 only) on port %d", port)
    return server, port


# Connections HEALTH_PORT holds at once: probes open one per check and close
# it. The cap keeps a flood there from taking descriptors the pool needs.
HEALTH_PORT_CONNECTIONS = 32


def _health_server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_allowed_incoming_connections", HEALTH_PORT_CONNECTIONS),
        ("grpc.max_connection_idle_ms", _ms(settings.grpc_max_connection_idle_seconds)),
        ("grpc.server_handshake_timeout_ms", _ms(settings.grpc_handshake_timeout_seconds)),
        ("grpc.max_receive_message_length", 1024),  # a HealthCheckRequest is a service name
    ]


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


@dataclass(frozen=True)
class Guards:
    """What every UserService call passes in its one wrapper: authentication,
    then admission, with the access log around both."""

    authenticator: Authenticator | None  # None: authentication is off
    admission: Admission
    access_log: AccessLog | None  # None: ACCESS_LOG=false, or INFO not logged


def _add_guarded(
    add_to_server: Any, servicer: object, server: grpc.aio.Server, guards: Guards
) -> None:
    """Register `servicer` with every handler wrapped by `_guarded` (or its streaming kin)."""
    handlers = _Handlers()
    add_to_server(servicer, handlers)
    guarded = {
        name: _guarded_handler(handler, f"/{handlers.service}/{name}", guards)
        if handler.unary_unary is not None
        else _guarded_stream_handler(handler, f"/{handlers.service}/{name}", guards)
        for name, handler in handlers.by_method.items()
    }
    _register(server, handlers.service, guarded)


def _register(
    server: grpc.aio.Server, service: str, by_method: dict[str, grpc.RpcMethodHandler[Any, Any]]
) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, by_method),))
    server.add_registered_method_handlers(service, by_method)


def _guarded_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, guards: Guards
) -> grpc.RpcMethodHandler[Any, Any]:
    assert handler.unary_unary is not None
    assert handler.request_deserializer is not None
    assert handler.response_serializer is not None
    # The wrapper serializes the answer itself and hands grpc bytes: grpc then
    # holds only those until the caller takes them, not the message object too.
    return grpc.unary_unary_rpc_method_handler(
        _guarded(handler.unary_unary, handler.response_serializer, method, guards),
        request_deserializer=tolerant(handler.request_deserializer),
    )


def _guarded(
    behavior: Behavior,
    serialize: Callable[[Any], bytes] | None,
    method: str,
    guards: Guards,
) -> Behavior:
    """`behavior` for authenticated callers only, every error mapped, one access-log line.

    A unary call (`serialize` given) is also admitted under the caps and has
    its answer serialized here. A streaming one (None: it writes its own
    answers) is not admitted under MAX_CONCURRENT_RPCS: a watch lasts as long
    as its caller wants; the change feed caps watches (MAX_WATCHERS) itself.
    Authentication comes before admission: a caller without credentials never
    takes a slot.
    """
    name = method.rpartition("/")[2]
    authenticator, access_log = guards.authenticator, guards.access_log
    admission = guards.admission if serialize is not None else None

    async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        entry = access_log.begin(context) if access_log is not None else None
        caller = ANONYMOUS
        ended = False
        try:
            if authenticator is not None:
                caller = authenticator.identify(context)
                caller.authorize(name)
            if admission is None:
                await _decoded(behavior, request, context)
                ended = True
                return None
            admission.enter(context)
            try:
                # serialize is set whenever admission is (unary calls).
                response = serialize(await _decoded(behavior, request, context))  # type: ignore[misc]
            finally:
                admission.leave()
            admission.sending(context, len(response))
            ended = True
            return response
        except grpc.aio.AbortError:
            raise  # the handler already chose its status
        except Exception as error:
            await abort(context, error, method, entry.echo if entry is not None else ())
        finally:
            if entry is not None:
                entry.write(context, name, caller.name, ended)

    return guarded


async def _decoded(
    behavior: Behavior, request: Any, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    if isinstance(request, Undecodable):
        raise UndecodableRequest()
    return await behavior(request, context)


def _guarded_stream_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, guards: Guards
) -> grpc.RpcMethodHandler[Any, Any]:
    """A server-streaming handler (WatchUsers), wrapped by `_guarded`."""
    assert handler.unary_stream is not None
    assert handler.request_deserializer is not None
    return grpc.unary_stream_rpc_method_handler(
        _guarded(handler.unary_stream, None, method, guards),
        request_deserializer=tolerant(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _add_reflection(
    server: grpc.aio.Server, mode: str, authenticator: Authenticator | None
) -> None:
    """Server reflection: REFLECTION=open to anyone, "authenticated" like UserService, or "off"."""
    if mode == "off":
        return
    if mode == "open":
        reflection.enable_server_reflection(SERVICE_NAMES, server)
        return
    assert authenticator is not None  # config.py: "authenticated" needs a way to authenticate
    handlers = _Handlers()
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(SERVICE_NAMES), handlers
    )
    guarded = {
        name: grpc.stream_stream_rpc_method_handler(
            _authenticated_stream(handler.stream_stream, authenticator),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        for name, handler in handlers.by_method.items()
    }
    _register(server, handlers.service, guarded)


def _authenticated_stream(behavior: Any, authenticator: Authenticator) -> Any:
    """A bidirectional-streaming `behavior` (reflection) for any authenticated caller."""

    async def authenticated(
        requests: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            authenticator.identify(context)
        except Unauthenticated as error:
            await abort(context, error, reflection.SERVICE_NAME)
        async for response in behavior(requests, context):
            yield response

    return authenticated


def _direct_dsn(settings: Settings, database_url: URL) -> str:
    """Where the change feed LISTENs: PostgreSQL itself, never a transaction pooler."""
    variable, configured = migration_database_url(settings)
    direct = normalize_url(configured, variable) if configured else database_url
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


def _start_metrics(
    settings: Settings,
    engine: AsyncEngine,
    admission: Admission,
    loop_lag: LoopLag,
    health: DatabaseHealth,
) -> Metrics | None:
    """METRICS_PORT's endpoint and what it exports."""
    if settings.metrics_port is None:
        return None
    from service.metrics import Metrics

    metrics = Metrics(settings.grpc_host, settings.metrics_port)
    metrics.observe(engine, admission, loop_lag, health)
    return metrics


def _start_tracing(settings: Settings, exporter: SpanExporter | None) -> Tracing | None:
    """Tracing, when OTEL_EXPORTER_OTLP_ENDPOINT (or a test's exporter) asks for it."""
    if settings.otel_exporter_otlp_endpoint is None and exporter is None:
        return None
    from service.tracing import Tracing

    return Tracing(settings.otel_exporter_otlp_endpoint, exporter)


def _interceptors(
    tracing: Tracing | None, metrics: Metrics | None
) -> list[grpc.aio.ServerInterceptor] | None:
    """Only what is enabled: any interceptor at all costs every call a coroutine chain."""
    interceptors = [
        *(tracing.interceptors() if tracing is not None else ()),
        *(metrics.interceptors() if metrics is not None else ()),  # last: it keeps handlers
    ]
    return interceptors or None
