"""Read replicas on a real streaming standby: routing, read-your-writes, lag, faults.

The standbys stream from an embedded PostgreSQL of this module's own (a
small cluster copies fast); `pg_wal_replay_pause()` on a standby freezes
what it shows, which makes every routing decision observable from outside:
a user created while replay is paused is NOT_FOUND on the standby only.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.consistency import ConsistencyTokens
from service.server import RunningServer
from tests.support import (
    TEST_PAGE_TOKEN_SECRET,
    create_user,
    eventually,
    fails,
    run_sql,
    serving,
    unique_email,
)
from tests.support.replicas import readme_interceptor
from toolkit.databases import migrate_to_head, throwaway_postgres
from toolkit.standby import Standby

TOKEN = "pat-consistency-token"
READ_FROM = "pat-read-from"
TOKENS = ConsistencyTokens(TEST_PAGE_TOKEN_SECRET.encode())


@pytest.fixture(scope="module")
def primary_url() -> Iterator[str]:
    with throwaway_postgres("pat-users-replicas-") as url:
        migrate_to_head(url)
        yield url


@pytest.fixture(scope="module")
def standby(primary_url: str) -> Iterator[Standby]:
    """A standby the module's tests share; a test that stops it starts it again."""
    replica = Standby(primary_url, "standby-shared")
    yield replica
    replica.remove()


@asynccontextmanager
async def serving_with(
    primary_url: str, *standbys: Standby, **overrides: object
) -> AsyncIterator[RunningServer]:
    """A test server reading from `standbys`, once every one of them serves reads."""
    settings: dict[str, object] = {
        "database_replica_urls": [s.url for s in standbys],
        "replica_check_interval_seconds": 0.1,
        # A check starved of CPU on a busy machine must not read as a standby down.
        "health_check_timeout_seconds": 5,
        **overrides,
    }
    async with serving(primary_url, **settings) as running:
        assert running.replicas is not None
        for replica in running.replicas.replicas:
            await eventually(lambda r=replica: _state(r), "serving", within=15)
        yield running


async def _state(replica: object) -> str:
    return str(replica.state)  # type: ignore[attr-defined]


@asynccontextmanager
async def paused(standby: Standby) -> AsyncIterator[None]:
    await standby.pause_replay()
    try:
        yield
    finally:
        await standby.resume_replay()


@asynccontextmanager
async def user_service(running: RunningServer, **options: object) -> AsyncIterator[UserServiceStub]:
    interceptors = options.pop("interceptors", None)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{running.port}",
        interceptors=interceptors,  # type: ignore[arg-type]
    ) as channel:
        yield UserServiceStub(channel)


async def created_with_token(stub: UserServiceStub) -> tuple[user_pb2.User, str]:
    request = pb.CreateUserRequest(user=user_pb2.User(email=unique_email(), display_name="R"))
    call = stub.CreateUser(request)
    user = (await call).user
    return user, dict(await call.trailing_metadata())[TOKEN]


def reads(running: RunningServer, target: str) -> int:
    assert running.replicas is not None
    return running.replicas.reads[target]


# --- where reads go -------------------------------------------------------------------------


async def test_reads_go_to_the_replica_and_a_token_or_read_from_primary_to_the_primary(
    primary_url: str, standby: Standby
) -> None:
    async with (
        serving_with(primary_url, standby, replica_max_lag_seconds=60) as running,
        user_service(running) as stub,
        paused(standby),
    ):
        user, token = await created_with_token(stub)
        before = reads(running, "replica-1")

        # Every read RPC, without a token, is served by the paused standby.
        missing = await fails(stub.GetUser(pb.GetUserRequest(id=user.id)))
        assert missing.code == grpc.StatusCode.NOT_FOUND
        missing = await fails(stub.LookupUser(pb.LookupUserRequest(email=user.email)))
        assert missing.code == grpc.StatusCode.NOT_FOUND
        missing = await fails(stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[user.id])))
        assert missing.code == grpc.StatusCode.NOT_FOUND
        listed = await stub.ListUsers(pb.ListUsersRequest(page_size=1000))
        assert user.id not in [u.id for u in listed.users]
        assert reads(running, "replica-1") == before + 4

        # The write's token, or pat-read-from: primary, reads the write.
        got = await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=[(TOKEN, token)])
        assert got.user == user
        got = await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=[(READ_FROM, "primary")])
        assert got.user == user
        listed = await stub.ListUsers(
            pb.ListUsersRequest(page_size=1000), metadata=[(TOKEN, token)]
        )
        assert user.id in [u.id for u in listed.users]
        assert reads(running, "replica-1") == before + 4


async def test_every_answer_carries_a_token_and_positions_never_go_backwards(
    primary_url: str, standby: Standby
) -> None:
    async with serving_with(primary_url, standby) as running, user_service(running) as stub:
        positions = []
        user, token = await created_with_token(stub)
        positions.append(TOKENS.read(token))
        calls = [
            lambda t: stub.GetUser(pb.GetUserRequest(id=user.id), metadata=[(TOKEN, t)]),
            lambda t: stub.UpdateUser(
                pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="B")),
                metadata=[(TOKEN, t)],
            ),
            lambda t: stub.ListUsers(pb.ListUsersRequest(), metadata=[(TOKEN, t)]),
            lambda t: stub.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=[(TOKEN, t)]),
            lambda t: stub.UndeleteUser(pb.UndeleteUserRequest(id=user.id), metadata=[(TOKEN, t)]),
            lambda t: stub.LookupUser(
                pb.LookupUserRequest(email=user.email), metadata=[(TOKEN, t)]
            ),
        ]
        for make_call in calls:
            call = make_call(token)
            await call
            token = dict(await call.trailing_metadata())[TOKEN]
            positions.append(TOKENS.read(token))
        assert positions == sorted(positions)
        assert positions[-1] > positions[0]  # the writes moved the primary on

        # A read answered NOT_FOUND was answered at a position too.
        call = stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())))
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        assert TOKENS.read(dict(await call.trailing_metadata())[TOKEN]) > 0


def forged_token() -> str:
    return ConsistencyTokens(b"another-secret").issue(1)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (TOKEN, "garbage"),
        (TOKEN, ""),
        (TOKEN, "x" * 4000),
        (TOKEN, TOKENS.issue(1)[:-3] + "abc"),  # tampered
        (TOKEN, "FORGED"),  # signed with another secret
        (TOKEN, TOKENS.issue(2**62)),  # a position the primary has not reached
        (READ_FROM, "replica"),
        (READ_FROM, ""),
    ],
)
async def test_bad_tokens_and_read_from_are_invalid_argument_on_their_key(
    primary_url: str, standby: Standby, key: str, value: str
) -> None:
    value = forged_token() if value == "FORGED" else value
    async with serving_with(primary_url, standby) as running, user_service(running) as stub:
        user = await create_user(stub)
        failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), metadata=[(key, value)]))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.bad_fields == [key]
        if value:
            assert value[:40] not in failure.message  # never echoed


async def test_without_replicas_nothing_changes(primary_url: str) -> None:
    async with serving(primary_url) as running, user_service(running) as stub:
        assert running.replicas is None
        call = stub.CreateUser(pb.CreateUserRequest(user=user_pb2.User(email=unique_email())))
        user = (await call).user
        assert TOKEN not in dict(await call.trailing_metadata())
        got = stub.GetUser(pb.GetUserRequest(id=user.id), metadata=[(TOKEN, "ignored")])
        assert (await got).user == user
        assert TOKEN not in dict(await got.trailing_metadata())


# --- lag ------------------------------------------------------------------------------------


async def test_past_the_lag_bound_reads_move_to_the_primary_and_come_back(
    primary_url: str, standby: Standby
) -> None:
    async with (
        serving_with(primary_url, standby, replica_max_lag_seconds=2) as running,
        user_service(running) as stub,
    ):
        assert running.replicas is not None
        replica = running.replicas.replicas[0]
        async with paused(standby):
            user = await create_user(stub)
            seen_by_replica = await fails(stub.GetUser(pb.GetUserRequest(id=user.id)))
            assert seen_by_replica.code == grpc.StatusCode.NOT_FOUND

            # Past the bound (the watcher says so), the primary answers.
            await eventually(lambda: _state(replica), "lagging", within=10)
            assert replica.lag_seconds > 2
            from_primary = reads(running, "primary")
            assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user == user
            assert reads(running, "primary") == from_primary + 1

        # Replay resumed: the standby catches up, and token-less reads return to it.
        await eventually(lambda: _state(replica), "serving", within=10)
        before = reads(running, "replica-1")
        assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user == user
        assert reads(running, "replica-1") == before + 1


async def test_an_idle_primary_does_not_make_a_healthy_replica_stale(
    primary_url: str, standby: Standby, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.replicas")
    async with serving_with(
        primary_url, standby, replica_max_lag_seconds=0.5, replica_check_interval_seconds=0.05
    ) as running:
        assert running.replicas is not None
        replica_set, replica = running.replicas, running.replicas.replicas[0]
        # No writes while 40 checks run (at least four times the bound): every
        # one of them found the standby within the bound.
        first = replica_set.rounds
        await eventually(lambda: asyncio.sleep(0, replica_set.rounds >= first + 40), True, 30)
        assert replica.state == "serving"
        assert replica.lag_seconds < 0.5
    changes = [r.getMessage() for r in caplog.records if r.name == "service.replicas"]
    assert not [line for line in changes if "within" in line], changes


# --- faults ---------------------------------------------------------------------------------


async def test_killing_the_standby_mid_load_loses_no_call_and_flips_no_health(
    primary_url: str, standby: Standby, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.replicas")
    async with (
        serving_with(primary_url, standby) as running,
        user_service(running) as stub,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as health_channel,
    ):
        users = [await create_user(stub) for _ in range(5)]
        statuses: list[int] = []

        async def watch_health() -> None:
            request = health_pb2.HealthCheckRequest(service="")
            async for reply in health_pb2_grpc.HealthStub(health_channel).Watch(request):
                statuses.append(reply.status)

        async def read_until(stop: asyncio.Event) -> int:
            done = 0
            while not stop.is_set():
                for user in users:
                    got = await stub.GetUser(pb.GetUserRequest(id=user.id), timeout=10)
                    assert got.user == user
                    done += 1
            return done

        watcher = asyncio.ensure_future(watch_health())
        stop = asyncio.Event()
        readers = [asyncio.ensure_future(read_until(stop)) for _ in range(8)]
        try:
            await eventually(lambda: asyncio.sleep(0, reads(running, "replica-1") > 50), True)
            await asyncio.to_thread(standby.kill)
            await eventually(
                lambda: asyncio.sleep(0, running.replicas.replicas[0].state), "unreachable"
            )  # type: ignore[union-attr]
            from_primary = reads(running, "primary")
            await eventually(
                lambda: asyncio.sleep(0, reads(running, "primary") > from_primary + 50), True
            )
        finally:
            stop.set()
            try:
                done = await asyncio.gather(*readers)  # any failed call fails the test here
            finally:
                await asyncio.to_thread(standby.start)  # the module's other tests share it
        assert sum(done) > 100
        assert statuses
        assert set(statuses) == {health_pb2.HealthCheckResponse.SERVING}
        watcher.cancel()

        # Back up: the standby serves reads again.
        replica = running.replicas.replicas[0]  # type: ignore[union-attr]
        await eventually(lambda: _state(replica), "serving", within=20)
        before = reads(running, "replica-1")
        await stub.GetUser(pb.GetUserRequest(id=users[0].id))
        assert reads(running, "replica-1") == before + 1
    logged = [r.getMessage() for r in caplog.records if r.name == "service.replicas"]
    assert sum("its reads go to the primary" in line for line in logged) == 1, logged


async def test_a_standby_connection_lost_under_a_token_read_goes_to_the_primary(
    primary_url: str, standby: Standby
) -> None:
    """A token read's first statement, the standby's replay position (asked of the driver
    itself, past SQLAlchemy), meets a connection the standby closed: the primary answers."""
    # Checks far apart: the standby is not known to have replayed a new write,
    # so a read with its token asks the standby's position first.
    settings = {"replica_check_interval_seconds": 2, "replica_max_lag_seconds": 60}
    async with (
        serving_with(primary_url, standby, **settings) as running,
        user_service(running) as stub,
    ):
        await stub.ListUsers(pb.ListUsersRequest(page_size=1))  # a pooled standby connection
        assert reads(running, "replica-1") == 1
        closed = await run_sql(
            standby.url,
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE application_name = 'pat-users'",
        )
        assert closed[0]["n"] >= 1
        user, token = await created_with_token(stub)
        got = await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=[(TOKEN, token)])
        assert got.user == user
        assert reads(running, "primary") == 1
        assert running.replicas is not None
        assert running.replicas.replicas[0].state == "unreachable"  # until a check finds it well


async def test_a_promoted_standby_is_taken_out(
    primary_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    promoted = Standby(primary_url, f"standby-promoted-{uuid.uuid4().hex[:6]}")
    try:
        async with (
            serving_with(primary_url, promoted) as running,
            user_service(running) as stub,
        ):
            assert running.replicas is not None
            replica = running.replicas.replicas[0]
            await asyncio.to_thread(promoted.promote)
            await eventually(lambda: _state(replica), "promoted", within=10)
            assert not replica.up
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert any("no longer in recovery" in r.getMessage() for r in errors)
            # Written after the promotion: only the true primary has it.
            for _ in range(5):
                user = await create_user(stub)
                assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user == user
    finally:
        promoted.remove()


async def test_metrics_show_each_replica_and_where_reads_went(
    primary_url: str, standby: Standby
) -> None:
    from tests.test_metrics import scrape, value

    async with (
        serving_with(primary_url, standby, metrics_port=0) as running,
        user_service(running) as stub,
    ):
        assert running.metrics is not None
        user = await create_user(stub)
        await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=[(READ_FROM, "primary")])
        await stub.GetUser(pb.GetUserRequest(id=user.id))
        scraped = await asyncio.to_thread(scrape, running.metrics.port)
    replica = 'replica="replica-1"'
    assert value(scraped, "pat_users_replica_up", replica) == 1
    assert 0 <= value(scraped, "pat_users_replica_lag_seconds", replica) < 5
    assert value(scraped, "pat_users_db_reads_total", 'target="primary"') == 1
    assert value(scraped, "pat_users_db_reads_total", 'target="replica-1"') == 1


# --- the README's interceptor ---------------------------------------------------------------


async def test_the_readme_interceptor_reads_its_own_writes(
    primary_url: str, standby: Standby
) -> None:
    interceptor = readme_interceptor()()
    async with (
        serving_with(primary_url, standby, replica_max_lag_seconds=60) as running,
        user_service(running, interceptors=[interceptor]) as carrying,
        user_service(running) as plain,
        paused(standby),
    ):
        user = await create_user(carrying)
        assert (await carrying.GetUser(pb.GetUserRequest(id=user.id))).user == user
        missing = await fails(plain.GetUser(pb.GetUserRequest(id=user.id)))
        assert missing.code == grpc.StatusCode.NOT_FOUND
