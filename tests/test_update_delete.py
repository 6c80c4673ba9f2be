"""UpdateUser (field masks, etags), DeleteUser and UndeleteUser."""

import asyncio
import uuid

import grpc
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import (
    create_user,
    eventually,
    fails,
    failure_of,
    hold_row_lock,
    service_queries_waiting_for_locks,
    table_rows,
)


def update(user: user_pb2.User, *paths: str) -> pb.UpdateUserRequest:
    request = pb.UpdateUserRequest(user=user)
    if paths:
        request.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(paths)))
    return request


async def test_update_without_mask_sets_populated_fields(stub: UserServiceStub) -> None:
    user = await create_user(stub, email="before@example.com", display_name="Before")
    updated = (await stub.UpdateUser(update(user_pb2.User(id=user.id, display_name="After")))).user
    assert (updated.email, updated.display_name) == ("before@example.com", "After")
    assert updated.etag != user.etag
    assert updated.update_time.ToDatetime() > user.update_time.ToDatetime()
    assert updated.create_time == user.create_time
    assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user == updated


async def test_update_with_mask_can_clear_display_name(stub: UserServiceStub) -> None:
    user = await create_user(stub, display_name="Name")
    updated = (await stub.UpdateUser(update(user_pb2.User(id=user.id), "display_name"))).user
    assert updated.display_name == ""
    assert updated.email == user.email


async def test_update_mask_names_only_fields_that_change(stub: UserServiceStub) -> None:
    user = await create_user(stub, display_name="Keep")
    new = user_pb2.User(id=user.id, email="moved@example.com", display_name="Ignored")
    updated = (await stub.UpdateUser(update(new, "email"))).user
    assert (updated.email, updated.display_name) == ("moved@example.com", "Keep")


async def test_star_mask_replaces_all_mutable_fields(stub: UserServiceStub) -> None:
    user = await create_user(stub, display_name="Old")
    new = user_pb2.User(id=user.id, email="star@example.com")
    updated = (await stub.UpdateUser(update(new, "*"))).user
    assert (updated.email, updated.display_name) == ("star@example.com", "")
    failure = await fails(stub.UpdateUser(update(user_pb2.User(id=user.id), "*")))
    assert failure.bad_fields == ["user.email"]  # "*" makes email required


async def test_bad_mask_paths_are_invalid_argument(
    stub: UserServiceStub, database_url: str
) -> None:
    user = await create_user(stub)
    rows_before = await table_rows(database_url)
    for path in ["id", "create_time", "etag", "delete_time", "nickname", "user.email", ""]:
        failure = await fails(
            stub.UpdateUser(update(user_pb2.User(id=user.id, email="x@example.com"), path))
        )
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, path
        assert failure.bad_fields == ["update_mask.paths[0]"], path
    new = user_pb2.User(id=user.id, email="y@example.com")
    mixed = await fails(stub.UpdateUser(update(new, "email", "*")))
    assert mixed.bad_fields == ["update_mask.paths[1]"]
    assert await table_rows(database_url) == rows_before


async def test_update_to_taken_email_is_already_exists(
    stub: UserServiceStub, database_url: str
) -> None:
    await create_user(stub, email="taken@example.com")
    user = await create_user(stub)
    rows_before = await table_rows(database_url)
    failure = await fails(
        stub.UpdateUser(update(user_pb2.User(id=user.id, email="TAKEN@example.com")))
    )
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert await table_rows(database_url) == rows_before


async def test_update_may_change_case_of_own_email(stub: UserServiceStub) -> None:
    user = await create_user(stub, email="case@example.com")
    updated = (
        await stub.UpdateUser(update(user_pb2.User(id=user.id, email="CASE@example.com")))
    ).user
    assert updated.email == "CASE@example.com"


async def test_stale_etag_is_aborted_with_error_info(
    stub: UserServiceStub, database_url: str
) -> None:
    user = await create_user(stub)
    await stub.UpdateUser(update(user_pb2.User(id=user.id, display_name="v2", etag=user.etag)))
    rows_before = await table_rows(database_url)
    stale = user_pb2.User(id=user.id, display_name="v3", etag=user.etag)
    failure = await fails(stub.UpdateUser(update(stale)))
    assert failure.code == grpc.StatusCode.ABORTED
    assert failure.detail(error_details_pb2.ErrorInfo).reason == "ETAG_MISMATCH"
    assert await table_rows(database_url) == rows_before


async def test_concurrent_updates_with_same_etag_exactly_one_wins(
    stub: UserServiceStub, database_url: str
) -> None:
    writers = 8
    user = await create_user(stub)
    requests = [
        update(user_pb2.User(id=user.id, display_name=f"writer {n}", etag=user.etag))
        for n in range(writers)
    ]
    # Force the writers to overlap: every one's UPDATE queues behind a lock on the
    # row, and all of them race for it once it is let go.
    lock = await hold_row_lock(database_url, user.id)
    try:
        calls = [asyncio.ensure_future(stub.UpdateUser(r, timeout=30)) for r in requests]
        await eventually(
            lambda: service_queries_waiting_for_locks(database_url, "UPDATE users"), writers
        )
    finally:
        # The lock holder wrote nothing; rolling back leaves the row as the writers read it.
        await lock.execute("ROLLBACK")
        await lock.close()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    winners = [o for o in outcomes if isinstance(o, pb.UpdateUserResponse)]
    losers = [failure_of(o) for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1, outcomes
    assert [f.code for f in losers] == [grpc.StatusCode.ABORTED] * (writers - 1)
    assert {f.detail(error_details_pb2.ErrorInfo).reason for f in losers} == {"ETAG_MISMATCH"}
    current = (await stub.GetUser(pb.GetUserRequest(id=user.id))).user
    assert current.display_name == winners[0].user.display_name


async def test_update_unknown_or_deleted_user_is_not_found(stub: UserServiceStub) -> None:
    missing = await fails(
        stub.UpdateUser(update(user_pb2.User(id=str(uuid.uuid4()), display_name="x")))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    user = await create_user(stub)
    await stub.DeleteUser(pb.DeleteUserRequest(id=user.id))
    deleted = await fails(stub.UpdateUser(update(user_pb2.User(id=user.id, display_name="x"))))
    assert deleted.code == grpc.StatusCode.NOT_FOUND
    assert deleted.detail(error_details_pb2.ResourceInfo).resource_name == user.id


async def test_update_with_malformed_etag_is_invalid(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    failure = await fails(
        stub.UpdateUser(update(user_pb2.User(id=user.id, display_name="x", etag="W/abc")))
    )
    assert failure.bad_fields == ["user.etag"]


async def test_delete_sets_delete_time_and_hides_from_lookup(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    deleted = (await stub.DeleteUser(pb.DeleteUserRequest(id=user.id, etag=user.etag))).user
    assert deleted.HasField("delete_time")
    assert deleted.etag != user.etag
    assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user == deleted


async def test_delete_twice_is_not_found(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    await stub.DeleteUser(pb.DeleteUserRequest(id=user.id))
    failure = await fails(stub.DeleteUser(pb.DeleteUserRequest(id=user.id)))
    assert failure.code == grpc.StatusCode.NOT_FOUND


async def test_delete_with_stale_etag_is_aborted(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    await stub.UpdateUser(update(user_pb2.User(id=user.id, display_name="changed")))
    failure = await fails(stub.DeleteUser(pb.DeleteUserRequest(id=user.id, etag=user.etag)))
    assert failure.code == grpc.StatusCode.ABORTED
    assert not (await stub.GetUser(pb.GetUserRequest(id=user.id))).user.HasField("delete_time")


async def test_undelete_restores_user(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    deleted = (await stub.DeleteUser(pb.DeleteUserRequest(id=user.id))).user
    restored = (await stub.UndeleteUser(pb.UndeleteUserRequest(id=user.id, etag=deleted.etag))).user
    assert not restored.HasField("delete_time")
    assert restored.etag not in (user.etag, deleted.etag)
    assert (await stub.LookupUser(pb.LookupUserRequest(email=user.email))).user == restored


async def test_undelete_live_user_is_failed_precondition(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    failure = await fails(stub.UndeleteUser(pb.UndeleteUserRequest(id=user.id)))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    violation = failure.detail(error_details_pb2.PreconditionFailure).violations[0]
    assert violation.subject == f"users/{user.id}"


async def test_undelete_unknown_user_is_not_found(stub: UserServiceStub) -> None:
    failure = await fails(stub.UndeleteUser(pb.UndeleteUserRequest(id=str(uuid.uuid4()))))
    assert failure.code == grpc.StatusCode.NOT_FOUND


async def test_undelete_with_stale_etag_is_aborted(stub: UserServiceStub) -> None:
    user = await create_user(stub)
    await stub.DeleteUser(pb.DeleteUserRequest(id=user.id))
    failure = await fails(stub.UndeleteUser(pb.UndeleteUserRequest(id=user.id, etag=user.etag)))
    assert failure.code == grpc.StatusCode.ABORTED


async def test_undelete_blocked_when_email_taken_meanwhile(
    stub: UserServiceStub, database_url: str
) -> None:
    first = await create_user(stub, email="contested@example.com")
    await stub.DeleteUser(pb.DeleteUserRequest(id=first.id))
    await create_user(stub, email="Contested@Example.com")
    rows_before = await table_rows(database_url)
    failure = await fails(stub.UndeleteUser(pb.UndeleteUserRequest(id=first.id)))
    assert failure.code == grpc.StatusCode.ALREADY_EXISTS
    assert failure.detail(error_details_pb2.ResourceInfo).resource_type == "pat.users.v1.User"
    assert await table_rows(database_url) == rows_before
