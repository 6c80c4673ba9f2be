"""Calling the service as a test does: its RPCs, new users, an update held on a lock."""

import time
import uuid

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support.databases import hold_row_lock
from tests.support.failures import Failure, fails

# The unary ones; WatchUsers streams (tests/test_watch.py).
USER_SERVICE_RPCS = (
    "CreateUser",
    "GetUser",
    "BatchGetUsers",
    "LookupUser",
    "ListUsers",
    "UpdateUser",
    "DeleteUser",
    "UndeleteUser",
)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}@example.com"


async def create_user(
    stub: UserServiceStub, email: str | None = None, display_name: str = "Test User"
) -> user_pb2.User:
    request = pb.CreateUserRequest(
        user=user_pb2.User(email=email or unique_email(), display_name=display_name)
    )
    return (await stub.CreateUser(request)).user


async def update_held_on_a_row_lock(url: str, stub: UserServiceStub) -> tuple[Failure, float]:
    """An UpdateUser whose row the test holds locked, with a 10 s deadline.

    Returns its failure and how many seconds it took: a server statement
    timeout ends it well before the caller's deadline.
    """
    user = await create_user(stub)
    lock = await hold_row_lock(url, user.id)
    try:
        request = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="late"))
        started = time.monotonic()
        failure = await fails(stub.UpdateUser(request, timeout=10))
        return failure, time.monotonic() - started
    finally:
        await lock.close()
