"""ListUsers: keyset pages, opaque signed tokens, show_deleted."""

import base64

import grpc
import pytest

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import create_user, fails


async def list_all(stub: UserServiceStub, page_size: int, show_deleted: bool = False) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        reply = await stub.ListUsers(
            pb.ListUsersRequest(page_size=page_size, page_token=token, show_deleted=show_deleted)
        )
        ids += [u.id for u in reply.users]
        token = reply.next_page_token
        if not token:
            return ids


async def test_pages_hold_every_user_once_in_creation_order(stub: UserServiceStub) -> None:
    created = [(await create_user(stub)).id for _ in range(7)]
    assert await list_all(stub, page_size=3) == created


async def test_users_inserted_between_pages_cause_no_duplicate_or_gap(
    stub: UserServiceStub,
) -> None:
    created = [(await create_user(stub)).id for _ in range(6)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = await stub.ListUsers(pb.ListUsersRequest(page_size=2, page_token=token))
        pages += 1
        seen += [u.id for u in reply.users]
        token = reply.next_page_token
        if not token:
            break
        created.append((await create_user(stub)).id)  # lands after every page read so far
    assert pages >= 3
    assert len(seen) == len(set(seen))
    assert seen == created  # every user, including those added while paging, exactly once


async def test_last_page_has_empty_token(stub: UserServiceStub) -> None:
    await create_user(stub)
    await create_user(stub)
    reply = await stub.ListUsers(pb.ListUsersRequest(page_size=2))
    assert len(reply.users) == 2
    assert reply.next_page_token == ""


async def test_empty_table_lists_nothing(stub: UserServiceStub) -> None:
    reply = await stub.ListUsers(pb.ListUsersRequest())
    assert (list(reply.users), reply.next_page_token) == ([], "")


async def test_page_size_zero_means_50_and_cap_is_1000(
    stub: UserServiceStub, database_url: str
) -> None:
    from tests.support import run_sql

    await run_sql(
        database_url,
        "INSERT INTO users (email) SELECT 'bulk' || n || '@example.com' FROM generate_series(1, 1005) n",
    )
    assert len((await stub.ListUsers(pb.ListUsersRequest())).users) == 50
    big = await stub.ListUsers(pb.ListUsersRequest(page_size=5000))
    assert len(big.users) == 1000
    assert big.next_page_token


async def test_page_size_may_change_between_pages(stub: UserServiceStub) -> None:
    created = [(await create_user(stub)).id for _ in range(5)]
    first = await stub.ListUsers(pb.ListUsersRequest(page_size=1))
    rest = await stub.ListUsers(pb.ListUsersRequest(page_size=10, page_token=first.next_page_token))
    assert [u.id for u in first.users] + [u.id for u in rest.users] == created


async def test_deleted_users_are_listed_only_with_show_deleted(stub: UserServiceStub) -> None:
    kept, gone = await create_user(stub), await create_user(stub)
    await stub.DeleteUser(pb.DeleteUserRequest(id=gone.id))
    assert await list_all(stub, page_size=1) == [kept.id]
    assert await list_all(stub, page_size=1, show_deleted=True) == [kept.id, gone.id]


async def test_negative_page_size_is_invalid(stub: UserServiceStub) -> None:
    failure = await fails(stub.ListUsers(pb.ListUsersRequest(page_size=-1)))
    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_size"])


def _tampered(token: str) -> str:
    raw = bytearray(token.encode())
    raw[len(raw) // 3] ^= 0x01  # flip one bit inside the payload
    return raw.decode(errors="replace")


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda t: "garbage", id="garbage"),
        pytest.param(_tampered, id="one-bit-flipped"),
        pytest.param(lambda t: t[:-1], id="truncated"),
        pytest.param(lambda t: t + "A", id="extended"),
        pytest.param(
            lambda t: base64.urlsafe_b64encode(b'["2020-01-01T00:00:00+00:00","x",false]').decode(),
            id="hand-made-unsigned",
        ),
    ],
)
async def test_forged_token_is_invalid_argument(stub: UserServiceStub, forge: object) -> None:
    for _ in range(3):
        await create_user(stub)
    token = (await stub.ListUsers(pb.ListUsersRequest(page_size=1))).next_page_token
    assert callable(forge)
    failure = await fails(stub.ListUsers(pb.ListUsersRequest(page_size=1, page_token=forge(token))))
    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])


async def test_token_reused_with_other_show_deleted_is_invalid(stub: UserServiceStub) -> None:
    for _ in range(3):
        await create_user(stub)
    token = (await stub.ListUsers(pb.ListUsersRequest(page_size=1))).next_page_token
    failure = await fails(
        stub.ListUsers(pb.ListUsersRequest(page_size=1, page_token=token, show_deleted=True))
    )
    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
    assert "show_deleted" in failure.message
