"""WORKERS=2: `python -m service` as a supervisor of worker processes sharing one port."""

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import psutil

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import (
    PROJECT_ROOT,
    ServiceProcess,
    create_user,
    eventually,
    subprocess_env,
    wait_until_serving,
)

WORKERS = 2
DRAIN_SECONDS = 0.5
GRACE_SECONDS = 2.0
CONNECTIONS = 16  # all on one worker by chance: 2 in 2**16


def workers_env(**overrides: str) -> dict[str, str]:
    return subprocess_env(
        WORKERS=str(WORKERS),
        GRPC_PORT="0",
        SHUTDOWN_DRAIN_SECONDS=str(DRAIN_SECONDS),
        SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        HEALTH_CHECK_INTERVAL_SECONDS="0.2",
        **overrides,
    )


def worker_pids(service: ServiceProcess) -> list[int]:
    return [
        int(pid) for pid in re.findall(r"started worker \d+ of \d+ \(pid (\d+)\)", service.text)
    ]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def all_gone(pids: list[int]) -> bool:
    return all(gone(pid) for pid in pids)


def client_connections(pid: int, port: int) -> int:
    """Established connections to `port` that process `pid` accepted."""
    return sum(
        1
        for connection in psutil.Process(pid).net_connections(kind="tcp")
        if connection.laddr
        and connection.laddr.port == port
        and connection.status == psutil.CONN_ESTABLISHED
    )


@asynccontextmanager
async def supervisor(env: dict[str, str]) -> AsyncIterator[ServiceProcess]:
    """The service, returned once the supervisor says every worker listens."""
    service = await ServiceProcess.start(env, until=f"({WORKERS} workers)")
    try:
        assert len(worker_pids(service)) == WORKERS, service.text
        yield service
    finally:
        await service.kill()  # the supervisor's process group: workers have their own
        for pid in worker_pids(service):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@asynccontextmanager
async def fresh_channel(address: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel with a TCP connection of its own (channels otherwise share subchannels)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        await wait_until_serving(channel)  # health SERVING in whichever worker it reached
        yield channel


async def test_both_workers_serve_and_sigterm_stops_them_all(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with supervisor(workers_env(DATABASE_URL=url)) as service:
        pids = worker_pids(service)
        async with contextlib.AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(fresh_channel(service.address))
                for _ in range(CONNECTIONS)
            ]
            stubs = [UserServiceStub(channel) for channel in channels]
            for stub in stubs:
                await create_user(stub)
            # A page token from one worker is good in the other (one shared key).
            first = await stubs[0].ListUsers(pb.ListUsersRequest(page_size=1), timeout=10)
            for stub in stubs:
                request = pb.ListUsersRequest(page_size=1, page_token=first.next_page_token)
                assert (await stub.ListUsers(request, timeout=10)).users
            accepted = {pid: client_connections(pid, service.port) for pid in pids}
        assert all(accepted.values()), accepted

        service.process.send_signal(signal.SIGTERM)
        assert await service.wait(timeout=DRAIN_SECONDS + GRACE_SECONDS + 5) == 0, service.text
        assert await all_gone(pids)
    for number in range(1, WORKERS + 1):
        assert f"worker {number}: server stopped" in service.text
    assert f"all {WORKERS} workers stopped" in service.text
    assert "Traceback" not in service.text, service.text


async def test_a_killed_worker_takes_the_service_down(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with supervisor(workers_env(DATABASE_URL=url)) as service:
        killed, survivor = worker_pids(service)
        os.kill(killed, signal.SIGKILL)
        assert await service.wait(timeout=DRAIN_SECONDS + GRACE_SECONDS + 5) != 0
        assert await all_gone([killed, survivor])
    assert f"worker 1 (pid {killed}) was killed by SIGKILL unexpectedly" in service.text
    assert "worker 2: server stopped" in service.text  # the other one stopped gracefully


async def test_workers_stop_when_the_supervisor_is_killed(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with supervisor(workers_env(DATABASE_URL=url)) as service:
        pids = worker_pids(service)
        service.process.send_signal(signal.SIGKILL)
        await eventually(lambda: all_gone(pids), True, within=DRAIN_SECONDS + GRACE_SECONDS + 10)
        await service.wait()  # and the workers' last lines, read from the pipe they shared
    assert service.text.count("the supervisor has exited; stopping") == WORKERS


async def test_embedded_postgres_starts_once_and_migrates_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    async with supervisor(workers_env(EMBEDDED_PG_DIR=str(data_dir))) as service:
        async with fresh_channel(service.address) as channel:
            await create_user(UserServiceStub(channel))
        service.process.send_signal(signal.SIGTERM)
        assert await service.wait(timeout=DRAIN_SECONDS + GRACE_SECONDS + 10) == 0, service.text
    assert service.text.count("starting embedded PostgreSQL") == 1
    migrations = [line for line in service.log if "Running upgrade" in line]
    assert migrations, service.text
    assert not any("worker" in line for line in migrations)  # the supervisor's, once
    assert not (data_dir / "postmaster.pid").exists()  # stopped after the workers


def test_workers_below_one_is_a_configuration_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=PROJECT_ROOT,
        env=subprocess_env(WORKERS="0"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "WORKERS" in result.stderr
