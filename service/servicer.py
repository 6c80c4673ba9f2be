"""UserService: validate → session → users.* → to_proto → response.

Each RPC opens its own AsyncSession from the shared sessionmaker and runs its
whole database work in it, in one greenlet: `Database.read` in autocommit (on
a standby when one is up to date enough: replicas.py), `Database.write` in a
transaction on the primary.
Errors are raised, never turned into statuses here: errors.py does that.
"""

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import grpc

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1 import user_service_pb2_grpc
from service import users
from service.auth import current_actor
from service.change_feed import ChangeFeed
from service.change_messages import ChangeMessages
from service.convert import to_proto
from service.db import Database
from service.errors import FieldViolation, InvalidArgument
from service.outbox import Origin, Position
from service.page_tokens import InvalidPageToken, PageTokens
from service.resume_tokens import InvalidResumeToken, ResumeTokens
from service.validation import Violations
from service.watch import Watch

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MAX_BATCH_IDS = 1000

Context = grpc.aio.ServicerContext[Any, Any]


class UserService(user_service_pb2_grpc.UserServiceServicer):
    def __init__(
        self,
        database: Database,
        page_tokens: PageTokens,
        resume_tokens: ResumeTokens,
        feed: ChangeFeed,
        messages: ChangeMessages,
    ) -> None:
        self._database = database
        self._page_tokens = page_tokens
        self._resume_tokens = resume_tokens
        self._feed = feed
        self._messages = messages

    async def CreateUser(
        self, request: pb.CreateUserRequest, context: Context
    ) -> pb.CreateUserResponse:
        check = Violations()
        email = check.email("user.email", request.user.email)
        display_name = check.display_name("user.display_name", request.user.display_name)
        request_id = check.optional_id("request_id", request.request_id)
        check.raise_if_any()
        user = await self._database.write(
            users.create,
            email=email,
            display_name=display_name,
            request_id=request_id,
            actor=current_actor(),
        )
        return pb.CreateUserResponse(user=to_proto(user))

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        check = Violations()
        user_id = check.id("id", request.id)
        check.raise_if_any()
        user = await self._database.read(users.get, user_id)
        return pb.GetUserResponse(user=to_proto(user))

    async def BatchGetUsers(
        self, request: pb.BatchGetUsersRequest, context: Context
    ) -> pb.BatchGetUsersResponse:
        check = Violations()
        if not 1 <= len(request.ids) <= MAX_BATCH_IDS:
            check.add("ids", f"must hold between 1 and {MAX_BATCH_IDS} ids")
            user_ids = []
        else:
            user_ids = [check.id(f"ids[{i}]", value) for i, value in enumerate(request.ids)]
        check.raise_if_any()
        found = await self._database.read(users.batch_get, user_ids)
        return pb.BatchGetUsersResponse(users=[to_proto(user) for user in found])

    async def LookupUser(
        self, request: pb.LookupUserRequest, context: Context
    ) -> pb.LookupUserResponse:
        check = Violations()
        email = check.email("email", request.email)
        check.raise_if_any()
        user = await self._database.read(users.lookup, email)
        return pb.LookupUserResponse(user=to_proto(user))

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: Context
    ) -> pb.ListUsersResponse:
        check = Violations()
        if request.page_size < 0:
            check.add("page_size", "must not be negative")
        after = None
        if request.page_token:
            try:
                after = self._page_tokens.read(
                    request.page_token, show_deleted=request.show_deleted
                )
            except InvalidPageToken as error:
                check.add("page_token", str(error))
        check.raise_if_any()
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        page, next_cursor = await self._database.read(
            users.list_page,
            after=after,
            limit=limit,
            show_deleted=request.show_deleted,
        )
        next_token = (
            self._page_tokens.issue(next_cursor, show_deleted=request.show_deleted)
            if next_cursor
            else ""
        )
        return pb.ListUsersResponse(
            users=[to_proto(user) for user in page], next_page_token=next_token
        )

    async def UpdateUser(
        self, request: pb.UpdateUserRequest, context: Context
    ) -> pb.UpdateUserResponse:
        check = Violations()
        user_id = check.id("user.id", request.user.id)
        version = check.etag("user.etag", request.user.etag)
        fields = check.updated_fields(request.user, request.update_mask.paths)
        check.raise_if_any()
        user = await self._database.write(
            users.update_fields, user_id, fields, expected_version=version, actor=current_actor()
        )
        return pb.UpdateUserResponse(user=to_proto(user))

    async def DeleteUser(
        self, request: pb.DeleteUserRequest, context: Context
    ) -> pb.DeleteUserResponse:
        user_id, version = _id_and_etag(request)
        user = await self._database.write(
            users.delete, user_id, expected_version=version, actor=current_actor()
        )
        return pb.DeleteUserResponse(user=to_proto(user))

    async def UndeleteUser(
        self, request: pb.UndeleteUserRequest, context: Context
    ) -> pb.UndeleteUserResponse:
        user_id, version = _id_and_etag(request)
        user = await self._database.write(
            users.undelete, user_id, expected_version=version, actor=current_actor()
        )
        return pb.UndeleteUserResponse(user=to_proto(user))

    async def WatchUsers(
        self, request: pb.WatchUsersRequest, context: Context
    ) -> AsyncIterator[pb.WatchUsersResponse]:
        origin, after = self._resume_position(request.resume_token)
        async with self._feed.subscribe(after, origin) as subscription:
            async for response in Watch(subscription, self._database.sessions, self._messages):
                yield response

    def _resume_position(self, token: str) -> tuple[Origin | None, Position | None]:
        """Where the token says to resume, and where that position came from (None: now)."""
        if not token:
            return None, None
        try:
            return self._resume_tokens.read(token)
        except InvalidResumeToken as error:
            raise InvalidArgument([FieldViolation("resume_token", str(error))]) from None


def _id_and_etag(request: pb.DeleteUserRequest | pb.UndeleteUserRequest) -> tuple[UUID, int | None]:
    """The user id and the expected version of a Delete or Undelete request."""
    check = Violations()
    user_id = check.id("id", request.id)
    version = check.etag("etag", request.etag)
    check.raise_if_any()
    return user_id, version
