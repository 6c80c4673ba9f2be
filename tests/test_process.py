"""`python -m service` as operators run it: configuration, embedded PostgreSQL, restarts."""

import json
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import (
    PROJECT_ROOT,
    ServiceProcess,
    create_user,
    subprocess_env,
    wait_until_serving,
)


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


async def client_session(stub: UserServiceStub) -> user_pb2.User:
    """Create, get, list, update, delete and undelete one user; return it."""
    user = await create_user(stub, email="session@example.com")
    assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user == user
    listed = (await stub.ListUsers(pb.ListUsersRequest())).users
    assert user.id in [u.id for u in listed]
    renamed = user_pb2.User(id=user.id, display_name="Renamed", etag=user.etag)
    user = (await stub.UpdateUser(pb.UpdateUserRequest(user=renamed))).user
    assert user.display_name == "Renamed"
    user = (await stub.DeleteUser(pb.DeleteUserRequest(id=user.id, etag=user.etag))).user
    assert user.HasField("delete_time")
    user = (await stub.UndeleteUser(pb.UndeleteUserRequest(id=user.id, etag=user.etag))).user
    assert not user.HasField("delete_time")
    return user


async def test_make_run_serves_with_embedded_postgres_that_keeps_users(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    env = subprocess_env(EMBEDDED_PG_DIR=str(data_dir), GRPC_PORT="0", SHUTDOWN_DRAIN_SECONDS="0")

    first = await ServiceProcess.start(env, command=("make", "--no-print-directory", "run"))
    try:
        async with grpc.aio.insecure_channel(first.address) as channel:
            await wait_until_serving(channel)
            user = await client_session(UserServiceStub(channel))
        first.interrupt()  # Ctrl-C reaches make, the service and PostgreSQL alike
        await first.wait()
    finally:
        await first.kill()
    assert "Running upgrade" in first.text  # migrations applied on the first start
    assert "server stopped" in first.text, first.text
    assert "Traceback" not in first.text, first.text
    assert not postgres_running(data_dir)

    env["LOG_FORMAT"] = "json"
    second = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(second.address) as channel:
            await wait_until_serving(channel)
            again = (await UserServiceStub(channel).GetUser(pb.GetUserRequest(id=user.id))).user
        assert again == user  # the data survived the restart
        second.process.send_signal(signal.SIGTERM)
        assert await second.wait() == 0, second.text
    finally:
        await second.kill()
    records = [json.loads(line) for line in second.log]  # every line is JSON
    assert any(r["message"] == "server stopped" for r in records)
    assert not postgres_running(data_dir)


def postgres_running(data_dir: Path) -> bool:
    return (data_dir / "postmaster.pid").exists()


async def test_stop_signal_during_start_up_stops_embedded_postgres_too(tmp_path: Path) -> None:
    data_dir = tmp_path / "pgdata"
    env = subprocess_env(EMBEDDED_PG_DIR=str(data_dir), GRPC_PORT="0")
    child = await ServiceProcess.start(env, until="starting embedded PostgreSQL")
    try:
        child.process.send_signal(signal.SIGTERM)  # while PostgreSQL is being created
        assert await child.wait() == 0, child.text
    finally:
        await child.kill()
    assert "received SIGTERM during start-up" in child.text
    assert "listening on port" not in child.text
    assert "stopping embedded PostgreSQL" in child.text
    assert not postgres_running(data_dir)


@pytest.mark.parametrize(("event_loop", "uses_uvloop"), [("uvloop", True), ("asyncio", False)])
async def test_serves_on_uvloop_by_default_and_on_asyncio_when_asked(
    migrated_database: Callable[[], Awaitable[str]], event_loop: str, uses_uvloop: bool
) -> None:
    url = await migrated_database()
    env = subprocess_env(DATABASE_URL=url, GRPC_PORT="0", EVENT_LOOP=event_loop)
    child = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
            await client_session(UserServiceStub(channel))
    finally:
        child.interrupt()
        assert await child.wait() == 0
    assert ("event loop: uvloop" in child.text) is uses_uvloop, child.text
