"""gRPC channel arguments: what one client, connection or burst can hold of a server.

`server_options` bounds GRPC_PORT (connection age and idleness, handshakes,
streams per connection, keepalive abuse, request size, connections, and the
queue of calls gRPC accepted before the event loop picks them up);
`health_server_options` bounds HEALTH_PORT, which probes alone use.
"""

import resource

from service.config import Settings

# Calls accepted by gRPC before the server picks them up: 300 connections
# with 64 streams each fit. Past twice this, gRPC itself drops calls (CANCELLED).
PENDING_CALLS = 20_000
# Clients may send keepalive pings during calls, no more often than this.
KEEPALIVE_MIN_PING_SECONDS = 10
# File descriptors kept back from client connections: the database pool, the
# health watcher's connection, logs, the embedded PostgreSQL's pipes.
RESERVED_FILE_DESCRIPTORS = 128
# Connections HEALTH_PORT holds at once: probes open one per check and close
# it. The cap keeps a flood there from taking descriptors the pool needs.
HEALTH_PORT_CONNECTIONS = 32

Options = list[tuple[str, int]]


def server_options(settings: Settings) -> Options:
    """Channel arguments that bound what one client or connection can hold."""
    return [
        ("grpc.max_connection_age_ms", _ms(settings.grpc_max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(settings.grpc_max_connection_age_grace_seconds)),
        ("grpc.max_connection_idle_ms", _ms(settings.grpc_max_connection_idle_seconds)),
        ("grpc.server_handshake_timeout_ms", _ms(settings.grpc_handshake_timeout_seconds)),
        ("grpc.max_concurrent_streams", settings.grpc_max_concurrent_streams),
        ("grpc.keepalive_time_ms", _ms(settings.grpc_keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(settings.grpc_keepalive_timeout_seconds)),
        ("grpc.max_allowed_incoming_connections", connection_limit(settings)),
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


def health_server_options(settings: Settings) -> Options:
    """HEALTH_PORT's: few connections, short-lived, and tiny requests."""
    return [
        ("grpc.so_reuseport", 1),
        ("grpc.max_allowed_incoming_connections", HEALTH_PORT_CONNECTIONS),
        ("grpc.max_connection_idle_ms", _ms(settings.grpc_max_connection_idle_seconds)),
        ("grpc.server_handshake_timeout_ms", _ms(settings.grpc_handshake_timeout_seconds)),
        ("grpc.max_receive_message_length", 1024),  # a HealthCheckRequest is a service name
    ]


def connection_limit(settings: Settings) -> int:
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
