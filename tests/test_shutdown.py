"""Graceful shutdown of a real `python -m service` process with RPCs in flight."""

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import (
    ServiceProcess,
    create_user,
    eventually,
    fails,
    health_status,
    hold_row_lock,
    run_sql,
    service_queries_waiting_for_locks,
    subprocess_env,
    wait_until_serving,
)

# Each holds a connection: 40 leave room on the tests' PostgreSQL (the embedded
# one allows 300: service/embedded.py) for the session-wide test servers,
# PgBouncer and the change feeds.
IN_FLIGHT = 40
DRAIN_SECONDS = 2.0


async def test_sigterm_drains_finishes_in_flight_rpcs_and_exits_0(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    env = subprocess_env(
        DATABASE_URL=url,
        GRPC_PORT="0",
        SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        SHUTDOWN_GRACE_SECONDS="20",
        DB_POOL_SIZE=str(IN_FLIGHT + 5),
    )
    spawned = time.monotonic()
    child = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
            ready_after = time.monotonic() - spawned
            stub = UserServiceStub(channel)
            user = await create_user(stub)

            # Hold the user's row so that every UpdateUser is still running at SIGTERM.
            lock = await hold_row_lock(url, user.id)
            in_flight = [
                asyncio.ensure_future(
                    stub.UpdateUser(
                        pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name=f"n{i}")),
                        timeout=30,
                    )
                )
                for i in range(IN_FLIGHT)
            ]
            await eventually(lambda: service_queries_waiting_for_locks(url), IN_FLIGHT, within=10)

            child.process.send_signal(signal.SIGTERM)
            term_sent = time.monotonic()
            # During the drain the port is open and health says NOT_SERVING.
            await eventually(
                lambda: health_status(child.address),
                health_pb2.HealthCheckResponse.NOT_SERVING,
                within=DRAIN_SECONDS,
            )
            # After the drain (its end logged), new calls are refused.
            await child.reached("refusing new RPCs", timeout=DRAIN_SECONDS + 20)
            async with grpc.aio.insecure_channel(child.address) as late:
                refused = await fails(
                    UserServiceStub(late).GetUser(pb.GetUserRequest(id=user.id), timeout=2)
                )
                health_refused = await fails(
                    health_pb2_grpc.HealthStub(late).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                )
            assert refused.code == grpc.StatusCode.UNAVAILABLE
            assert health_refused.code == grpc.StatusCode.UNAVAILABLE  # even Health/Check

            await lock.close()  # let the in-flight RPCs finish
            released = time.monotonic()
            replies = await asyncio.gather(*in_flight)
        assert all(reply.user.id == user.id for reply in replies)
        assert await child.wait(timeout=30) == 0, child.text
        exited = time.monotonic()
    finally:
        await child.kill()

    assert "received SIGTERM" in child.text
    assert "draining" in child.text
    assert "refusing new RPCs" in child.text
    assert "server stopped" in child.text
    rows = await run_sql(url, "SELECT version FROM users WHERE id = $1", uuid.UUID(user.id))
    assert rows[0]["version"] == 1 + IN_FLIGHT  # every in-flight update was committed
    print(
        f"start to SERVING {ready_after:.2f}s; SIGTERM to exit {exited - term_sent:.2f}s "
        f"with {IN_FLIGHT} RPCs in flight (drain {DRAIN_SECONDS}s, lock held "
        f"{released - term_sent:.2f}s, exit {exited - released:.2f}s after release)"
    )
