"""The queries behind UserService: plain functions that take a Session.

This layer knows SQL and the domain errors, not gRPC. Writes return what they
wrote (`... RETURNING`), so the normal path of each RPC is one statement.

The functions are synchronous on purpose: `db.read` and `db.write` run an RPC's
whole database work (connection, statements, close) inside one greenlet of
an AsyncSession, instead of switching greenlets at every await. Statements
are built once, at import, with bound parameters: building them per call
cost more CPU than compiling them (which SQLAlchemy caches anyway).
"""

import functools
import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, cast

from sqlalchemy import (
    ARRAY,
    Row,
    Table,
    Update,
    Uuid,
    any_,
    bindparam,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import (
    EmailTaken,
    EtagMismatch,
    NotDeleted,
    NotFound,
    RequestIdReused,
    is_unique_violation,
)
from service.models import User

# Rows of the users table, read and written with Core statements: the ORM's
# identity map and instance loading bought nothing for one-statement RPCs.
UserRow = Row[Any]
_users = cast(Table, User.__table__)

MUTABLE_FIELDS = ("email", "display_name")


@dataclass(frozen=True)
class Cursor:
    """Where a ListUsers page ended, in the list's (create_time, id) order."""

    create_time: datetime
    id: uuid.UUID


# Every write names its caller for the outbox's trigger (migration 0003): a
# transaction-local setting, set in RETURNING, so in the write's own round
# trip and before the row's AFTER trigger runs (triggers fire at the end of
# the statement).
_SET_ACTOR = func.set_config("pat_users.actor", bindparam("actor"), True).label("actor")
_BY_ID = select(_users).where(_users.c.id == bindparam("user_id"))
_BY_IDS = select(_users).where(_users.c.id == any_(bindparam("user_ids", type_=ARRAY(Uuid()))))
_LIVE_BY_EMAIL = select(_users).where(
    func.lower(_users.c.email) == func.lower(bindparam("email")), _users.c.delete_time.is_(None)
)
_BY_REQUEST_ID = select(_users).where(_users.c.create_request_id == bindparam("request_id"))
# DO NOTHING on any unique index: a live user's email or a request_id that a
# concurrent retry inserted first. Which one it was is looked up afterwards.
_INSERT = (
    insert(_users)
    .values(
        email=bindparam("new_email"),
        display_name=bindparam("new_display_name"),
        create_request_id=bindparam("request_id"),
        create_request_digest=bindparam("digest"),
    )
    .on_conflict_do_nothing()
    .returning(_users, _SET_ACTOR)
)
_PAGE_ORDER = (_users.c.create_time, _users.c.id)
_AFTER_CURSOR = tuple_(*_PAGE_ORDER) > tuple_(bindparam("after_time"), bindparam("after_id"))


def create(
    session: Session,
    *,
    email: str,
    display_name: str,
    request_id: uuid.UUID | None,
    actor: str = "",
) -> UserRow:
    """Insert a user; with a request_id, a repeat returns the first call's user.

    `actor` (every write takes one): the caller's name, recorded with the change.
    """
    digest = _request_digest(email, display_name) if request_id else None
    if request_id is not None and (earlier := _created_by(session, request_id)):
        return _replay(earlier, digest)
    values = {
        "new_email": email,
        "new_display_name": display_name,
        "request_id": request_id,
        "digest": digest,
        "actor": actor,
    }
    created = session.connection().execute(_INSERT, values).one_or_none()
    if created is not None:
        return created
    if request_id is not None and (earlier := _created_by(session, request_id)):
        return _replay(earlier, digest)
    raise EmailTaken()


def get(session: Session, user_id: uuid.UUID) -> UserRow:
    user = session.connection().execute(_BY_ID, {"user_id": user_id}).one_or_none()
    if user is None:
        raise NotFound(str(user_id))
    return user


def batch_get(session: Session, user_ids: Sequence[uuid.UUID]) -> list[UserRow]:
    """All of the users, in the order asked; NotFound names the first unknown id."""
    # One array parameter instead of up to 1000 bound values keeps the statement cacheable.
    rows = session.connection().execute(_BY_IDS, {"user_ids": list(set(user_ids))})
    found = {user.id: user for user in rows}
    missing = next((user_id for user_id in user_ids if user_id not in found), None)
    if missing is not None:
        raise NotFound(str(missing))
    return [found[user_id] for user_id in user_ids]


def lookup(session: Session, email: str) -> UserRow:
    """The live user with this email, whatever its letter case."""
    user = session.connection().execute(_LIVE_BY_EMAIL, {"email": email}).one_or_none()
    if user is None:
        raise NotFound(email, "no live user has this email")
    return user


def list_page(
    session: Session, *, after: Cursor | None, limit: int, show_deleted: bool
) -> tuple[list[UserRow], Cursor | None]:
    """One page in (create_time, id) order, and the cursor of the next page if any."""
    parameters: dict[str, Any] = {"limit": limit + 1}
    if after is not None:
        parameters.update(after_time=after.create_time, after_id=after.id)
    statement = _page_statement(show_deleted=show_deleted, after_cursor=after is not None)
    page = list(session.connection().execute(statement, parameters))
    if len(page) <= limit:
        return page, None
    del page[limit:]
    return page, Cursor(page[-1].create_time, page[-1].id)


@functools.cache
def _page_statement(*, show_deleted: bool, after_cursor: bool) -> Any:
    """ListUsers' statement for one of its four shapes, built once."""
    statement = select(_users).order_by(*_PAGE_ORDER).limit(bindparam("limit"))
    if not show_deleted:
        statement = statement.where(_users.c.delete_time.is_(None))
    if after_cursor:
        statement = statement.where(_AFTER_CURSOR)
    return statement


def update_fields(
    session: Session,
    user_id: uuid.UUID,
    fields: Mapping[str, str],
    *,
    expected_version: int | None,
    actor: str = "",
) -> UserRow:
    """Set mutable fields of a live user to the values in `fields`."""
    unknown = set(fields) - set(MUTABLE_FIELDS)
    assert not unknown, f"not mutable: {unknown}"
    return _write(session, user_id, dict(fields), expected_version, actor, deleted=False)


def delete(
    session: Session, user_id: uuid.UUID, *, expected_version: int | None, actor: str = ""
) -> UserRow:
    """Soft-delete a live user."""
    return _write(session, user_id, {}, expected_version, actor, deleted=False, deleting=True)


def undelete(
    session: Session, user_id: uuid.UUID, *, expected_version: int | None, actor: str = ""
) -> UserRow:
    """Bring a soft-deleted user back."""
    return _write(session, user_id, {}, expected_version, actor, deleted=True, deleting=False)


def _write(
    session: Session,
    user_id: uuid.UUID,
    fields: dict[str, Any],
    expected_version: int | None,
    actor: str,
    *,
    deleted: bool,
    deleting: bool | None = None,
) -> UserRow:
    """One conditional UPDATE ... RETURNING; on a miss, find out which condition failed.

    `deleted` is the state the user must be in; `deleting` sets delete_time
    (True: now, False: cleared, None: left alone). The row lock PostgreSQL
    takes makes concurrent writers with the same etag serialise: the first
    wins, the others see the bumped version and fail with EtagMismatch.
    """
    statement = _update_statement(
        tuple(sorted(fields)), deleted, deleting, expected_version is not None
    )
    parameters = {f"new_{name}": value for name, value in fields.items()}
    parameters.update(user_id=user_id, expected_version=expected_version, actor=actor)
    try:
        written = session.connection().execute(statement, parameters).one_or_none()
    except IntegrityError as error:
        if is_unique_violation(error):
            raise EmailTaken() from None
        raise
    if written is None:
        _raise_write_miss(session, user_id, deleted=deleted)
    return written


@functools.cache
def _update_statement(
    fields: tuple[str, ...], deleted: bool, deleting: bool | None, versioned: bool
) -> Update:
    """The UPDATE for one combination of changed fields and conditions, built once."""
    state = _users.c.delete_time.is_not(None) if deleted else _users.c.delete_time.is_(None)
    # Named apart from the columns: Core reserves a column's own name for SET.
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in fields}
    if deleting is not None:
        values["delete_time"] = func.now() if deleting else None
    statement = (
        update(_users)
        .where(_users.c.id == bindparam("user_id"), state)
        .values({**values, "version": _users.c.version + 1, "update_time": func.now()})
        .returning(_users, _SET_ACTOR)
    )
    if versioned:
        statement = statement.where(_users.c.version == bindparam("expected_version"))
    return statement


def _raise_write_miss(session: Session, user_id: uuid.UUID, *, deleted: bool) -> NoReturn:
    current = get(session, user_id)  # NotFound if there is no such user
    if current.delete_time is not None and not deleted:
        raise NotFound(str(user_id), f"user {user_id} is deleted")
    if current.delete_time is None and deleted:
        raise NotDeleted(str(user_id))
    raise EtagMismatch(str(user_id))


def _created_by(session: Session, request_id: uuid.UUID) -> UserRow | None:
    return session.connection().execute(_BY_REQUEST_ID, {"request_id": request_id}).one_or_none()


def _replay(earlier: UserRow, digest: bytes | None) -> UserRow:
    if earlier.create_request_digest != digest:
        raise RequestIdReused()
    return earlier


def _request_digest(email: str, display_name: str) -> bytes:
    return hashlib.sha256(json.dumps([email, display_name]).encode()).digest()
