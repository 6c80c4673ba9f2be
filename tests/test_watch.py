"""WatchUsers: every committed change, in order, resumable, never skipped."""

import asyncio
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.server import RunningServer
from tests.support import (
    ServiceProcess,
    asyncpg_dsn,
    create_user,
    eventually,
    fails,
    failure_of,
    run_sql,
    serving,
    subprocess_env,
    unique_email,
    user_service,
    wait_until_serving,
)

Kind = pb.UserChange.Kind


@dataclass
class Watcher:
    """A WatchUsers call read on a task of its own: its changes and its last token."""

    call: grpc.aio.UnaryStreamCall[pb.WatchUsersRequest, pb.WatchUsersResponse]
    changes: list[pb.UserChange] = field(default_factory=list)
    heartbeats: int = 0
    token: str = ""
    error: grpc.aio.AioRpcError | None = None
    _news: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_forever(self) -> None:
        try:
            async for response in self.call:
                if response.HasField("changes"):
                    assert response.changes.changes, "a batch is never empty"
                    self.changes.extend(response.changes.changes)
                else:
                    self.heartbeats += 1
                self.token = response.resume_token
                self._news.set()
        except grpc.aio.AioRpcError as error:
            self.error = error
            self._news.set()

    async def until(self, done: Callable[["Watcher"], bool], within: float = 10) -> None:
        async with asyncio.timeout(within):
            while not done(self):
                if self.error is not None:
                    raise self.error
                self._news.clear()
                await self._news.wait()

    async def changes_at_least(self, count: int, within: float = 10) -> list[pb.UserChange]:
        await self.until(lambda w: len(w.changes) >= count, within)
        return self.changes

    def ids_and_etags(self) -> list[tuple[str, str]]:
        return [(c.user.id, c.user.etag) for c in self.changes]


@asynccontextmanager
async def watching(
    stub: UserServiceStub, resume_token: str = "", metadata: Sequence[tuple[str, str]] = ()
) -> AsyncIterator[Watcher]:
    """A watch that has received its first response (so it is in place)."""
    request = pb.WatchUsersRequest(resume_token=resume_token)
    watcher = Watcher(stub.WatchUsers(request, metadata=tuple(metadata) or None))
    reader = asyncio.ensure_future(watcher.read_forever())
    try:
        await watcher.until(lambda w: bool(w.token) or w.error is not None)
        yield watcher
    finally:
        watcher.call.cancel()
        await asyncio.gather(reader, return_exceptions=True)


async def test_every_write_is_one_change_of_its_kind_with_the_user_as_written(
    stub: UserServiceStub,
) -> None:
    async with watching(stub) as watcher:
        assert watcher.heartbeats == 1, "the first response is a heartbeat with a token"
        created = await create_user(stub)
        updated = (
            await stub.UpdateUser(
                pb.UpdateUserRequest(user=user_pb2.User(id=created.id, display_name="Renamed"))
            )
        ).user
        deleted = (await stub.DeleteUser(pb.DeleteUserRequest(id=created.id))).user
        undeleted = (await stub.UndeleteUser(pb.UndeleteUserRequest(id=created.id))).user
        # Writes that fail change nothing, so they are not changes.
        await fails(stub.CreateUser(pb.CreateUserRequest(user=user_pb2.User(email=created.email))))
        await fails(stub.DeleteUser(pb.DeleteUserRequest(id=created.id, etag=created.etag)))
        last = await create_user(stub)

        changes = await watcher.changes_at_least(5)
        assert [c.kind for c in changes] == [
            Kind.KIND_CREATED,
            Kind.KIND_UPDATED,
            Kind.KIND_DELETED,
            Kind.KIND_UNDELETED,
            Kind.KIND_CREATED,
        ]
        assert [c.user for c in changes] == [created, updated, deleted, undeleted, last]
        assert all(c.resume_token for c in changes)


async def test_a_create_replayed_by_request_id_is_not_a_second_change(
    stub: UserServiceStub,
) -> None:
    request = pb.CreateUserRequest(
        user=user_pb2.User(email=unique_email()), request_id=str(uuid.uuid4())
    )
    async with watching(stub) as watcher:
        first = (await stub.CreateUser(request)).user
        again = (await stub.CreateUser(request)).user
        assert again == first
        marker = await create_user(stub)
        changes = await watcher.changes_at_least(2)
        assert [c.user.id for c in changes] == [first.id, marker.id]


async def test_a_transaction_committing_after_a_later_one_is_not_skipped(
    stub: UserServiceStub, database_url: str
) -> None:
    """The race of an identity-only cursor: T1 takes the earlier id, T2 commits first.

    T0 began before T1 and commits after T2: once its change arrives, the feed
    has read with T2 committed, so it had its chance to send T2 too early.
    """
    async with watching(stub) as watcher:
        t0, t1 = await asyncio.gather(
            *(asyncpg.connect(asyncpg_dsn(database_url)) for _ in range(2))
        )
        try:
            earlier_email = await insert_uncommitted(t0, "earlier")
            slow_email = await insert_uncommitted(t1, "slow")
            fast = await create_user(stub)  # T2: commits while T0 and T1 are still open
            await t0.execute("COMMIT")
            await watcher.changes_at_least(1)
            assert [c.user.email for c in watcher.changes] == [earlier_email], (
                "nothing is sent past a transaction still open"
            )
            await t1.execute("COMMIT")
        finally:
            await asyncio.gather(t0.close(), t1.close())
        changes = await watcher.changes_at_least(3)
        assert [c.user.email for c in changes] == [earlier_email, slow_email, fast.email]


async def insert_uncommitted(connection: asyncpg.Connection, name: str) -> str:
    """BEGIN, then insert a user (so the transaction has its xid now); the user's email."""
    email = unique_email(name)
    await connection.execute("BEGIN")
    await connection.execute("INSERT INTO users (email, display_name) VALUES ($1, $2)", email, name)
    return email


async def test_resuming_from_a_token_loses_nothing(stub: UserServiceStub) -> None:
    async with watching(stub) as watcher:
        before = [await create_user(stub) for _ in range(3)]
        await watcher.changes_at_least(3)
        second_token = watcher.changes[1].resume_token
        last_token = watcher.token
    # Disconnected: these happen while nobody watches.
    meanwhile = [await create_user(stub) for _ in range(4)]

    async with watching(stub, last_token) as resumed:
        changes = await resumed.changes_at_least(4)
        assert [c.user.id for c in changes] == [u.id for u in meanwhile]

    # A change's own token resumes right after that change.
    async with watching(stub, second_token) as resumed:
        changes = await resumed.changes_at_least(5)
        assert [c.user.id for c in changes] == [u.id for u in before[2:] + meanwhile]


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("not-a-token", "is not a resume token issued by this service"),
        ("x" * 10_000, "must be at most 256 characters"),
    ],
)
async def test_a_malformed_resume_token_is_invalid_argument(
    stub: UserServiceStub, token: str, says: str
) -> None:
    call = stub.WatchUsers(pb.WatchUsersRequest(resume_token=token))
    failure = await fails(call.read())
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.bad_fields == ["resume_token"]
    assert says in failure.message


@pytest.mark.parametrize(
    "payload", [b"\xff\xff\xff", b"\x0a\x02\xff\xfe"], ids=["corrupt", "not-utf8"]
)
async def test_undecodable_bytes_are_invalid_argument(
    channel: grpc.aio.Channel, payload: bytes
) -> None:
    raw = channel.unary_stream(
        "/pat.users.v1.UserService/WatchUsers",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    failure = await fails(raw(payload, timeout=5).read())
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure.message


async def test_a_page_token_is_not_a_resume_token(stub: UserServiceStub) -> None:
    await create_user(stub)
    await create_user(stub)
    page = await stub.ListUsers(pb.ListUsersRequest(page_size=1))
    call = stub.WatchUsers(pb.WatchUsersRequest(resume_token=page.next_page_token))
    failure = await fails(call.read())
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_token_older_than_retention_is_out_of_range(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with (
        serving(url, change_retention=3600, change_retention_interval_seconds=0.1) as running,
        user_service(running) as stub,
    ):
        async with watching(stub) as watcher:
            await create_user(stub)
            await create_user(stub)
            await watcher.changes_at_least(2)
            old_token = watcher.changes[0].resume_token
            recent_token = watcher.token
        # The first two changes are now older than the retention: they go.
        await run_sql(url, "UPDATE user_changes SET change_time = now() - interval '2 hours'")
        kept = await create_user(stub)

        async def changes_left() -> int:
            return len(await run_sql(url, "SELECT 1 FROM user_changes"))

        await eventually(changes_left, 1)

        failure = await fails(stub.WatchUsers(pb.WatchUsersRequest(resume_token=old_token)).read())
        assert failure.code == grpc.StatusCode.OUT_OF_RANGE
        info = failure.detail(error_details_pb2.ErrorInfo)
        assert info.reason == "RESUME_TOKEN_EXPIRED"
        # After the deleted ones, every change is still there: the token is honoured.
        async with watching(stub, recent_token) as resumed:
            assert [c.user.id for c in await resumed.changes_at_least(1)] == [kept.id]


async def test_many_watchers_see_the_same_sequence_under_writes(
    stub: UserServiceStub, server: RunningServer
) -> None:
    writes = 120
    # Connections of their own (by default channels share one), each under
    # the server's cap of 64 streams per connection.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=own_connection)
        for _ in range(4)
    ]
    try:
        stubs = [UserServiceStub(channel) for channel in channels]
        async with _many_watchers(stubs, 100) as watchers:
            in_flight = asyncio.Semaphore(32)

            async def write(i: int) -> None:
                async with in_flight:
                    await write_one(i)

            async def write_one(i: int) -> None:
                user = await create_user(stub)
                if i % 3 == 0:
                    await stub.UpdateUser(
                        pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="x"))
                    )

            await asyncio.gather(*(write(i) for i in range(writes)))
            expected = writes + len(range(0, writes, 3))
            for watcher in watchers:
                await watcher.changes_at_least(expected, within=30)
            sequences = {tuple(w.ids_and_etags()) for w in watchers}
            assert len(sequences) == 1, "every watcher sees the same changes in the same order"
            assert len(next(iter(sequences))) == expected
    finally:
        for channel in channels:
            await channel.close()


@asynccontextmanager
async def _many_watchers(stubs: list[UserServiceStub], count: int) -> AsyncIterator[list[Watcher]]:
    watchers = [
        Watcher(stubs[i % len(stubs)].WatchUsers(pb.WatchUsersRequest())) for i in range(count)
    ]
    readers = [asyncio.ensure_future(w.read_forever()) for w in watchers]
    try:
        for watcher in watchers:
            await watcher.until(lambda w: bool(w.token))
        yield watchers
    finally:
        for watcher in watchers:
            watcher.call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_a_watcher_that_does_not_read_is_cut_off_resumably(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with serving(url, watch_buffer_batches=2) as running:
        # No BDP probing: the client's receive window stays at 64 KiB, so the
        # server's writes block soon after the caller stops reading.
        options = [("grpc.http2.bdp_probe", 0)]
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel,
            user_service(running) as writer,
        ):
            stalled = UserServiceStub(channel).WatchUsers(pb.WatchUsersRequest())
            first = await stalled.read()  # then it reads no more
            assert first.HasField("heartbeat")
            long_name = "n" * 200
            written = 0
            while running.feed.watchers and written < 3000:
                # One by one: each commit is a batch of its own.
                await create_user(writer, display_name=long_name)
                written += 1
            assert running.feed.watchers == 0, "the stalled watch was ended"

            # Reading now, the caller gets what was sent, then a resumable status.
            received: list[pb.UserChange] = []
            token = first.resume_token
            try:
                while (response := await stalled.read()) is not grpc.aio.EOF:
                    received.extend(response.changes.changes)
                    token = response.resume_token
                raise AssertionError("the stream ended without a status")
            except grpc.aio.AioRpcError as ended:
                failure = failure_of(ended)
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            assert failure.detail(error_details_pb2.ErrorInfo).reason == "WATCHER_TOO_SLOW"
            assert 0 < len(received) < written

            # Resuming from the last token received gets the rest, none lost.
            async with watching(UserServiceStub(channel), token) as resumed:
                rest = await resumed.changes_at_least(written - len(received))
                assert len(rest) == written - len(received)


async def test_list_then_watch_converges_to_the_table(
    stub: UserServiceStub, database_url: str
) -> None:
    """The recipe in the proto: watch, list every page, apply changes by highest etag."""
    rng = random.Random(7)  # noqa: S311 - a repeatable load, not a secret
    existing = [await create_user(stub) for _ in range(30)]
    stop = asyncio.Event()

    async def write_load() -> None:
        users = list(existing)
        while not stop.is_set():
            choice = rng.random()
            if choice < 0.4 or not users:
                users.append(await create_user(stub))
                continue
            user = rng.choice(users)
            try:
                if choice < 0.8:
                    request = pb.UpdateUserRequest(
                        user=user_pb2.User(id=user.id, display_name=f"n{rng.random():.6f}")
                    )
                    await stub.UpdateUser(request)
                else:
                    await stub.DeleteUser(pb.DeleteUserRequest(id=user.id))
            except grpc.aio.AioRpcError:
                pass  # deleted meanwhile: a write that failed is not a change

    load = asyncio.ensure_future(write_load())
    try:
        async with watching(stub) as watcher:
            copy: dict[str, user_pb2.User] = {}
            token = ""
            while True:
                page = await stub.ListUsers(
                    pb.ListUsersRequest(page_size=7, page_token=token, show_deleted=True)
                )
                for user in page.users:
                    copy[user.id] = user
                if not (token := page.next_page_token):
                    break
            stop.set()
            await load
            marker = await create_user(stub)
            await watcher.until(lambda w: any(c.user.id == marker.id for c in w.changes))
            for change in watcher.changes:
                held = copy.get(change.user.id)
                if held is None or int(change.user.etag) > int(held.etag):
                    copy[change.user.id] = change.user
    finally:
        stop.set()
        await asyncio.gather(load, return_exceptions=True)

    table = await run_sql(database_url, "SELECT id, display_name, version, delete_time FROM users")
    assert {
        (str(row["id"]), row["display_name"], str(row["version"]), row["delete_time"] is not None)
        for row in table
    } == {(u.id, u.display_name, u.etag, u.HasField("delete_time")) for u in copy.values()}


async def test_sigterm_ends_open_watches_at_once_resumably(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    env = subprocess_env(
        DATABASE_URL=url,
        GRPC_PORT="0",
        SHUTDOWN_DRAIN_SECONDS="3",
        SHUTDOWN_GRACE_SECONDS="20",
    )
    child = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
            stub = UserServiceStub(channel)
            watchers = [Watcher(stub.WatchUsers(pb.WatchUsersRequest())) for _ in range(5)]
            readers = [asyncio.ensure_future(w.read_forever()) for w in watchers]
            for watcher in watchers:
                await watcher.until(lambda w: bool(w.token))
            child.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.gather(*readers)
            ended_after = time.monotonic() - signalled
        for watcher in watchers:
            assert watcher.error is not None
            failure = failure_of(watcher.error)
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            assert failure.detail(error_details_pb2.ErrorInfo).reason == "DRAINING"
        assert ended_after < 1.0, "at the start of the drain, not after it"
        assert await child.wait() == 0
    finally:
        await child.kill()


async def test_watches_beyond_max_watchers_are_refused_as_overloaded(
    database_url: str,
) -> None:
    async with serving(database_url, max_watchers=2) as running, user_service(running) as stub:
        async with watching(stub), watching(stub):
            failure = await fails(stub.WatchUsers(pb.WatchUsersRequest()).read())
            assert failure.code == grpc.StatusCode.UNAVAILABLE
            assert failure.detail(error_details_pb2.ErrorInfo).reason == "OVERLOADED"
        async with watching(stub) as again:
            assert again.heartbeats == 1, "a slot is free again once a watch ends"


async def test_a_quiet_watch_gets_heartbeats_whose_tokens_resume_after_them(
    database_url: str,
) -> None:
    async with (
        serving(database_url, watch_heartbeat_seconds=0.2, change_poll_seconds=0.1) as running,
        user_service(running) as stub,
    ):
        await create_user(stub)  # before the watch: not in it, nor after its tokens
        async with watching(stub) as watcher:
            await watcher.until(lambda w: w.heartbeats >= 3)
            assert watcher.changes == []
            token = watcher.token
        created = await create_user(stub)
        async with watching(stub, token) as resumed:
            changes = await resumed.changes_at_least(1)
            assert [c.user.id for c in changes] == [created.id]
