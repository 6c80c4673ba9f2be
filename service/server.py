"""Compose the grpc.aio server from its parts, start it, and stop it gracefully.

One port carries UserService, grpc.health.v1.Health and server reflection;
HEALTH_PORT, when set, carries health alone. This module builds every part
(engine and sessions, health, admission, the change feed, telemetry) and
wires them together; each part's workings live in a module of its own, and
the per-call wrapper of every UserService handler in guards.py.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from pat.users.v1 import user_service_pb2, user_service_pb2_grpc
from service.access_log import LOGGER_NAME as ACCESS_LOGGER
from service.access_log import new_access_log
from service.admission import Admission
from service.auth import Authenticator, new_authenticator
from service.change_feed import ChangeFeed, FeedSettings
from service.change_messages import ChangeMessages
from service.channel_options import health_server_options, server_options
from service.config import Settings
from service.consistency import ConsistencyTokens, ReadYourWrites
from service.db import Database, create_engine, create_sessions, normalize_url
from service.guards import Guards, add_guarded, add_reflection
from service.health import DatabaseHealth
from service.logs import direct_lines
from service.loop_lag import LoopLag
from service.memory import trim_forever
from service.migrations import head_revision, migration_database_url
from service.page_tokens import PageTokens
from service.replicas import ReplicaSet, ReplicatedDatabase
from service.resume_tokens import ResumeTokens
from service.retention import expire_forever
from service.servicer import UserService
from service.telemetry import Wrap, registering
from service.tls import CertificateFiles, add_port

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


@dataclass(frozen=True)
class Credentials:
    """The files Settings names, read and checked: TLS certificates and the callers.

    Read once, when the process starts (`read_credentials`): a missing or
    malformed file stops start-up before anything listens.
    """

    certificates: CertificateFiles | None  # None: GRPC_PORT is plaintext
    authenticator: Authenticator | None  # None: calls are anonymous


def read_credentials(settings: Settings) -> Credentials:
    """Read and check TLS_* and AUTH_TOKENS_FILE; TlsFilesError or CallersFileError if unusable."""
    certificates = None
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        certificates = CertificateFiles(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
    authenticator = new_authenticator(settings.auth_tokens_file, settings.tls_client_ca_file)
    return Credentials(certificates, authenticator)


@dataclass
class RunningServer:
    """A started server and what it owns."""

    server: grpc.aio.Server
    port: int
    health: DatabaseHealth
    engine: AsyncEngine
    admission: Admission
    loop_lag: LoopLag
    feed: ChangeFeed
    background: list[asyncio.Task[None]]  # retention, memory trimming
    metrics: Metrics | None = None
    tracing: Tracing | None = None
    # HEALTH_PORT's plaintext server, carrying grpc.health.v1 alone.
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    replicas: ReplicaSet | None = None  # DATABASE_REPLICA_URLS' standbys

    async def stop(self, *, drain_seconds: float, grace_seconds: float) -> None:
        """Graceful stop: NOT_SERVING → drain → refuse new RPCs → finish in-flight ones."""
        logger.info("shutting down: health NOT_SERVING, draining for %.1fs", drain_seconds)
        await self.health.enter_graceful_shutdown()
        await self.feed.close()  # watches end now, resumable: they would hold the drain
        for task in self.background:
            task.cancel()
        await asyncio.sleep(drain_seconds)
        logger.info("refusing new RPCs; in-flight RPCs have %.1fs to finish", grace_seconds)
        await self.server.stop(grace_seconds)
        if self.health_server is not None:  # probes saw NOT_SERVING until now
            await self.health_server.stop(0)
        await self.engine.dispose()
        if self.replicas is not None:
            await self.replicas.stop()
        await self.loop_lag.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.tracing is not None:
            await self.tracing.stop()  # exports the last spans
        logger.info("server stopped")


async def start(
    settings: Settings,
    database_url: str,
    *,
    credentials: Credentials | None = None,
    span_exporter: SpanExporter | None = None,
) -> RunningServer:
    """Start serving; `span_exporter` (tests) turns tracing on and receives the spans.

    `credentials`: as `read_credentials` gave them (None: read them now).
    PAGE_TOKEN_SECRET must be set (config.with_page_token_secret).
    """
    if settings.page_token_secret is None:
        raise ValueError("PAGE_TOKEN_SECRET is unset: see config.with_page_token_secret")
    credentials = credentials or read_credentials(settings)
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
        settings.caller_share,
        settings.max_unsent_response_bytes,
        loop_lag,
        settings.shed_loop_lag_seconds,
    )
    sessions = create_sessions(engine)
    token_secret = settings.page_token_secret.get_secret_value().encode()
    database, replicas, read_your_writes = _database(settings, url, sessions, token_secret)
    resume_tokens = ResumeTokens(token_secret)
    messages = ChangeMessages(resume_tokens)
    feed = _change_feed(settings, url, sessions, messages, resume_tokens)
    metrics = _start_metrics(settings, engine, admission, loop_lag, health, replicas, feed)
    tracing = _start_tracing(settings, span_exporter)
    server = grpc.aio.server(options=server_options(settings))  # no interceptors: see telemetry
    servicer = UserService(database, PageTokens(token_secret), resume_tokens, feed, messages)
    access_log = new_access_log(
        settings.access_log, settings.log_format, direct_lines(logging.getLogger(ACCESS_LOGGER))
    )
    guards = Guards(credentials.authenticator, admission, access_log, read_your_writes)
    services = registering(server, _telemetry_wraps(tracing, metrics))
    add_guarded(user_service_pb2_grpc.add_UserServiceServicer_to_server, servicer, services, guards)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, services)
    add_reflection(services, settings.reflection, SERVICE_NAMES, credentials.authenticator)
    if metrics is not None:
        metrics.count_unknown_methods(server)  # last: grpc asks generic handlers in order
    port = add_port(server, f"{settings.grpc_host}:{settings.grpc_port}", credentials.certificates)
    loop_lag.start()
    await health.start()
    feed.start()
    if replicas is not None:
        replicas.start()
    await server.start()
    health_server, health_port = await _start_health_port(settings, health)
    logger.info(
        "listening on port %d (at most %d UserService calls in progress)", port, admission.limit
    )
    retention = expire_forever(
        sessions, settings.change_retention, settings.change_retention_interval_seconds
    )
    background = [
        asyncio.create_task(retention, name="change-retention"),
        asyncio.create_task(trim_forever(), name="memory-trim"),
    ]
    return RunningServer(
        server, port, health, engine, admission, loop_lag, feed, background,
        metrics=metrics, tracing=tracing, health_server=health_server, health_port=health_port,
        replicas=replicas,
    )  # fmt: skip


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
    server = grpc.aio.server(options=health_server_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.health_port}")
    await server.start()
    logger.info("health (plaintext, grpc.health.v1 only) on port %d", port)
    return server, port


def _database(
    settings: Settings, url: URL, sessions: async_sessionmaker[AsyncSession], secret: bytes
) -> tuple[Database, ReplicaSet | None, ReadYourWrites | None]:
    """The primary alone; or, with DATABASE_REPLICA_URLS, reads routed and tokens issued."""
    if not settings.database_replica_urls:
        return Database(sessions), None, None
    replicas = ReplicaSet(settings, url)
    database = ReplicatedDatabase(sessions, replicas)
    return database, replicas, ReadYourWrites(ConsistencyTokens(secret))


def _change_feed(
    settings: Settings,
    database_url: URL,
    sessions: async_sessionmaker[AsyncSession],
    messages: ChangeMessages,
    tokens: ResumeTokens,
) -> ChangeFeed:
    """The feed LISTENs on PostgreSQL itself (MIGRATION_DATABASE_URL), never a pooler."""
    variable, configured = migration_database_url(settings)
    direct = normalize_url(configured, variable) if configured else database_url
    listen_dsn = direct.set(drivername="postgresql").render_as_string(hide_password=False)
    feed_settings = FeedSettings(
        poll_seconds=settings.change_poll_seconds,
        heartbeat_seconds=settings.watch_heartbeat_seconds,
        buffer_batches=settings.watch_buffer_batches,
        max_watchers=settings.max_watchers,
        hold_warning_seconds=settings.change_feed_hold_warning_seconds,
    )
    return ChangeFeed(sessions, messages, tokens, listen_dsn, feed_settings)


def _start_metrics(
    settings: Settings,
    engine: AsyncEngine,
    admission: Admission,
    loop_lag: LoopLag,
    health: DatabaseHealth,
    replicas: ReplicaSet | None,
    feed: ChangeFeed,
) -> Metrics | None:
    """METRICS_PORT's endpoint and what it exports."""
    if settings.metrics_port is None:
        return None
    from service.metrics import Metrics

    metrics = Metrics(settings.grpc_host, settings.metrics_port)
    metrics.observe(engine, admission, loop_lag, health)
    metrics.observe_change_feed(feed)
    if replicas is not None:
        metrics.observe_replicas(replicas)
    return metrics


def _start_tracing(settings: Settings, exporter: SpanExporter | None) -> Tracing | None:
    """Tracing, when OTEL_EXPORTER_OTLP_ENDPOINT (or a test's exporter) asks for it."""
    if settings.otel_exporter_otlp_endpoint is None and exporter is None:
        return None
    from service.tracing import Tracing

    return Tracing(settings.otel_exporter_otlp_endpoint, exporter)


def _telemetry_wraps(tracing: Tracing | None, metrics: Metrics | None) -> list[Wrap]:
    """Only what is enabled, each composed once per handler; the span outermost."""
    return [
        *((tracing.traced,) if tracing is not None else ()),
        *((metrics.measured,) if metrics is not None else ()),
    ]
