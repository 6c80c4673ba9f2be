"""METRICS_PORT: a Prometheus scrape of gRPC's standard metrics and the service's own.

The tests scrape a real `python -m service` over HTTP, as Prometheus would.
"""

import asyncio
import re
import socket
import urllib.request
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service import metrics
from service.db import create_engine, normalize_url, pool_status
from tests.support import (
    ServiceProcess,
    create_user,
    eventually,
    fails,
    hold_row_lock,
    server_settings,
    service_queries_waiting_for_locks,
    subprocess_env,
    wait_until_serving,
)

GET_USER = 'grpc_method="pat.users.v1.UserService/GetUser"'
SERVICE_GAUGES = (
    "pat_users_db_pool_size",
    "pat_users_db_pool_checked_out",
    "pat_users_db_pool_overflow",
    "pat_users_db_pool_waiters",
    "pat_users_rpc_in_progress",
    "pat_users_rpc_refused_total",
    "pat_users_rpc_unsent_response_bytes",
    "pat_users_event_loop_lag_seconds",
    "pat_users_event_loop_tasks",
    "pat_users_health_serving",
    "pat_users_change_feed_watchers",
    "pat_users_change_feed_held_back_seconds",
)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def value(scraped: str, name: str, *labels: str) -> float | None:
    """The value of the series `name` whose labels include all of `labels`, or None."""
    for line in scraped.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(label in (match.group(1) or "") for label in labels):
            return float(match.group(2))
    return None


def metrics_ports(child: ServiceProcess) -> list[int]:
    return [int(p) for p in re.findall(r"metrics on port (\d+)", child.text)]


@pytest.fixture
async def service(database_url: str) -> AsyncIterator[ServiceProcess]:
    """A server process with METRICS_PORT (any free one) and room for one call at a time."""
    env = subprocess_env(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        METRICS_PORT="0",
        MAX_CONCURRENT_RPCS="1",
        SHUTDOWN_DRAIN_SECONDS="0",
        PAGE_TOKEN_SECRET="metrics-test",
    )
    child = await ServiceProcess.start(env)
    try:
        yield child
    finally:
        child.process.terminate()
        assert await child.wait() == 0, child.text
        assert "Traceback" not in child.text, child.text


async def test_scrape_counts_every_call_and_shows_the_services_gauges(
    service: ServiceProcess, database_url: str
) -> None:
    (port,) = metrics_ports(service)
    async with grpc.aio.insecure_channel(service.address) as channel:
        await wait_until_serving(channel)
        stub = UserServiceStub(channel)
        user = await create_user(stub)
        # Each call is counted before its answer leaves: no waiting for a batch.
        before = value(scrape(port), "grpc_server_call_started_total", GET_USER)
        assert before is None  # no GetUser yet
        for _ in range(3):
            await stub.GetUser(pb.GetUserRequest(id=user.id))
        unknown = channel.unary_unary("/pat.users.v1.UserService/NoSuchMethod")
        assert (await fails(unknown(b""))).code == grpc.StatusCode.UNIMPLEMENTED
        scraped = scrape(port)
        assert value(scraped, "grpc_server_call_started_total", GET_USER) == 3
        # Methods the server lacks count under one name, whatever callers send.
        assert value(scraped, "grpc_server_call_started_total", 'grpc_method="other"') == 1

        # gRPC's standard metrics, per method and status.
        ok = 'grpc_status="OK"'
        assert value(scraped, "grpc_server_call_duration_seconds_count", GET_USER, ok) == 3
        for size in ("sent", "rcvd"):
            name = f"grpc_server_call_{size}_total_compressed_message_size_bytes"
            assert value(scraped, f"{name}_count", GET_USER) == 3
            assert (value(scraped, f"{name}_sum", GET_USER) or 0) > 0
        # The service's own.
        for gauge in SERVICE_GAUGES:
            assert value(scraped, gauge) is not None, f"{gauge} missing from:\n{scraped}"
        assert value(scraped, "pat_users_db_pool_size") == 10
        assert value(scraped, "pat_users_db_pool_checked_out") == 0
        assert value(scraped, "pat_users_rpc_in_progress") == 0
        assert value(scraped, "pat_users_change_feed_watchers") == 0
        assert value(scraped, "pat_users_change_feed_held_back_seconds") == 0
        for name in ("", "pat.users.v1.UserService", "liveness"):
            assert value(scraped, "pat_users_health_serving", f'service="{name}"') == 1
        assert value(scraped, "pat_users_rpc_refused_total", 'reason="max_concurrent_rpcs"') == 0

        # A call held on a row lock takes the only slot: the next is refused.
        lock = await hold_row_lock(database_url, user.id)
        try:
            request = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="held"))
            held = asyncio.ensure_future(stub.UpdateUser(request, timeout=30))
            await eventually(lambda: service_queries_waiting_for_locks(database_url, "UPDATE"), 1)
            failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id)))
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            during = scrape(port)
        finally:
            await lock.close()
        await held
    assert value(during, "pat_users_rpc_refused_total", 'reason="max_concurrent_rpcs"') == 1
    unavailable = 'grpc_status="UNAVAILABLE"'
    assert value(during, "grpc_server_call_duration_seconds_count", GET_USER, unavailable) == 1
    assert value(during, "pat_users_rpc_refused_total", 'reason="loop_lag"') == 0
    assert value(during, "pat_users_rpc_in_progress") == 1
    assert value(during, "pat_users_db_pool_checked_out") == 1


async def test_workers_serve_metrics_on_consecutive_ports(database_url: str) -> None:
    first = _free_port_pair()
    env = subprocess_env(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        WORKERS="2",
        METRICS_PORT=str(first),
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    child = await ServiceProcess.start(env, until="(2 workers)")  # both listen
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
        # Each worker logs its own port (workers' lines reach the log in any order).
        await eventually(lambda: _logged_metrics_ports(child), [first, first + 1])
        for port in (first, first + 1):
            scraped = await asyncio.to_thread(scrape, port)
            assert value(scraped, "pat_users_db_pool_size") == 10
            assert value(scraped, "pat_users_rpc_in_progress") == 0
    finally:
        child.process.terminate()
        assert await child.wait() == 0, child.text


async def _logged_metrics_ports(child: ServiceProcess) -> list[int]:
    return sorted(metrics_ports(child))


def _free_port_pair() -> int:
    """A port that is free, and so is the next one."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


async def test_pool_waiters_are_counted(database_url: str) -> None:
    """db.pool_status reads waiters from SQLAlchemy's private attributes: still there?"""
    settings = server_settings(database_url, db_pool_size=1, db_max_overflow=0)
    engine = create_engine(normalize_url(database_url), settings)
    try:
        assert pool_status(engine).waiters == 0  # before the pool's first use
        async with engine.connect() as held:
            await held.execute(text("SELECT 1"))
            waiting = [asyncio.ensure_future(_select_one(engine)) for _ in range(2)]
            await eventually(lambda: _waiters(engine), 2)
            status = pool_status(engine)
            assert (status.size, status.checked_out, status.overflow) == (1, 1, 0)
        await asyncio.gather(*waiting)
        assert pool_status(engine).waiters == 0
    finally:
        await engine.dispose()


async def _waiters(engine: AsyncEngine) -> int:
    return pool_status(engine).waiters


async def _select_one(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


async def test_a_failed_start_still_exits(database_url: str) -> None:
    """Nothing METRICS_PORT starts (its HTTP thread) keeps a failed process alive."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = subprocess_env(
            DATABASE_URL=database_url,
            GRPC_HOST="127.0.0.1",
            GRPC_PORT=str(taken.getsockname()[1]),
            METRICS_PORT="0",
        )
        child = await ServiceProcess.start(env, until="metrics on port")
        try:
            assert await child.wait(timeout=20) != 0
        finally:
            await child.kill()
    assert "Failed to bind" in child.text


def test_call_metrics_export_what_prometheus_clients_own_series_would() -> None:
    """CallMetrics keeps plain counts; a scrape shows them as Counter and Histogram show theirs."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    calls = metrics.CallMetrics(ours)
    labels = ("grpc_method", "grpc_status")
    started = Counter(
        "grpc_server_call_started",
        "Number of server calls started",
        ("grpc_method",),
        registry=theirs,
    )
    duration = Histogram(
        "grpc_server_call_duration_seconds",
        "End-to-end time taken to complete a call from server transport's perspective",
        labels,
        buckets=metrics.LATENCY_BUCKETS,
        registry=theirs,
    )
    sent = Histogram(
        "grpc_server_call_sent_total_compressed_message_size_bytes",
        "Compressed message bytes sent per server call",
        labels,
        buckets=metrics.SIZE_BUCKETS,
        registry=theirs,
    )
    received = Histogram(
        "grpc_server_call_rcvd_total_compressed_message_size_bytes",
        "Compressed message bytes received per server call",
        labels,
        buckets=metrics.SIZE_BUCKETS,
        registry=theirs,
    )
    disable_created_metrics()
    calls.method("pat.users.v1.UserService/ListUsers")  # wrapped, never called: no series
    observed = [
        ("pat.users.v1.UserService/GetUser", "OK", 0.0008, 43, 333),  # on a bucket's bound
        ("pat.users.v1.UserService/GetUser", "OK", 0.00081, 43, 1024),
        ("pat.users.v1.UserService/GetUser", "NOT_FOUND", 0.0, 0, 0),
        ("pat.users.v1.UserService/GetUser", "OK", 250.0, 5_000_000_000, 70_000),  # past all
        ("grpc.health.v1.Health/Check", "OK", 1e-05, 2, 7),
    ]
    for name, status, seconds, rcvd, size in observed:
        method = calls.method(name)
        method.started += 1
        method.ended(status, seconds, rcvd, size)
        started.labels(name).inc()
        duration.labels(name, status).observe(seconds)
        received.labels(name, status).observe(rcvd)
        sent.labels(name, status).observe(size)
    calls.method(metrics.OTHER_METHOD).started += 1
    started.labels(metrics.OTHER_METHOD).inc()
    assert generate_latest(ours).decode() == generate_latest(theirs).decode()


async def test_health_and_reflection_are_measured_too(service: ServiceProcess) -> None:
    """Every service on GRPC_PORT has its handlers measured, wrapped when registered."""
    (port,) = metrics_ports(service)
    async with grpc.aio.insecure_channel(service.address) as channel:
        await wait_until_serving(channel)  # Health/Watch
        check = health_pb2_grpc.HealthStub(channel).Check
        for _ in range(2):
            await check(health_pb2.HealthCheckRequest())
    services = await asyncio.to_thread(_services_by_reflection, service.address)
    assert "pat.users.v1.UserService" in services
    scraped = scrape(port)
    health = 'grpc_method="grpc.health.v1.Health/Check"'
    assert value(scraped, "grpc_server_call_started_total", health) == 2
    assert (
        value(scraped, "grpc_server_call_duration_seconds_count", health, 'grpc_status="OK"') == 2
    )
    watch = 'grpc_method="grpc.health.v1.Health/Watch"'
    assert (value(scraped, "grpc_server_call_started_total", watch) or 0) >= 1
    info = 'grpc_method="grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"'
    assert value(scraped, "grpc_server_call_started_total", info) == 1
    assert value(scraped, "grpc_server_call_duration_seconds_count", info, 'grpc_status="OK"') == 1


def _services_by_reflection(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())
