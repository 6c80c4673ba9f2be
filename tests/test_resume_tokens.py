"""Resume tokens name their database: a token resumes only where its history is.

A token carries the cluster's system identifier, the database's OID and the
WAL timeline it was issued on. Another database (of the same cluster, or a
pg_dump restored elsewhere) refuses it; after a failover (or a point-in-time
restore) the new timeline honours the old one's positions up to its own
first transaction, and refuses the tail it never had.
"""

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import grpc
import pytest
from google.rpc import error_details_pb2
from itsdangerous import URLSafeSerializer

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.server import RunningServer
from tests.support import (
    TEST_PAGE_TOKEN_SECRET,
    create_user,
    fails,
    serving,
    user_service,
)
from tests.support.replicas import replayed
from tests.test_watch import watching
from toolkit.databases import migrate_to_head, throwaway_postgres
from toolkit.standby import Standby

# As service/resume_tokens.py signs them: what a token says, readable in a test.
TOKENS = URLSafeSerializer(
    TEST_PAGE_TOKEN_SECRET.encode(), salt="pat.users.v1.UserService.WatchUsers"
)


async def resume_fails_expired(stub: UserServiceStub, token: str) -> None:
    call = stub.WatchUsers(pb.WatchUsersRequest(resume_token=token))
    failure = await fails(call.read())
    assert failure.code == grpc.StatusCode.OUT_OF_RANGE, failure
    assert failure.detail(error_details_pb2.ErrorInfo).reason == "RESUME_TOKEN_EXPIRED"


async def token_after_a_change(stub: UserServiceStub) -> str:
    """The resume token of a change made now (a watch sees the CreateUser)."""
    async with watching(stub) as watcher:
        await create_user(stub)
        (change,) = await watcher.changes_at_least(1)
    return change.resume_token


async def test_a_token_from_another_database_of_the_cluster_is_expired(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    first, second = await migrated_database(), await migrated_database()
    async with serving(first) as one, user_service(one) as stub:
        token = await token_after_a_change(stub)
    async with serving(second) as other, user_service(other) as stub:
        await create_user(stub)  # the second database has changes of its own
        await resume_fails_expired(stub, token)
    # The same token, where it came from, still resumes.
    async with (
        serving(first) as one,
        user_service(one) as stub,
        watching(stub, token) as watcher,
    ):
        assert watcher.error is None


async def test_tokens_of_an_older_release_and_from_the_future_are_expired(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with serving(url) as running, user_service(running) as stub:
        token = await token_after_a_change(stub)
        system_identifier, oid, timeline, xid, seq = TOKENS.loads(token)
        await resume_fails_expired(stub, TOKENS.dumps([xid, seq]))  # before tokens named a database
        await resume_fails_expired(
            stub, TOKENS.dumps([system_identifier, oid, timeline, xid + 10**6, 1])
        )
        await resume_fails_expired(
            stub, TOKENS.dumps([system_identifier, oid, timeline + 1, xid, seq])
        )
        async with watching(stub, TOKENS.dumps([system_identifier, oid, timeline, xid, seq])) as w:
            assert w.error is None  # the control: the genuine position resumes


# --- a failover to a streaming standby ----------------------------------------------------


@pytest.fixture
def primary_url() -> Iterator[str]:
    with throwaway_postgres("pat-users-failover-") as url:
        migrate_to_head(url)
        yield url


@asynccontextmanager
async def stub_on(url: str) -> AsyncIterator[tuple[RunningServer, UserServiceStub]]:
    async with serving(url) as running, user_service(running) as stub:
        yield running, stub


async def test_after_a_failover_tokens_resume_up_to_the_switch_and_not_after(
    primary_url: str,
) -> None:
    standby = Standby(primary_url, "standby-failover")
    try:
        async with stub_on(primary_url) as (_, on_primary):
            before = await token_after_a_change(on_primary)
            await replayed(standby)
            standby.promote()  # the failover: timeline 2 starts on the standby
            # The old primary goes on for a moment (split brain): what it writes now is
            # the tail the new primary never had.
            lost = await token_after_a_change(on_primary)
        assert TOKENS.loads(before)[2] == TOKENS.loads(lost)[2] == 1
        async with stub_on(standby.url) as (_, on_new_primary):
            async with watching(on_new_primary, before) as watcher:
                made = await create_user(on_new_primary)
                changes = await watcher.changes_at_least(1)
            assert [c.user.id for c in changes] == [made.id]
            assert TOKENS.loads(changes[0].resume_token)[2] == 2  # minted on the new timeline
            await resume_fails_expired(on_new_primary, lost)
    finally:
        standby.remove()
