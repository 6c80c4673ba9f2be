"""`python -m service` as operators run it: configuration, embedded PostgreSQL, restarts."""

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.conftest import PROJECT_ROOT
from tests.support import ServiceProcess, create_user, subprocess_env, wait_until_serving


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mysql://root:hunter2@db/pat", "DATABASE_URL has scheme 'mysql'"),
        (
            "postgresql+psycopg://root:hunter2@db/pat",
            "DATABASE_URL has scheme 'postgresql+psycopg'",
        ),
        ("not a url", "DATABASE_URL is not a URL"),
    ],
)
def test_bad_database_url_stops_startup_with_one_line(url: str, expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=PROJECT_ROOT,
        env=subprocess_env(DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "postgresql+asyncpg://" in lines[0]  # names the expected form
    assert "hunter2" not in result.stderr


def test_bad_setting_stops_startup_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=PROJECT_ROOT,
        env=subprocess_env(GRPC_PORT="fifty"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "GRPC_PORT" in result.stderr


async def test_embedded_postgres_keeps_users_across_restarts(tmp_path: Path) -> None:
    env = subprocess_env(
        EMBEDDED_PG_DIR=str(tmp_path / "pgdata"), GRPC_PORT="0", SHUTDOWN_DRAIN_SECONDS="0"
    )
    first = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            await wait_until_serving(channel)
            user = await create_user(UserServiceStub(channel))
        first.process.send_signal(signal.SIGINT)  # Ctrl-C
        assert await first.wait() == 0, first.text
    finally:
        await first.kill()
    assert "Running upgrade" in first.text  # migrations applied on first start

    second = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            await wait_until_serving(channel)
            again = (await UserServiceStub(channel).GetUser(pb.GetUserRequest(id=user.id))).user
        assert again == user
        second.process.send_signal(signal.SIGTERM)
        assert await second.wait() == 0, second.text
    finally:
        await second.kill()
    assert "stopping embedded PostgreSQL" in second.text
    await asyncio.sleep(0)
