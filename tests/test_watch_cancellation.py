"""Watches their callers cancel leave nothing behind in the server: no memory, no task.

grpcio leaks native memory for every server-streaming call whose handler
catches the cancellation and returns normally (grpc/grpc#43360): the server
then sends a status on a call already cancelled, and that batch's ops are
never freed (about 100 bytes a call: too little for RSS to show in 5,000).
WatchUsers lets the cancellation through, as it must, and the metrics show
it: each cancelled watch ends CANCELLED, none OK. A real `python -m service`
takes 5,000 watches opened and cancelled by their callers, its RSS read from
outside and its tasks from its metrics.
"""

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import ServiceProcess, eventually, subprocess_env, wait_until_serving
from tests.test_metrics import metrics_ports, scrape, value
from toolkit.processes import rss_mb

WATCHES = 5000
AT_ONCE = 50  # under GRPC_MAX_CONCURRENT_STREAMS (64): one connection carries them
WARM_UP = 500
RSS_SLACK_MB = 10
WATCH_USERS = 'grpc_method="pat.users.v1.UserService/WatchUsers"'


async def open_and_cancel(stub: UserServiceStub, count: int) -> None:
    """`count` watches, AT_ONCE at a time: each reads its first answer, then its caller cancels."""

    async def one() -> None:
        call = stub.WatchUsers(pb.WatchUsersRequest())
        await call.read()
        call.cancel()

    for _ in range(count // AT_ONCE):
        await asyncio.gather(*(one() for _ in range(AT_ONCE)))


async def test_cancelled_watches_leave_no_memory_and_no_task_behind(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    env = subprocess_env(
        DATABASE_URL=url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        METRICS_PORT="0",
        ACCESS_LOG="false",
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    child = await ServiceProcess.start(env)
    try:
        (metrics_port,) = metrics_ports(child)
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
            stub = UserServiceStub(channel)
            await open_and_cancel(stub, WARM_UP)  # channels, caches and arenas at their size

            async def tasks() -> float | None:
                scraped = await asyncio.to_thread(scrape, metrics_port)
                return value(scraped, "pat_users_event_loop_tasks")

            async def watchers() -> float | None:
                scraped = await asyncio.to_thread(scrape, metrics_port)
                return value(scraped, "pat_users_change_feed_watchers")

            await eventually(watchers, 0.0, within=10)
            tasks_before, rss_before = await tasks(), rss_mb(child.pid)
            assert tasks_before is not None

            await open_and_cancel(stub, WATCHES)

            await eventually(watchers, 0.0, within=10)
            await eventually(tasks, tasks_before, within=10)

            # Each handler let the cancellation through: none returned as if it had ended well.
            scraped = await asyncio.to_thread(scrape, metrics_port)
            ended = "grpc_server_call_duration_seconds_count"
            assert (
                value(scraped, ended, WATCH_USERS, 'grpc_status="CANCELLED"') == WARM_UP + WATCHES
            )
            assert value(scraped, ended, WATCH_USERS, 'grpc_status="OK"') is None

            async def rss_settled() -> bool:  # glibc hands freed pages back every 10 s
                return rss_mb(child.pid) <= rss_before + RSS_SLACK_MB

            await eventually(rss_settled, True, within=30)
            print(
                f"\nworker RSS {rss_before:.1f} MB before {WATCHES:,} cancelled watches, "
                f"{rss_mb(child.pid):.1f} MB after; {tasks_before:.0f} tasks before and after"
            )
    finally:
        child.stop()
