"""Admission control and connection limits, seen from a real client.

Over MAX_CONCURRENT_RPCS a call is refused at once with UNAVAILABLE (reason
OVERLOADED, with RetryInfo); health is never refused; the per-connection
stream cap, the request size cap, idle and handshake timeouts and the
connection cap hold.
"""

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.server import RunningServer
from tests.support import (
    UNREACHABLE_DATABASE_URL,
    create_user,
    eventually,
    fails,
    health_status,
    hog_the_loop,
    hold_row_lock,
    run_sql,
    service_queries_waiting_for_locks,
    serving,
    user_service,
)

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
async def migrated_url(migrated_database: Callable[[], Awaitable[str]]) -> str:
    return await migrated_database()


def blocked_update(stub: UserServiceStub, user_id: str, name: str) -> "asyncio.Future[object]":
    """An UpdateUser that stays in progress while the test holds the user's row lock."""
    request = pb.UpdateUserRequest(user=user_pb2.User(id=user_id, display_name=name))
    return asyncio.ensure_future(stub.UpdateUser(request, timeout=30))


@pytest.fixture
async def two_slot_server(migrated_url: str) -> AsyncIterator[RunningServer]:
    # One caller (one connection) fills the server: its share is the whole cap.
    settings = {"max_concurrent_rpcs": 2, "max_concurrent_rpcs_per_caller": 2}
    async with serving(migrated_url, **settings) as running:
        yield running


async def test_call_over_the_cap_is_refused_at_once_with_overloaded(
    two_slot_server: RunningServer, migrated_url: str
) -> None:
    async with user_service(two_slot_server) as stub:
        user = await create_user(stub)
        lock = await hold_row_lock(migrated_url, user.id)
        try:
            held = [blocked_update(stub, user.id, f"held {n}") for n in range(2)]
            await eventually(lambda: service_queries_waiting_for_locks(migrated_url, "UPDATE"), 2)

            started = time.monotonic()
            failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=10))
            assert time.monotonic() - started < 1  # refused, not queued until the deadline
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            assert failure.detail(error_details_pb2.ErrorInfo).reason == "OVERLOADED"
            assert failure.detail(error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() > 0
            # Probes are never refused: health is outside admission.
            assert await health_status(f"127.0.0.1:{two_slot_server.port}") == SERVING
        finally:
            await lock.close()
        assert {(await call).user.display_name for call in held} == {"held 0", "held 1"}  # type: ignore[attr-defined]
        # The slots are free again.
        assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user.id == user.id


async def test_cancelled_and_timed_out_calls_give_their_slot_back(
    two_slot_server: RunningServer, migrated_url: str
) -> None:
    async with user_service(two_slot_server) as stub:
        user = await create_user(stub)
        lock = await hold_row_lock(migrated_url, user.id)
        try:
            timed_out = stub.UpdateUser(
                pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="late")),
                timeout=0.5,
            )
            cancelled = blocked_update(stub, user.id, "cancelled")
            await eventually(lambda: service_queries_waiting_for_locks(migrated_url, "UPDATE"), 2)
            assert (await fails(timed_out)).code == grpc.StatusCode.DEADLINE_EXCEEDED
            cancelled.cancel()
            await eventually(lambda: service_queries_waiting_for_locks(migrated_url, "UPDATE"), 0)
            # Both slots are free although the row is still locked.
            replies = await asyncio.gather(
                *(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=5) for _ in range(2))
            )
            assert [reply.user.id for reply in replies] == [user.id, user.id]
        finally:
            await lock.close()


async def test_one_connection_runs_at_most_max_concurrent_streams_calls(migrated_url: str) -> None:
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # channels share one by default
    async with (
        serving(migrated_url, grpc_max_concurrent_streams=2) as running,
        user_service(running) as stub,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=own_connection) as apart,
    ):
        user, other = await create_user(stub), await create_user(stub)
        lock = await hold_row_lock(migrated_url, user.id)
        other_lock = await hold_row_lock(migrated_url, other.id)
        try:
            calls = [blocked_update(stub, user.id, f"n{n}") for n in range(3)]
            await eventually(lambda: service_queries_waiting_for_locks(migrated_url, "UPDATE"), 2)
            # A call made after the third, on a connection of its own, reaches the
            # server: it takes new calls, and the third waits in the client.
            later = blocked_update(UserServiceStub(apart), other.id, "later")
            await eventually(lambda: updates_waiting_behind(migrated_url, other_lock), 1)
            assert await service_queries_waiting_for_locks(migrated_url, "UPDATE") == 2 + 1
        finally:
            await asyncio.gather(lock.close(), other_lock.close())
        assert len({(await call).user.etag for call in calls}) == 3  # type: ignore[attr-defined]
        await later


async def updates_waiting_behind(url: str, lock: asyncpg.Connection) -> int:
    """How many of the service's UPDATEs wait for a lock the connection `lock` holds.

    Only the first waiter for a row: the next ones wait behind that one.
    """
    rows = await run_sql(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'pat-users' "
        "AND starts_with(query, 'UPDATE') AND $1 = ANY(pg_blocking_pids(pid))",
        lock.get_server_pid(),
    )
    return int(rows[0]["n"])


async def test_request_over_the_size_cap_is_resource_exhausted(stub: UserServiceStub) -> None:
    request = pb.CreateUserRequest(
        user=user_pb2.User(email="a@example.com", display_name="x" * 70_000)
    )
    failure = await fails(stub.CreateUser(request))
    assert failure.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in failure.message


async def test_idle_connection_is_closed(migrated_url: str) -> None:
    async with (
        serving(migrated_url, grpc_max_connection_idle_seconds=0.5) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        await create_user(UserServiceStub(channel))
        assert channel.get_state() == grpc.ChannelConnectivity.READY

        async def state() -> grpc.ChannelConnectivity:
            return channel.get_state()

        await eventually(state, grpc.ChannelConnectivity.IDLE, within=15)  # the server sent GOAWAY


def closed_by_server(connection: socket.socket, within: float) -> bool:
    """Read until the server closes `connection` (True) or `within` seconds pass."""
    connection.settimeout(within)
    try:
        while connection.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


async def test_connection_that_never_speaks_http2_is_dropped() -> None:
    async with serving(UNREACHABLE_DATABASE_URL, grpc_handshake_timeout_seconds=0.5) as running:
        with socket.create_connection(("127.0.0.1", running.port)) as silent:
            started = time.monotonic()
            assert await asyncio.to_thread(closed_by_server, silent, 5)
            assert time.monotonic() - started < 2


async def test_connections_past_the_cap_are_closed_and_slots_come_back() -> None:
    settings = {"grpc_max_connections": 2, "grpc_handshake_timeout_seconds": 1}
    async with serving(UNREACHABLE_DATABASE_URL, **settings) as running:
        address = ("127.0.0.1", running.port)
        held = [socket.create_connection(address) for _ in range(2)]
        try:
            with socket.create_connection(address) as third:
                assert await asyncio.to_thread(closed_by_server, third, 0.5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_status(f"127.0.0.1:{running.port}", "liveness")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # The silent connections time out of their handshake; new clients get in.
            await eventually(lambda: liveness_or_none(running), SERVING, within=10)
        finally:
            for connection in held:
                connection.close()


async def liveness_or_none(running: RunningServer) -> int | None:
    """Health/Check of "liveness", or None while the server refuses the connection."""
    try:
        return await health_status(f"127.0.0.1:{running.port}", "liveness")
    except grpc.aio.AioRpcError:
        return None


async def test_no_call_starts_while_the_event_loop_lags(migrated_url: str) -> None:
    shed_lag = 0.05
    async with (
        serving(migrated_url, shed_loop_lag_seconds=shed_lag) as running,
        user_service(running) as stub,
    ):
        user = await create_user(stub)
        for _ in range(3):  # the lag sampler measures the stall right after it
            hog_the_loop(0.3)
            await asyncio.sleep(0.01)
        failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), timeout=5))
        assert failure.code == grpc.StatusCode.UNAVAILABLE
        assert failure.detail(error_details_pb2.ErrorInfo).reason == "OVERLOADED"

        async def lagging() -> bool:
            return running.loop_lag.last >= shed_lag  # what admission sheds at

        await eventually(lagging, False, within=15)  # the loop keeps up again
        assert (await stub.GetUser(pb.GetUserRequest(id=user.id), timeout=5)).user.id == user.id
