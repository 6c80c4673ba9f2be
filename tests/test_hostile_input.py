"""Every string field of every request, fed empty, huge, control, SQL-ish and non-ASCII values.

Each value has one defined answer: the call succeeds and stores the value
exactly, or it fails with INVALID_ARGUMENT naming the field. Never INTERNAL or
UNKNOWN, and a refused call leaves every row as it was.
"""

import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import USER_SERVICE_RPCS, create_user, fails, table_rows

HOSTILE = {
    "empty": "",
    "10kB": "a" * 10_000,
    "control": "bell\x07nul\x00newline\n",
    "sql": "x'); DROP TABLE users; --",
    "non-ascii": "Zoë 李 🚀 \u202eevil",
}

OK = "ok"
INVALID = "invalid"
NOT_FOUND = "not found"

# (rpc, field path, how to build the request from a value and an existing user, expected per value)
Build = Callable[[str, user_pb2.User], Any]


def _create_email(value: str, user: user_pb2.User) -> pb.CreateUserRequest:
    return pb.CreateUserRequest(user=user_pb2.User(email=value))


def _create_display_name(value: str, user: user_pb2.User) -> pb.CreateUserRequest:
    return pb.CreateUserRequest(user=user_pb2.User(email="new@example.com", display_name=value))


def _create_request_id(value: str, user: user_pb2.User) -> pb.CreateUserRequest:
    return pb.CreateUserRequest(user=user_pb2.User(email="new@example.com"), request_id=value)


def _update_display_name(value: str, user: user_pb2.User) -> pb.UpdateUserRequest:
    return pb.UpdateUserRequest(
        user=user_pb2.User(id=user.id, display_name=value),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
    )


def _update_email(value: str, user: user_pb2.User) -> pb.UpdateUserRequest:
    return pb.UpdateUserRequest(
        user=user_pb2.User(id=user.id, email=value),
        update_mask=field_mask_pb2.FieldMask(paths=["email"]),
    )


def _update_mask_path(value: str, user: user_pb2.User) -> pb.UpdateUserRequest:
    return pb.UpdateUserRequest(
        user=user_pb2.User(id=user.id, display_name="n"),
        update_mask=field_mask_pb2.FieldMask(paths=[value]),
    )


CASES: list[tuple[str, str, Build, dict[str, str]]] = [
    ("CreateUser", "user.email", _create_email, {"sql": INVALID, "non-ascii": INVALID}),
    (
        "CreateUser",
        "user.display_name",
        _create_display_name,
        {"empty": OK, "sql": OK, "non-ascii": OK},
    ),
    ("CreateUser", "request_id", _create_request_id, {"empty": OK}),
    ("GetUser", "id", lambda v, u: pb.GetUserRequest(id=v), {}),
    ("BatchGetUsers", "ids[1]", lambda v, u: pb.BatchGetUsersRequest(ids=[u.id, v]), {}),
    ("LookupUser", "email", lambda v, u: pb.LookupUserRequest(email=v), {}),
    ("ListUsers", "page_token", lambda v, u: pb.ListUsersRequest(page_token=v), {"empty": OK}),
    (
        "UpdateUser",
        "user.id",
        lambda v, u: pb.UpdateUserRequest(user=user_pb2.User(id=v, display_name="n")),
        {},
    ),
    ("UpdateUser", "user.email", _update_email, {}),
    (
        "UpdateUser",
        "user.display_name",
        _update_display_name,
        {"empty": OK, "sql": OK, "non-ascii": OK},
    ),
    (
        "UpdateUser",
        "user.etag",
        lambda v, u: pb.UpdateUserRequest(user=user_pb2.User(id=u.id, display_name="n", etag=v)),
        {"empty": OK},
    ),
    ("UpdateUser", "update_mask.paths[0]", _update_mask_path, {}),
    ("DeleteUser", "id", lambda v, u: pb.DeleteUserRequest(id=v), {}),
    ("DeleteUser", "etag", lambda v, u: pb.DeleteUserRequest(id=u.id, etag=v), {"empty": OK}),
    ("UndeleteUser", "id", lambda v, u: pb.UndeleteUserRequest(id=v), {}),
    (
        "UndeleteUser",
        "etag",
        lambda v, u: pb.UndeleteUserRequest(id=u.id, etag=v),
        {"empty": "failed precondition"},
    ),
]


@pytest.mark.parametrize(
    ("rpc", "field", "build", "expected", "kind"),
    [
        pytest.param(
            rpc, field, build, overrides.get(kind, INVALID), kind, id=f"{rpc}-{field}-{kind}"
        )
        for rpc, field, build, overrides in CASES
        for kind in HOSTILE
    ],
)
async def test_every_field_has_a_defined_answer(
    stub: UserServiceStub,
    database_url: str,
    rpc: str,
    field: str,
    build: Build,
    expected: str,
    kind: str,
) -> None:
    existing = await create_user(stub, email="existing@example.com", display_name="Existing")
    value = HOSTILE[kind]
    request = build(value, existing)
    rows_before = await table_rows(database_url)
    method = getattr(stub, rpc)

    if expected == OK:
        reply = await method(request)
        _assert_stored_exactly(reply, field, value)
        # Only the user the call was about may have changed.
        touched = {uuid.UUID(user.id) for user in _users_in(reply)}
        assert _rows_except(await table_rows(database_url), touched) == _rows_except(
            rows_before, touched
        )
        return

    failure = await fails(method(request))
    if expected == INVALID:
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
        assert failure.bad_fields == [field]
        assert len(failure.message) < 500  # a 10 kB value is not echoed back
    else:
        assert failure.code == grpc.StatusCode.FAILED_PRECONDITION
    assert await table_rows(database_url) == rows_before


def _users_in(reply: Any) -> list[user_pb2.User]:
    if hasattr(reply, "users"):
        return list(reply.users)
    return [reply.user]


def _rows_except(rows: list[tuple[Any, ...]], ids: set[uuid.UUID]) -> list[tuple[Any, ...]]:
    return [row for row in rows if row[0] not in ids]


def _assert_stored_exactly(reply: Any, field: str, value: str) -> None:
    if field.startswith("user.") and field.removeprefix("user.") in ("email", "display_name"):
        assert getattr(reply.user, field.removeprefix("user.")) == value


VALID_UNUSUAL_EMAILS = [
    "o'brien@example.com",
    "ünïcødé@exämple.de",
    "first.last+tag@sub.example.co.uk",
    "UPPER@EXAMPLE.COM",
]


@pytest.mark.parametrize("email", VALID_UNUSUAL_EMAILS)
async def test_unusual_but_valid_emails_are_stored_as_given(
    stub: UserServiceStub, email: str
) -> None:
    user = await create_user(stub, email=email)
    assert user.email == email
    found = (await stub.LookupUser(pb.LookupUserRequest(email=email.lower()))).user
    assert found.id == user.id


@pytest.mark.parametrize(
    "email",
    [
        "plain",
        "@example.com",
        "a@",
        "a b@example.com",
        "a@b",
        "a@@example.com",
        " a@example.com",
        "a@example.com ",
    ],
)
async def test_malformed_emails_are_invalid(
    stub: UserServiceStub, database_url: str, email: str
) -> None:
    failure = await fails(create_user(stub, email=email))
    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["user.email"])
    assert await table_rows(database_url) == []


@pytest.mark.parametrize(
    "bad_id",
    [
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        "12345678123456781234567812345678",
        "12345678-1234-5678-1234-56781234567g",
        "١٢٣٤٥٦٧٨-1234-5678-1234-567812345678",
    ],
)
async def test_only_canonical_uuids_are_ids(stub: UserServiceStub, bad_id: str) -> None:
    failure = await fails(stub.GetUser(pb.GetUserRequest(id=bad_id)))
    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["id"])


async def test_nil_uuid_is_simply_not_found(stub: UserServiceStub) -> None:
    failure = await fails(stub.GetUser(pb.GetUserRequest(id=str(uuid.UUID(int=0)))))
    assert failure.code == grpc.StatusCode.NOT_FOUND


UNDECODABLE = {
    "corrupt-wire-format": b"\xff\xff\xff",
    # field 1 (a string in every request but ListUsers) holding bytes that are not UTF-8
    "string-not-utf8": b"\x0a\x02\xff\xfe",
    # CreateUser.user.email (field 1 → field 2) holding bytes that are not UTF-8
    "nested-string-not-utf8": b"\x0a\x04\x12\x02\xff\xfe",
}


@pytest.mark.parametrize("payload", UNDECODABLE.values(), ids=UNDECODABLE.keys())
@pytest.mark.parametrize("rpc", USER_SERVICE_RPCS)
async def test_undecodable_bytes_are_invalid_argument(
    channel: grpc.aio.Channel, database_url: str, rpc: str, payload: bytes
) -> None:
    """Raw bytes no generated stub would send: a clear INVALID_ARGUMENT, not UNKNOWN."""
    raw = channel.unary_unary(
        f"/pat.users.v1.UserService/{rpc}",
        request_serializer=lambda data: data,
        response_deserializer=lambda data: data,
    )
    if rpc == "ListUsers" and payload != UNDECODABLE["corrupt-wire-format"]:
        await raw(payload, timeout=5)  # ListUsers has no string field: an unknown field, ignored
    else:
        failure = await fails(raw(payload, timeout=5))
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT, failure.message
        assert "DecodeError" not in failure.message
    assert await table_rows(database_url) == []
