"""CreateUser, GetUser, BatchGetUsers and LookupUser through a real channel."""

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from google.rpc import error_details_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import (
    asyncpg_dsn,
    create_user,
    eventually,
    fails,
    run_sql,
    service_queries_waiting_for_locks,
    table_rows,
    unique_email,
)


async def test_create_returns_server_assigned_fields(
    stub: UserServiceStub, database_url: str
) -> None:
    before = datetime.now(UTC)
    request = pb.CreateUserRequest(
        user=user_pb2.User(
            id="11111111-1111-1111-1111-111111111111",  # output only: ignored
            email="Ada.Lovelace@Example.com",
            display_name="Ada Lovelace",
            etag="99",
        )
    )
    user = (await stub.CreateUser(request)).user

    assert str(uuid.UUID(user.id)) == user.id
    assert user.id != "11111111-1111-1111-1111-111111111111"
    assert user.email == "Ada.Lovelace@Example.com"  # stored as given
    assert user.display_name == "Ada Lovelace"
    assert user.etag
    assert user.etag != "99"
    created = user.create_time.ToDatetime(tzinfo=UTC)
    assert before - timedelta(seconds=5) < created < datetime.now(UTC) + timedelta(seconds=5)
    assert user.update_time == user.create_time
    assert not user.HasField("delete_time")
    rows = await run_sql(
        database_url, "SELECT email, display_name FROM users WHERE id = $1", uuid.UUID(user.id)
    )
    assert [tuple(r.values()) for r in rows] == [("Ada.Lovelace@Example.com", "Ada Lovelace")]


async def test_get_returns_what_create_returned(stub: UserServiceStub) -> None:
    created = await create_user(stub)
    fetched = (await stub.GetUser(pb.GetUserRequest(id=created.id))).user
    assert fetched == created


async def test_get_accepts_upper_case_uuid(stub: UserServiceStub) -> None:
    created = await create_user(stub)
    fetched = (await stub.GetUser(pb.GetUserRequest(id=created.id.upper()))).user
    assert fetched.id == created.id


async def test_get_unknown_id_is_not_found_with_resource_info(stub: UserServiceStub) -> None:
    missing = str(uuid.uuid4())
    failure = await fails(stub.GetUser(pb.GetUserRequest(id=missing)))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    info = failure.detail(error_details_pb2.ResourceInfo)
    assert (info.resource_type, info.resource_name) == ("pat.users.v1.User", missing)


async def test_get_malformed_id_is_invalid_argument(stub: UserServiceStub) -> None:
    failure = await fails(stub.GetUser(pb.GetUserRequest(id="not-a-uuid")))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.bad_fields == ["id"]


async def test_get_returns_soft_deleted_user_with_delete_time(stub: UserServiceStub) -> None:
    created = await create_user(stub)
    await stub.DeleteUser(pb.DeleteUserRequest(id=created.id))
    fetched = (await stub.GetUser(pb.GetUserRequest(id=created.id))).user
    assert fetched.HasField("delete_time")


async def test_email_taken_in_other_case_is_already_exists(
    stub: UserServiceStub, database_url: str
) -> None:
    await create_user(stub, email="Grace@Example.com")
    rows_before = await table_rows(database_url)

    failure = await fails(create_user(stub, email="gRACE@example.COM"))

    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.detail(error_details_pb2.ResourceInfo).resource_type == "pat.users.v1.User"
    assert "Grace@Example.com" not in failure.message  # never echoes the other user's data
    assert await table_rows(database_url) == rows_before


async def test_email_of_deleted_user_can_be_reused(stub: UserServiceStub) -> None:
    first = await create_user(stub, email="reuse@example.com")
    await stub.DeleteUser(pb.DeleteUserRequest(id=first.id))
    second = await create_user(stub, email="REUSE@example.com")
    assert second.id != first.id


async def test_create_without_email_is_invalid(stub: UserServiceStub) -> None:
    failure = await fails(stub.CreateUser(pb.CreateUserRequest()))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.bad_fields == ["user.email"]


async def test_create_reports_every_bad_field_at_once(stub: UserServiceStub) -> None:
    request = pb.CreateUserRequest(
        user=user_pb2.User(email="nope", display_name="x" * 201), request_id="42"
    )
    failure = await fails(stub.CreateUser(request))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(failure.bad_fields) == ["request_id", "user.display_name", "user.email"]


async def test_display_name_limit_counts_characters_not_bytes(stub: UserServiceStub) -> None:
    user = await create_user(stub, display_name="é" * 200)
    assert user.display_name == "é" * 200
    failure = await fails(create_user(stub, display_name="é" * 201))
    assert failure.bad_fields == ["user.display_name"]


async def test_email_length_limit_is_254(stub: UserServiceStub) -> None:
    domain = "d" * 60 + "." + "e" * 60 + "." + "f" * 60 + ".example.com"
    local = "a" * (254 - len(domain) - 1)
    assert len(f"{local}@{domain}") == 254
    assert (await create_user(stub, email=f"{local}@{domain}")).email == f"{local}@{domain}"
    failure = await fails(create_user(stub, email=f"a{local}@{domain}"))
    assert failure.bad_fields == ["user.email"]


async def test_retry_with_same_request_id_returns_first_user(
    stub: UserServiceStub, database_url: str
) -> None:
    request = pb.CreateUserRequest(
        user=user_pb2.User(email=unique_email(), display_name="Once"), request_id=str(uuid.uuid4())
    )
    first = (await stub.CreateUser(request)).user
    retried = (await stub.CreateUser(request)).user
    assert retried == first
    assert len(await table_rows(database_url)) == 1


async def test_concurrent_retries_with_same_request_id_create_one_user(
    stub: UserServiceStub, database_url: str
) -> None:
    retries = 10
    request_id = uuid.uuid4()
    request = pb.CreateUserRequest(
        user=user_pb2.User(email=unique_email()), request_id=str(request_id)
    )
    # Force the retries to overlap: an open transaction that has inserted a row with
    # the same request_id makes every retry's INSERT wait on the unique index. It
    # then rolls back, so the retries race each other to create the user, as
    # retries of one request do, and the one user is theirs.
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await holder.execute("BEGIN")
        await holder.execute(
            "INSERT INTO users (email, create_request_id) VALUES ($1, $2)",
            unique_email("holder"),
            request_id,
        )
        calls = [
            asyncio.ensure_future(stub.CreateUser(request, timeout=30)) for _ in range(retries)
        ]
        await eventually(
            lambda: service_queries_waiting_for_locks(database_url, "INSERT INTO users"), retries
        )
        await holder.execute("ROLLBACK")
    finally:
        await holder.close()
    replies = await asyncio.gather(*calls)
    assert all(reply == replies[0] for reply in replies)
    assert replies[0].user.email == request.user.email
    assert len(await table_rows(database_url)) == 1


async def test_request_id_reused_with_other_body_is_invalid(
    stub: UserServiceStub, database_url: str
) -> None:
    request_id = str(uuid.uuid4())
    await stub.CreateUser(
        pb.CreateUserRequest(user=user_pb2.User(email=unique_email()), request_id=request_id)
    )
    rows_before = await table_rows(database_url)
    other = pb.CreateUserRequest(user=user_pb2.User(email=unique_email()), request_id=request_id)
    failure = await fails(stub.CreateUser(other))
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.bad_fields == ["request_id"]
    assert await table_rows(database_url) == rows_before


async def test_without_request_id_a_repeat_is_already_exists(stub: UserServiceStub) -> None:
    request = pb.CreateUserRequest(user=user_pb2.User(email=unique_email()))
    await stub.CreateUser(request)
    assert (await fails(stub.CreateUser(request))).code == grpc.StatusCode.ALREADY_EXISTS


async def test_batch_get_returns_users_in_request_order(stub: UserServiceStub) -> None:
    users = [await create_user(stub) for _ in range(3)]
    ids = [users[2].id, users[0].id, users[2].id, users[1].id]
    reply = await stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=ids))
    assert [u.id for u in reply.users] == ids
    assert reply.users[1] == users[0]


async def test_batch_get_with_an_unknown_id_fails_whole_call(stub: UserServiceStub) -> None:
    known = await create_user(stub)
    missing = str(uuid.uuid4())
    failure = await fails(stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[known.id, missing])))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.detail(error_details_pb2.ResourceInfo).resource_name == missing
    assert missing in failure.message


async def test_batch_get_limits(stub: UserServiceStub) -> None:
    empty = await fails(stub.BatchGetUsers(pb.BatchGetUsersRequest()))
    assert (empty.code, empty.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["ids"])
    too_many = [str(uuid.uuid4()) for _ in range(1001)]
    failure = await fails(stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=too_many)))
    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["ids"])
    malformed = await fails(
        stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[str(uuid.uuid4()), "x", "y"]))
    )
    assert malformed.bad_fields == ["ids[1]", "ids[2]"]


async def test_batch_get_of_1000_ids(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    reply = await stub.BatchGetUsers(pb.BatchGetUsersRequest(ids=[user.id] * 1000))
    assert len(reply.users) == 1000


async def test_lookup_is_case_insensitive_among_live_users(stub: UserServiceStub) -> None:
    user = await create_user(stub, email="Lookup.Me@Example.com")
    found = (await stub.LookupUser(pb.LookupUserRequest(email="lookup.me@EXAMPLE.COM"))).user
    assert found == user
    await stub.DeleteUser(pb.DeleteUserRequest(id=user.id))
    failure = await fails(stub.LookupUser(pb.LookupUserRequest(email="lookup.me@example.com")))
    assert failure.code == grpc.StatusCode.NOT_FOUND
    assert failure.detail(error_details_pb2.ResourceInfo).resource_type == "pat.users.v1.User"


async def test_lookup_with_invalid_email_is_invalid_argument(stub: UserServiceStub) -> None:
    failure = await fails(stub.LookupUser(pb.LookupUserRequest(email="no-at-sign")))
    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["email"])
