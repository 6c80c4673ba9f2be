"""Domain errors and their one mapping to gRPC statuses with google.rpc details.

Handlers raise; the one per-call wrapper (guards.py) hands whatever escapes
an RPC to `abort`, which turns it into a status a caller can act on. Nothing
a caller sees carries SQL, tracebacks, connection strings or another user's
data: unexpected errors become a generic INTERNAL and their traceback goes
to the log only.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

logger = logging.getLogger(__name__)

USER_RESOURCE_TYPE = "pat.users.v1.User"
ERROR_DOMAIN = "users.pat"

# SQLSTATEs (PostgreSQL appendix A) that mean "the database is not usable now".
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53000", "53300"}
_QUERY_CANCELED = "57014"
# PostgreSQL rolled the transaction back to resolve a conflict with another:
# the ErrorInfo reason for each; running the call again is safe.
_CONFLICT_REASONS = {"40P01": "DEADLOCK_DETECTED", "40001": "SERIALIZATION_FAILURE"}
UNIQUE_VIOLATION = "23505"


class ServiceError(Exception):
    """An error whose message and details are fit for the caller."""

    code: int = code_pb2.INTERNAL

    def details(self) -> list[Message]:
        return []


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the request path, e.g. "user.email" or "ids[3]"
    description: str


# An error's trailers must stay well under a default client's 8 KB metadata
# limit (past it the caller sees RESOURCE_EXHAUSTED, not the violations):
# five violations say what to fix; the message counts the rest.
MAX_LISTED_VIOLATIONS = 5
# Our own descriptions are shorter; email_validator's can list many characters.
MAX_DESCRIPTION_LENGTH = 160


class InvalidArgument(ServiceError):
    """Bad request fields: the first MAX_LISTED_VIOLATIONS listed, the rest counted.

    `unlisted` is how many more violations the request has beyond `violations`;
    a list longer than the cap is cut here and its excess counted too. The
    count is exact: checks keep counting past the cap, which stays cheap
    because repeated fields are bounded before any per-element check.
    """

    code = code_pb2.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation], unlisted: int = 0) -> None:
        self.violations = [
            FieldViolation(v.field, _bounded(v.description))
            for v in violations[:MAX_LISTED_VIOLATIONS]
        ]
        self.unlisted = unlisted + len(violations) - len(self.violations)
        super().__init__(self._message())

    def _message(self) -> str:
        message = "invalid request: " + "; ".join(
            f"{v.field} {v.description}" for v in self.violations
        )
        if self.unlisted:
            plural = "s" if self.unlisted > 1 else ""
            message += f"; and {self.unlisted} more violation{plural}"
        return message

    def details(self) -> list[Message]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        ]


def _bounded(description: str) -> str:
    """`description` in ASCII and at most MAX_DESCRIPTION_LENGTH characters.

    grpc-message percent-encodes every non-ASCII byte (up to 12 characters
    for one code point); escaping keeps the trailers' size a known bound.
    """
    ascii_only = description.encode("ascii", "backslashreplace").decode("ascii")
    if len(ascii_only) <= MAX_DESCRIPTION_LENGTH:
        return ascii_only
    return ascii_only[: MAX_DESCRIPTION_LENGTH - 3] + "..."


class NotFound(ServiceError):
    code = code_pb2.NOT_FOUND

    def __init__(self, resource_name: str, message: str | None = None) -> None:
        super().__init__(message or f"user {resource_name} not found")
        self.resource_name = resource_name

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=USER_RESOURCE_TYPE,
                resource_name=self.resource_name,
                description=str(self),
            )
        ]


class EmailTaken(ServiceError):
    """Another live user has the email. Which user is not said: that is theirs."""

    code = code_pb2.ALREADY_EXISTS

    def __init__(self) -> None:
        super().__init__("a live user with this email already exists")

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ResourceInfo(
                resource_type=USER_RESOURCE_TYPE, description="email is in use"
            )
        ]


class EtagMismatch(ServiceError):
    code = code_pb2.ABORTED

    def __init__(self, user_id: str) -> None:
        super().__init__(f"etag does not match user {user_id}'s current etag; re-read and retry")
        self.user_id = user_id

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ErrorInfo(
                reason="ETAG_MISMATCH", domain=ERROR_DOMAIN, metadata={"id": self.user_id}
            )
        ]


class RequestIdReused(ServiceError):
    """CreateUser's request_id came back with a different user than the first time."""

    code = code_pb2.INVALID_ARGUMENT

    def __init__(self) -> None:
        super().__init__("request_id was already used to create a different user")

    def details(self) -> list[Message]:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field="request_id", description=str(self)
        )
        return [error_details_pb2.BadRequest(field_violations=[violation])]


class NotDeleted(ServiceError):
    code = code_pb2.FAILED_PRECONDITION

    def __init__(self, user_id: str) -> None:
        super().__init__(f"user {user_id} is not deleted")
        self.user_id = user_id

    def details(self) -> list[Message]:
        violation = error_details_pb2.PreconditionFailure.Violation(
            type="STATE", subject=f"users/{self.user_id}", description=str(self)
        )
        return [error_details_pb2.PreconditionFailure(violations=[violation])]


class Overloaded(ServiceError):
    """Admission refused the call (see admission.py); it was not started.

    `share_of`: the caller whose share of the calls in progress was full
    (MAX_CONCURRENT_RPCS_PER_CALLER); None when the server as a whole was.
    """

    code = code_pb2.UNAVAILABLE
    RETRY_DELAY_SECONDS = 0.2

    def __init__(self, share_of: str | None = None) -> None:
        super().__init__(
            f"caller {share_of} holds its whole share of the server; retry with backoff"
            if share_of
            else "the server is overloaded; retry with backoff"
        )
        self.share_of = share_of

    def details(self) -> list[Message]:
        retry_delay = duration_pb2.Duration()
        retry_delay.FromTimedelta(timedelta(seconds=self.RETRY_DELAY_SECONDS))
        metadata = {"share_of": self.share_of} if self.share_of else {}
        return [
            error_details_pb2.ErrorInfo(
                reason="OVERLOADED", domain=ERROR_DOMAIN, metadata=metadata
            ),
            error_details_pb2.RetryInfo(retry_delay=retry_delay),
        ]


class Unauthenticated(ServiceError):
    """No valid credentials (auth.py). One message whatever was wrong.

    A missing header, another scheme, an unknown token and an unlisted
    certificate all read alike, so the answer never tells whether a caller exists.
    """

    code = code_pb2.UNAUTHENTICATED

    def __init__(self) -> None:
        super().__init__(
            "missing or invalid credentials: send `authorization: Bearer <token>` "
            "or a client certificate of a known caller"
        )

    def details(self) -> list[Message]:
        return [error_details_pb2.ErrorInfo(reason="UNAUTHENTICATED", domain=ERROR_DOMAIN)]


class PermissionDenied(ServiceError):
    """An authenticated caller whose allow-list (auth.py) lacks the method."""

    code = code_pb2.PERMISSION_DENIED

    def __init__(self, caller: str, method: str) -> None:
        super().__init__(f"caller {caller} may not call {method}")
        self.method = method

    def details(self) -> list[Message]:
        return [
            error_details_pb2.ErrorInfo(
                reason="METHOD_NOT_ALLOWED", domain=ERROR_DOMAIN, metadata={"method": self.method}
            )
        ]


class TransactionConflict(ServiceError):
    """A deadlock or serialization failure rolled the call's transaction back."""

    code = code_pb2.ABORTED

    def __init__(self, reason: str) -> None:
        super().__init__(
            "the call conflicted with a concurrent one and was rolled back; retry the call"
        )
        self.reason = reason

    def details(self) -> list[Message]:
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)]


class ResumeTokenExpired(ServiceError):
    """WatchUsers' resume token points before changes retention has deleted."""

    code = code_pb2.OUT_OF_RANGE

    def __init__(self) -> None:
        super().__init__(
            "resume_token is older than the changes the server keeps; "
            "list the users again, then watch from now"
        )

    def details(self) -> list[Message]:
        return [error_details_pb2.ErrorInfo(reason="RESUME_TOKEN_EXPIRED", domain=ERROR_DOMAIN)]


class WatchEnded(ServiceError):
    """A watch the server ended; the caller resumes from its last resume_token."""

    code = code_pb2.UNAVAILABLE

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{message}; resume from the last resume_token received")
        self.reason = reason

    def details(self) -> list[Message]:
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)]


def watcher_too_slow() -> WatchEnded:
    return WatchEnded("WATCHER_TOO_SLOW", "the watch fell too far behind the changes")


def draining() -> WatchEnded:
    return WatchEnded("DRAINING", "the server is shutting down")


def _sqlstate(error: sa_exc.DBAPIError) -> str:
    return str(getattr(error.orig, "sqlstate", "") or "")


def is_unique_violation(error: sa_exc.DBAPIError) -> bool:
    return _sqlstate(error) == UNIQUE_VIOLATION


def _transaction_conflict(error: Exception) -> TransactionConflict | None:
    """The conflict a deadlock (40P01) or serialization failure (40001) is, or None."""
    if isinstance(error, sa_exc.DBAPIError):
        reason = _CONFLICT_REASONS.get(_sqlstate(error))
        if reason is not None:
            return TransactionConflict(reason)
    return None


def is_transaction_conflict(error: Exception) -> bool:
    """A deadlock or serialization failure, or a standby's recovery conflict (the same codes)."""
    return _transaction_conflict(error) is not None


def is_unavailable(error: Exception) -> bool:
    """The database cannot be used now: down, unreachable, shutting down, no connection free."""
    status = _infrastructure_status(error)
    return status is not None and status[0] == code_pb2.UNAVAILABLE


def _infrastructure_status(error: Exception) -> tuple[int, str] | None:
    """The code for database and network failures, or None if it is not one."""
    unavailable = (code_pb2.UNAVAILABLE, "the database is unavailable; retry later")
    if isinstance(error, sa_exc.TimeoutError):  # no pooled connection in time
        return unavailable
    if isinstance(error, sa_exc.DBAPIError):
        sqlstate = _sqlstate(error)
        if sqlstate == _QUERY_CANCELED:
            return code_pb2.DEADLINE_EXCEEDED, "the database took too long; the work was cancelled"
        if (
            error.connection_invalidated
            or isinstance(error, sa_exc.InterfaceError | sa_exc.OperationalError)
            or sqlstate.startswith("08")
            or sqlstate in _UNAVAILABLE_SQLSTATES
        ):
            return unavailable
    # asyncpg raises these unwrapped while connecting (refused, reset, timed out).
    if isinstance(error, OSError | TimeoutError):
        return unavailable
    return None


def to_rpc_status(error: Exception, method: str) -> status_pb2.Status:
    """The one mapping from an exception to what the caller is told."""
    if isinstance(error, ServiceError):
        code, message, details = error.code, str(error), error.details()
    elif (conflict := _transaction_conflict(error)) is not None:
        code, message, details = conflict.code, str(conflict), conflict.details()
        # The driver's own text, without the statement or its parameters.
        logger.warning("%s aborted (%s): %s", method, conflict.reason, getattr(error, "orig", ""))
    elif (infrastructure := _infrastructure_status(error)) is not None:
        code, message = infrastructure
        details = []
        logger.warning("%s failed: %s: %s", method, type(error).__name__, error)
    else:
        code, message, details = code_pb2.INTERNAL, "internal error", []
        logger.error("%s failed unexpectedly", method, exc_info=error)
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return status_pb2.Status(code=code, message=message, details=packed)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any], error: Exception, method: str
) -> NoReturn:
    """End the RPC with the status `to_rpc_status` gives `error` (raises AbortError).

    The trailing metadata set on the call so far (the access log's
    x-request-id, a consistency token) is sent with the status's own: grpc
    replaces whatever trailers were set before an abort.
    """
    status = rpc_status.to_status(to_rpc_status(error, method))
    trailers = status.trailing_metadata + tuple(context.trailing_metadata() or ())
    await context.abort(status.code, status.details, trailers)
