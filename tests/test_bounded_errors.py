"""Absurd input costs little and its error fits a default client's 8 KB metadata limit.

At most five field violations are listed and the message counts the rest;
long repeated fields and long tokens are refused before any per-element work.
The channel is a default grpcio client: an error whose trailers exceeded its
limit would reach it as RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT.
"""

import random
import re
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from itsdangerous import URLSafeSerializer

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import TEST_PAGE_TOKEN_SECRET, create_user, fails, failure_of

LISTED = 5
# Far above what five short violations need, far below the client's 8 KB.
TRAILERS_BUDGET = 2048


async def _rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def _trailers_size(error: grpc.aio.AioRpcError) -> int:
    return sum(len(key) + len(value) for key, value in error.trailing_metadata() or ())


def _unlisted_count(message: str) -> int:
    match = re.search(r"and (\d+) more violations?$", message)
    assert match, f"no count of unlisted violations in {message!r}"
    return int(match.group(1))


async def test_a_thousand_malformed_ids_list_five_and_count_the_rest(
    stub: UserServiceStub,
) -> None:
    request = pb.BatchGetUsersRequest(ids=[f"not-a-uuid-{i}" for i in range(1000)])

    error = await _rpc_error(stub.BatchGetUsers(request))
    failure = failure_of(error)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert _trailers_size(error) < TRAILERS_BUDGET
    assert failure.bad_fields == [f"ids[{i}]" for i in range(LISTED)]
    assert _unlisted_count(failure.message) == 1000 - LISTED


async def test_a_six_field_request_lists_five_and_counts_one(stub: UserServiceStub) -> None:
    request = pb.UpdateUserRequest(
        user=user_pb2.User(
            id="bad id", etag="bad etag", email="no-at-sign", display_name="x" * 201
        ),
        update_mask=field_mask_pb2.FieldMask(paths=["email", "display_name", "bogus", "id"]),
    )

    failure = await fails(stub.UpdateUser(request))

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.bad_fields == [
        "user.id",
        "user.etag",
        "update_mask.paths[2]",
        "update_mask.paths[3]",
        "user.email",
    ]  # user.display_name is the one counted
    assert failure.message.endswith("; and 1 more violation")


async def test_a_description_that_lists_input_characters_is_short_and_ascii(
    stub: UserServiceStub,
) -> None:
    # email_validator quotes each character after a closing quote, non-ASCII
    # ones as they are: grpc-message would percent-encode each to 9 bytes.
    request = pb.CreateUserRequest(user=user_pb2.User(email='"a"' + "李" * 80 + "@example.com"))

    failure = await fails(stub.CreateUser(request))

    (violation,) = failure.detail(error_details_pb2.BadRequest).field_violations
    assert violation.field == "user.email"
    assert len(violation.description) <= 160
    assert violation.description.isascii()
    assert failure.message.isascii()


async def test_a_huge_update_mask_is_one_violation_and_cheap(stub: UserServiceStub) -> None:
    existing = await create_user(stub)
    paths = [f"p{i}" for i in range(8000)]
    request = pb.UpdateUserRequest(
        user=user_pb2.User(id=existing.id, display_name="n"),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )
    assert request.ByteSize() < 64 * 1024  # what the server will accept at most

    started = time.perf_counter()
    failure = await fails(stub.UpdateUser(request))
    elapsed = time.perf_counter() - started

    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert failure.bad_fields == ["update_mask.paths"]
    assert "at most 8 paths" in failure.message
    # A bound, not a benchmark: generous for a loaded machine, far below the
    # seconds that building one violation per path used to cost.
    assert elapsed < 0.5


async def test_duplicated_valid_mask_paths_within_the_limit_are_fine(
    stub: UserServiceStub,
) -> None:
    existing = await create_user(stub)
    request = pb.UpdateUserRequest(
        user=user_pb2.User(id=existing.id, display_name="Renamed"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name"] * 8),
    )

    assert (await stub.UpdateUser(request)).user.display_name == "Renamed"


async def test_an_over_long_page_token_is_refused_before_it_is_verified(
    stub: UserServiceStub,
) -> None:
    # Correctly signed, and its id still parses (uuid.UUID drops "-", "urn:"
    # and "uuid:"), so only a length check made before decoding refuses it.
    # The padding is random because the serializer compresses its payload.
    serializer = URLSafeSerializer(
        TEST_PAGE_TOKEN_SECRET.encode(), salt="pat.users.v1.UserService.ListUsers"
    )
    rng = random.Random(0)  # noqa: S311 - incompressible padding, not a secret
    padding = "".join(rng.choice(["-", "urn:", "uuid:"]) for _ in range(1000))
    token = serializer.dumps([datetime.now(UTC).isoformat(), padding + uuid.uuid4().hex, False])
    assert 512 < len(token) < 1024

    failure = await fails(stub.ListUsers(pb.ListUsersRequest(page_token=token)))

    assert (failure.code, failure.bad_fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["page_token"])
    assert "at most 512 characters" in failure.message


async def test_issued_page_tokens_are_well_within_the_limit(stub: UserServiceStub) -> None:
    for _ in range(2):
        await create_user(stub)

    for show_deleted in (False, True):
        request = pb.ListUsersRequest(page_size=1, show_deleted=show_deleted)
        token = (await stub.ListUsers(request)).next_page_token
        assert 0 < len(token) <= 512 // 2
