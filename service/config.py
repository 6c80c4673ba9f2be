"""Settings, read once from the environment: values only.

Nothing here reads a file or imports a feature module: the TLS and callers'
files these settings name are read and checked once, at start, by the
wiring (server.py). Every variable is documented in docs/configuration.md;
the defaults suit `make run` on a laptop.
"""

import logging
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger(__name__)


class Settings(BaseSettings):
    """The service's configuration. Field names are the variables' names."""

    model_config = SettingsConfigDict(case_sensitive=False, frozen=True)

    # Unset means: start the embedded PostgreSQL under EMBEDDED_PG_DIR.
    database_url: str | None = None
    # Migrations, and anything else needing a session of its own (advisory
    # locks, LISTEN), connect here: directly to PostgreSQL when DATABASE_URL
    # names a pooler. Unset: DATABASE_URL.
    migration_database_url: str | None = None
    embedded_pg_dir: Path = PROJECT_ROOT / ".data" / "postgres"
    # Streaming standbys of DATABASE_URL's primary, comma-separated, in
    # DATABASE_URL's forms (each may name a PgBouncer in front of its standby).
    # They serve reads that they are up to date enough for (replicas.py and
    # consistency.py). Unset: every call goes to DATABASE_URL, as before.
    database_replica_urls: Annotated[list[str], NoDecode] = []
    # Each standby's pool (its overflow is DB_MAX_OVERFLOW). Unset: DB_POOL_SIZE.
    db_replica_pool_size: int | None = Field(default=None, ge=1)
    # A standby serves token-less reads only while it is at most this far
    # behind the primary: it holds everything the primary held this long ago.
    replica_max_lag_seconds: float = Field(default=5.0, gt=0)
    # How often each standby's position (and the primary's) is read, in the
    # background; reads never wait for it. Also how long a standby that
    # failed a call stays out before it is checked again.
    replica_check_interval_seconds: float = Field(default=0.5, gt=0)

    grpc_host: str = "[::]"
    # 0 picks a free port; the chosen one is logged.
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    # Server processes sharing GRPC_PORT, each with its own pool, limits and
    # health; above 1, this process supervises them (workers.py). 1 in
    # containers, where Kubernetes scales pods; `make run` uses one per core.
    workers: int = Field(default=1, ge=1)

    # Clients keep one HTTP/2 connection for good; closing it after this age
    # (politely, with GOAWAY) makes them reconnect and spread over new replicas.
    grpc_max_connection_age_seconds: float = Field(default=300, gt=0)
    # How long calls on such a connection may still run before it is cut.
    grpc_max_connection_age_grace_seconds: float = Field(default=30, ge=0)

    # Overload: UserService calls in progress at once in this process; a call
    # beyond it is refused at once with UNAVAILABLE (reason OVERLOADED).
    # Unset: 4 x (DB_POOL_SIZE + DB_MAX_OVERFLOW), enough to keep every
    # connection busy with a short queue in front of the pool.
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    # Fair shares: calls in progress one caller may hold at once (times its
    # weight in AUTH_TOKENS_FILE); past it, its calls are refused with
    # UNAVAILABLE (OVERLOADED, saying whose share was full) while others go
    # on. A caller is an authenticated name, or with authentication off a
    # peer address. Unset: half of MAX_CONCURRENT_RPCS.
    max_concurrent_rpcs_per_caller: int | None = Field(default=None, ge=1)
    # No call is started while the event loop runs this late: CPU-bound work
    # queued up, and more would only add to every call's wait.
    shed_loop_lag_seconds: float = Field(default=0.25, gt=0)
    # Memory: answers written but not yet read by their callers. Past this,
    # connections that stopped reading are refused (UNAVAILABLE, OVERLOADED);
    # past four times this, every call is, until the answers drain.
    # Each unsent byte costs about two of memory (the answer, and gRPC's copy).
    max_unsent_response_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024)
    # Concurrent calls (HTTP/2 streams) one client connection may have open;
    # grpcio's client sends more anyway, and those are refused (UNAVAILABLE,
    # REFUSED_STREAM: never started, retried by the shipped service config).
    # Every open stream costs memory in gRPC until the
    # event loop takes it: 64 keeps 200 flooding connections under 400 MB and
    # inside gRPC's queue of waiting calls (below RFC 9113's suggested 100).
    grpc_max_concurrent_streams: int = Field(default=64, ge=1)
    # Client connections this process holds at once. Unset: the open-file limit
    # less a reserve for the database pool, logs and the health watcher.
    grpc_max_connections: int | None = Field(default=None, ge=1)
    # A connection with no call in progress for this long is closed (GOAWAY).
    grpc_max_connection_idle_seconds: float = Field(default=30, gt=0)
    # A new connection must finish its HTTP/2 (and TLS) handshake within this.
    grpc_handshake_timeout_seconds: float = Field(default=5, gt=0)
    # The server pings each connection after this long without traffic from it,
    # and closes it when the ping is not answered within the timeout: dead peers
    # and clients that stopped reading their socket (their answers would sit in
    # memory) are dropped.
    grpc_keepalive_seconds: float = Field(default=30, gt=0)
    grpc_keepalive_timeout_seconds: float = Field(default=10, gt=0)
    # The largest request message accepted; larger ones get RESOURCE_EXHAUSTED.
    # The largest valid request (BatchGetUsers with 1000 ids) is about 40 KB.
    grpc_max_request_bytes: int = Field(default=64 * 1024, ge=1024)

    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    # How long an RPC waits for a pooled connection before UNAVAILABLE.
    db_pool_timeout_seconds: float = Field(default=5.0, gt=0)
    # How long opening a new database connection may take.
    db_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    # Upper bound for one SQL statement, whatever the caller's deadline.
    db_statement_timeout_seconds: float = Field(default=30.0, gt=0)
    # "pgbouncer": DATABASE_URL names PgBouncer in transaction pooling mode. The
    # engine then prepares no named statements, and, as PgBouncer cannot pass
    # statement_timeout on, requires the role or database to set it at most
    # DB_STATEMENT_TIMEOUT_SECONDS (docs/pgbouncer.md).
    db_pooler: Literal["none", "pgbouncer"] = "none"

    health_check_interval_seconds: float = Field(default=0.5, gt=0)
    # How long the database may take to answer a health check.
    health_check_timeout_seconds: float = Field(default=1.0, gt=0)
    # Event-loop lag above this is logged as a warning (at most every 10 s).
    loop_lag_warning_seconds: float = Field(default=0.1, gt=0)
    # After SIGTERM: how long health reports NOT_SERVING before the port closes.
    shutdown_drain_seconds: float = Field(default=2.0, ge=0)
    # After the drain: how long in-flight RPCs may take to finish.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)

    # Signs ListUsers page tokens and WatchUsers resume tokens. Unset: a random
    # key for this run (shared by its workers: `with_page_token_secret`), so
    # tokens do not survive a restart nor cross replicas; set it in production.
    # Empty, or an example's placeholder (CHANGE-ME…), stops start-up.
    page_token_secret: SecretStr | None = None

    # TLS: with a certificate and key, GRPC_PORT serves TLS only. The files are
    # re-read when they change, so certificates rotate without a restart.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # mTLS: clients must present a certificate signed by a CA in this file;
    # its identity (first DNS SAN, else first URI SAN, else the subject's CN)
    # authenticates the caller.
    tls_client_ca_file: Path | None = None
    # A second, plaintext port on GRPC_HOST carrying grpc.health.v1 alone, for
    # probes that speak neither TLS nor tokens (Kubernetes grpc: probes), and
    # `python -m service.probe`. Unset: none; 0 picks a free port (logged).
    health_port: int | None = Field(default=None, ge=0, le=65535)
    # Callers: one `NAME sha256:HEX [METHOD,...]` (bearer token) or
    # `NAME x509 [METHOD,...]` (client certificate) line each
    # (docs/tls-and-callers.md). Set (or with mTLS), UserService calls without
    # valid credentials are UNAUTHENTICATED. Re-read when it changes.
    auth_tokens_file: Path | None = None
    # Server reflection: "open" to anyone, "authenticated" like UserService, or "off".
    reflection: Literal["open", "authenticated", "off"] = "open"
    # Prometheus metrics (grpc.server.* and the service's gauges) at /metrics on
    # this port, on GRPC_HOST's interface. Unset: none. With WORKERS > 1, worker
    # N serves METRICS_PORT + N - 1 (each its own pool and counts); 0: any port.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # OpenTelemetry's standard variable: set, spans of every RPC and its SQL
    # are exported there over OTLP/gRPC (traces' other OTEL_* variables apply).
    otel_exporter_otlp_endpoint: str | None = None
    # One log line per RPC (method, status, duration, peer, caller, request id).
    access_log: bool = True

    # WatchUsers. Changes are kept this long (seconds, or ISO 8601 such as
    # P3D); a resume token older than that fails with OUT_OF_RANGE.
    change_retention: timedelta = Field(default=timedelta(days=3), gt=timedelta(0))
    # How often old changes are deleted (in batches, by one process at a time).
    change_retention_interval_seconds: float = Field(default=60, gt=0)
    # A quiet watch gets a heartbeat (with a fresh resume token) this often.
    watch_heartbeat_seconds: float = Field(default=15, gt=0)
    # Changes are read when the database notifies a commit, and at least this
    # often anyway (notifications are lost through PgBouncer or a reconnect).
    change_poll_seconds: float = Field(default=1.0, gt=0)
    # Responses a watch may have pending before it is ended as too slow
    # (UNAVAILABLE, WATCHER_TOO_SLOW); each holds up to 500 changes.
    watch_buffer_batches: int = Field(default=64, ge=1)
    # Watches open at once in this process (they are not counted in
    # MAX_CONCURRENT_RPCS); beyond it, UNAVAILABLE (OVERLOADED).
    max_watchers: int = Field(default=1000, ge=1)
    # A transaction running this long holds every later change back from
    # the watches (the feed reads only changes of transactions older than
    # every one still running): logged once, naming its pid and application_name.
    change_feed_hold_warning_seconds: float = Field(default=30, gt=0)

    # uvloop (when installed; it is on Linux) or the standard library's loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @property
    def replica_pool_size(self) -> int:
        return self.db_replica_pool_size or self.db_pool_size

    @field_validator("database_replica_urls", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        """`url,url` as the variable holds it; blanks around and between commas are ignored."""
        if isinstance(value, str):
            return [url.strip() for url in value.split(",") if url.strip()]
        return value

    @property
    def rpc_limit(self) -> int:
        """MAX_CONCURRENT_RPCS, or its default derived from the pool."""
        return self.max_concurrent_rpcs or 4 * (self.db_pool_size + self.db_max_overflow)

    @property
    def caller_share(self) -> int:
        """MAX_CONCURRENT_RPCS_PER_CALLER, or half the cap (at least 1)."""
        return self.max_concurrent_rpcs_per_caller or max(1, self.rpc_limit // 2)

    @field_validator("page_token_secret")
    @classmethod
    def _page_token_secret_is_no_placeholder(cls, secret: SecretStr | None) -> SecretStr | None:
        """An empty secret, or one copied from an example, would let anyone forge tokens."""
        if secret is not None:
            letters = "".join(c for c in secret.get_secret_value().lower() if c.isalnum())
            if not letters or letters.startswith("changeme"):
                raise ValueError("is a placeholder or empty: use openssl rand -hex 32")
        return secret

    @model_validator(mode="after")
    def _reflection_can_authenticate(self) -> "Settings":
        """REFLECTION=authenticated with no way to authenticate would be silently open or shut."""
        if (
            self.reflection == "authenticated"
            and self.auth_tokens_file is None
            and self.tls_client_ca_file is None
        ):
            raise ValueError("REFLECTION=authenticated needs AUTH_TOKENS_FILE or mTLS")
        return self

    @model_validator(mode="after")
    def _check_tls_and_health_port(self) -> "Settings":
        """TLS settings complete (a certificate needs its key); distinct ports."""
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS_CERT_FILE and TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("TLS_CLIENT_CA_FILE (mTLS) needs TLS_CERT_FILE and TLS_KEY_FILE")
        if self.health_port and self.health_port == self.grpc_port:
            raise ValueError("HEALTH_PORT must differ from GRPC_PORT")
        return self


def with_page_token_secret(settings: Settings) -> Settings:
    """`settings`, with a random PAGE_TOKEN_SECRET for this run when none is set (warned).

    The one place this is decided, before any server or worker starts: the
    workers of one supervisor inherit it, so a page token verifies in
    whichever worker the next page's call reaches.
    """
    if settings.page_token_secret is not None:
        return settings
    logger.warning(
        "PAGE_TOKEN_SECRET is not set: page tokens will not survive a restart or cross replicas"
    )
    random_secret = SecretStr(secrets.token_urlsafe(32))
    return settings.model_copy(update={"page_token_secret": random_secret})
