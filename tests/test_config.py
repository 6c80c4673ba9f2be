"""DATABASE_URL: one value for the app and Alembic, in either accepted form."""

import asyncio

import grpc
import pytest

from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.db import DatabaseUrlError, normalize_url
from tests.support import create_user, run_sql, serving, wait_until_serving


@pytest.mark.parametrize(
    "raw",
    [
        "postgresql://pat_user:pat_password@db:5432/pat_db",
        "postgresql+asyncpg://pat_user:pat_password@db:5432/pat_db",
    ],
)
def test_both_forms_mean_the_same_asyncpg_url(raw: str) -> None:
    url = normalize_url(raw)
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "pat_user",
        "pat_password",
        "db",
        5432,
        "pat_db",
    )


@pytest.mark.parametrize(
    "raw",
    [
        "postgres://u:p@h/d",
        "postgresql+psycopg2://u:p@h/d",
        "sqlite:///users.db",
        "mysql+aiomysql://u:p@h/d",
        "",
        "localhost:5432",
    ],
)
def test_other_forms_are_refused_without_echoing_secrets(raw: str) -> None:
    with pytest.raises(DatabaseUrlError) as refused:
        normalize_url(raw)
    assert "DATABASE_URL" in str(refused.value)
    assert ":p@" not in str(refused.value)


async def test_service_runs_on_a_plain_postgresql_url(database_url: str) -> None:
    plain = normalize_url(database_url).set(drivername="postgresql")
    async with (
        serving(plain.render_as_string(hide_password=False)) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        await wait_until_serving(channel)
        user = await create_user(UserServiceStub(channel))
    rows = await run_sql(database_url, "SELECT email FROM users")
    assert [row["email"] for row in rows] == [user.email]


async def wait_for_state(
    channel: grpc.aio.Channel, wanted: grpc.ChannelConnectivity, within: float
) -> bool:
    async with asyncio.timeout(within):
        while (state := channel.get_state()) != wanted:
            await channel.wait_for_state_change(state)
    return True


@pytest.mark.parametrize(("age", "expect_closed"), [(1.0, True), (300.0, False)])
async def test_connections_are_closed_after_max_age(
    database_url: str, age: float, expect_closed: bool
) -> None:
    async with (
        serving(database_url, grpc_max_connection_age_seconds=age) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        await create_user(UserServiceStub(channel))
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        try:
            closed = await wait_for_state(channel, grpc.ChannelConnectivity.IDLE, within=4)
        except TimeoutError:
            closed = False
        assert closed is expect_closed
        assert (await create_user(UserServiceStub(channel))).id  # reconnects transparently
