"""Who changed what: each change in WatchUsers names the caller whose write it was.

The name is recorded by the write's own transaction (migration 0003), so it
holds through PgBouncer in transaction mode as it does directly.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from service.server import RunningServer
from tests.support import (
    PgBouncer,
    create_user,
    run_sql,
    serving,
    serving_through,
    user_service,
)
from tests.test_auth import bearer, token_line
from tests.test_watch import watching

Kind = pb.UserChange.Kind


@pytest.fixture
def callers(tmp_path: Path) -> Path:
    path = tmp_path / "callers"
    names = ("orders", "billing", "audit")
    path.write_text("".join(token_line(name, f"{name}-token") + "\n" for name in names))
    return path


@asynccontextmanager
async def server(
    route: str, url: str, request: pytest.FixtureRequest, **settings: object
) -> AsyncIterator[RunningServer]:
    if route == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        async with serving_through(bouncer, url, **settings) as running:
            yield running
        return
    async with serving(url, **settings) as running:
        yield running


@pytest.mark.parametrize("route", ["direct", "pgbouncer"])
async def test_each_change_names_the_caller_that_wrote_it(
    route: str,
    migrated_database: Callable[[], Awaitable[str]],
    callers: Path,
    request: pytest.FixtureRequest,
) -> None:
    url = await migrated_database()
    async with (
        server(route, url, request, auth_tokens_file=callers) as running,
        user_service(running) as stub,
        watching(stub, metadata=bearer("audit-token")) as watcher,
    ):
        create = pb.CreateUserRequest(user=user_pb2.User(email="ada@example.com"))
        user = (await stub.CreateUser(create, metadata=bearer("orders-token"))).user
        rename = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="Ada"))
        await stub.UpdateUser(rename, metadata=bearer("billing-token"))
        await stub.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=bearer("orders-token"))
        await stub.UndeleteUser(
            pb.UndeleteUserRequest(id=user.id), metadata=bearer("billing-token")
        )
        # Written on the database itself, not through the service: no caller.
        await run_sql(url, "UPDATE users SET display_name = 'by hand' WHERE id = $1", user.id)
        changes = await watcher.changes_at_least(5)
    assert [(c.kind, c.actor) for c in changes] == [
        (Kind.KIND_CREATED, "orders"),
        (Kind.KIND_UPDATED, "billing"),
        (Kind.KIND_DELETED, "orders"),
        (Kind.KIND_UNDELETED, "billing"),
        (Kind.KIND_UPDATED, ""),
    ]


async def test_without_authentication_the_actor_is_empty(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    async with (
        serving(url) as running,
        user_service(running) as stub,
        watching(stub) as watcher,
    ):
        await create_user(stub)
        (change,) = await watcher.changes_at_least(1)
    assert change.kind == Kind.KIND_CREATED
    assert change.actor == ""
