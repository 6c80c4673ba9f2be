"""The queries behind UserService: plain functions that take an AsyncSession.

This layer knows SQL and the domain errors, not gRPC. Writes return what they
wrote (`... RETURNING`), so the normal path of each RPC is one statement.
"""

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from sqlalchemy import ARRAY, Uuid, any_, bindparam, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import (
    EmailTaken,
    EtagMismatch,
    NotDeleted,
    NotFound,
    RequestIdReused,
    is_unique_violation,
)
from service.models import User

MUTABLE_FIELDS = ("email", "display_name")


@dataclass(frozen=True)
class Cursor:
    """Where a ListUsers page ended, in the list's (create_time, id) order."""

    create_time: datetime
    id: uuid.UUID


async def create(
    session: AsyncSession, *, email: str, display_name: str, request_id: uuid.UUID | None
) -> User:
    """Insert a user; with a request_id, a repeat returns the first call's user."""
    digest = _request_digest(email, display_name) if request_id else None
    if request_id is not None and (earlier := await _created_by(session, request_id)):
        return _replay(earlier, digest)
    # DO NOTHING on any unique index: a live user's email or a request_id that a
    # concurrent retry inserted first. Which one it was is looked up below.
    statement = (
        insert(User)
        .values(
            email=email,
            display_name=display_name,
            create_request_id=request_id,
            create_request_digest=digest,
        )
        .on_conflict_do_nothing()
        .returning(User)
    )
    created = (await session.scalars(statement)).one_or_none()
    if created is not None:
        return created
    if request_id is not None and (earlier := await _created_by(session, request_id)):
        return _replay(earlier, digest)
    raise EmailTaken()


async def get(session: AsyncSession, user_id: uuid.UUID) -> User:
    user = (await session.scalars(select(User).where(User.id == user_id))).one_or_none()
    if user is None:
        raise NotFound(str(user_id))
    return user


async def batch_get(session: AsyncSession, user_ids: Sequence[uuid.UUID]) -> list[User]:
    """All of the users, in the order asked; NotFound names the first unknown id."""
    # One array parameter instead of up to 1000 bound values keeps the statement cacheable.
    ids = bindparam("ids", value=list(set(user_ids)), type_=ARRAY(Uuid()))
    found = {
        user.id: user for user in await session.scalars(select(User).where(User.id == any_(ids)))
    }
    missing = next((user_id for user_id in user_ids if user_id not in found), None)
    if missing is not None:
        raise NotFound(str(missing))
    return [found[user_id] for user_id in user_ids]


async def lookup(session: AsyncSession, email: str) -> User:
    """The live user with this email, whatever its letter case."""
    statement = select(User).where(
        func.lower(User.email) == func.lower(email), User.delete_time.is_(None)
    )
    user = (await session.scalars(statement)).one_or_none()
    if user is None:
        raise NotFound(email, "no live user has this email")
    return user


async def list_page(
    session: AsyncSession, *, after: Cursor | None, limit: int, show_deleted: bool
) -> tuple[list[User], Cursor | None]:
    """One page in (create_time, id) order, and the cursor of the next page if any."""
    statement = select(User).order_by(User.create_time, User.id).limit(limit + 1)
    if not show_deleted:
        statement = statement.where(User.delete_time.is_(None))
    if after is not None:
        statement = statement.where(
            tuple_(User.create_time, User.id) > tuple_(after.create_time, after.id)
        )
    page = list(await session.scalars(statement))
    if len(page) <= limit:
        return page, None
    del page[limit:]
    return page, Cursor(page[-1].create_time, page[-1].id)


async def update_fields(
    session: AsyncSession,
    user_id: uuid.UUID,
    changes: Mapping[str, str],
    *,
    expected_version: int | None,
) -> User:
    """Set mutable fields of a live user."""
    unknown = set(changes) - set(MUTABLE_FIELDS)
    assert not unknown, f"not mutable: {unknown}"
    return await _write(session, user_id, dict(changes), expected_version, deleted=False)


async def delete(
    session: AsyncSession, user_id: uuid.UUID, *, expected_version: int | None
) -> User:
    """Soft-delete a live user."""
    changes = {"delete_time": func.now()}
    return await _write(session, user_id, changes, expected_version, deleted=False)


async def undelete(
    session: AsyncSession, user_id: uuid.UUID, *, expected_version: int | None
) -> User:
    """Bring a soft-deleted user back."""
    return await _write(session, user_id, {"delete_time": None}, expected_version, deleted=True)


async def _write(
    session: AsyncSession,
    user_id: uuid.UUID,
    changes: dict[str, Any],
    expected_version: int | None,
    *,
    deleted: bool,
) -> User:
    """One conditional UPDATE ... RETURNING; on a miss, find out which condition failed.

    `deleted` is the state the user must be in. The row lock PostgreSQL takes
    makes concurrent writers with the same etag serialise: the first wins, the
    others see the bumped version and fail with EtagMismatch.
    """
    state = User.delete_time.is_not(None) if deleted else User.delete_time.is_(None)
    statement = (
        update(User)
        .where(User.id == user_id, state)
        .values({**changes, "version": User.version + 1, "update_time": func.now()})
        .returning(User)
    )
    if expected_version is not None:
        statement = statement.where(User.version == expected_version)
    try:
        written = (await session.scalars(statement)).one_or_none()
    except IntegrityError as error:
        if is_unique_violation(error):
            raise EmailTaken() from None
        raise
    if written is None:
        await _raise_write_miss(session, user_id, deleted=deleted)
    return written


async def _raise_write_miss(
    session: AsyncSession, user_id: uuid.UUID, *, deleted: bool
) -> NoReturn:
    current = await get(session, user_id)  # NotFound if there is no such user
    if current.delete_time is not None and not deleted:
        raise NotFound(str(user_id), f"user {user_id} is deleted")
    if current.delete_time is None and deleted:
        raise NotDeleted(str(user_id))
    raise EtagMismatch(str(user_id))


async def _created_by(session: AsyncSession, request_id: uuid.UUID) -> User | None:
    statement = select(User).where(User.create_request_id == request_id)
    return (await session.scalars(statement)).one_or_none()


def _replay(earlier: User, digest: bytes | None) -> User:
    if earlier.create_request_digest != digest:
        raise RequestIdReused()
    return earlier


def _request_digest(email: str, display_name: str) -> bytes:
    return hashlib.sha256(json.dumps([email, display_name]).encode()).digest()
