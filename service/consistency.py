"""Read-your-writes across replicas: the consistency token a caller carries.

Only with DATABASE_REPLICA_URLS set. Every answer a database gave (a write,
or a read: OK, or a domain error such as NOT_FOUND) carries trailing
metadata `pat-consistency-token`: a WAL position, signed with
PAGE_TOKEN_SECRET under a salt of its own, at or after the state the call
saw or made. A call that sends it back as request metadata is served only
by a database that has replayed at least that position (replicas.py); one
that sends `pat-read-from: primary` is served by the primary. This is
GitLab's database load balancing, with the position carried by the caller
instead of kept in a server-side store.

The token is read and checked once per call here, and handed to the
database layer through a context variable: each RPC runs in a task of its
own, so the variable is the call's, and the servicer need not know.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from itsdangerous import BadData, Signer

from service.errors import FieldViolation, InvalidArgument

TOKEN_KEY = "pat-consistency-token"  # noqa: S105 (a metadata key)
READ_FROM_KEY = "pat-read-from"
PRIMARY = "primary"

_SALT = "pat.users.v1.consistency"
# Issued tokens are under 64 characters; a longer one is refused before HMAC.
MAX_TOKEN_LENGTH = 128
# A WAL position is a 64-bit unsigned integer.
MAX_POSITION = 2**64 - 1

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behavior = Callable[[Any, Any], Any]


@dataclass(slots=True)
class CallConsistency:
    """What one call asks of the database that serves it, and where it was served."""

    required: int | None = None  # the position the caller's token names
    primary_only: bool = False  # `pat-read-from: primary`
    served: int | None = None  # a position at or after the state the call saw or made

    def answered_at(self, position: int) -> None:
        self.served = position if self.served is None else max(self.served, position)


_current: ContextVar[CallConsistency | None] = ContextVar("pat_users_consistency", default=None)


def current_call() -> CallConsistency | None:
    """This call's consistency, or None outside a UserService call (the change feed, checks)."""
    return _current.get()


def invalid_token(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(TOKEN_KEY, description)])


class ConsistencyTokens:
    """Signs WAL positions, and reads them back from tokens this service issued.

    A token is the position in hexadecimal and its HMAC-SHA256 signature
    (itsdangerous' Signer): signing and checking each take a few µs, on
    every call that carries or answers one.
    """

    def __init__(self, secret: bytes) -> None:
        self._signer = Signer(secret, salt=_SALT, digest_method=hashlib.sha256)

    def issue(self, position: int) -> str:
        return self._signer.sign(format(position, "x")).decode("ascii")

    def read(self, token: str) -> int:
        """The position `token` names; InvalidArgument (on the metadata key) if it is not ours."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise invalid_token(f"must be at most {MAX_TOKEN_LENGTH} characters")
        try:
            position = int(self._signer.unsign(token), 16)
        except (BadData, ValueError):
            raise invalid_token("is not a consistency token issued by this service") from None
        if not 0 <= position <= MAX_POSITION:
            raise invalid_token("is not a consistency token issued by this service")
        return position


class ReadYourWrites:
    """Wraps each unary UserService behavior: the call's token in, the answer's token out."""

    def __init__(self, tokens: ConsistencyTokens) -> None:
        self._tokens = tokens

    def wrap(self, behavior: Behavior) -> Behavior:
        tokens = self._tokens

        async def consistent(request: Any, context: Context) -> Any:
            call = self._requested(context)
            reset = _current.set(call)
            try:
                return await behavior(request, context)
            finally:  # a domain error (NOT_FOUND, ...) was answered at a position too
                _current.reset(reset)
                if call.served is not None:
                    trailers = tuple(context.trailing_metadata() or ())
                    token = (TOKEN_KEY, tokens.issue(call.served))
                    context.set_trailing_metadata((*trailers, token))

        return consistent

    def _requested(self, context: Context) -> CallConsistency:
        call = CallConsistency()
        for key, value in context.invocation_metadata() or ():
            if key == TOKEN_KEY:
                if not isinstance(value, str):
                    raise invalid_token("must be text")
                call.required = self._tokens.read(value)
            elif key == READ_FROM_KEY:
                if value != PRIMARY:
                    description = f'must be "{PRIMARY}" (or absent: any up-to-date database)'
                    raise InvalidArgument([FieldViolation(READ_FROM_KEY, description)])
                call.primary_only = True
        return call
