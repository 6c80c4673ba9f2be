"""Domain errors and their one mapping to gRPC statuses with google.rpc details.

Handlers raise; `ErrorMappingInterceptor` turns whatever escapes an RPC into a
status a caller can act on. Nothing a caller sees carries SQL, tracebacks,
connection strings or another user's data: unexpected errors become a generic
INTERNAL and their traceback goes to the log only.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy import exc as sa_exc

logger = logging.getLogger(__name__)

USER_RESOURCE_TYPE = "pat.users.v1.User"
ERROR_DOMAIN = "users.pat"

# SQLSTATEs (PostgreSQL appendix A) that mean "the database is not usable now".
_UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53000", "53300"}
_QUERY_CANCELED = "57014"
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


class InvalidArgument(ServiceError):
    code = code_pb2.INVALID_ARGUMENT

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid {fields}: " + "; ".join(v.description for v in violations))
        self.violations = violations

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


class UndecodableRequest(ServiceError):
    """The request bytes are not the message the method takes."""

    code = code_pb2.INVALID_ARGUMENT

    def __init__(self) -> None:
        super().__init__(
            "the request is not a valid protobuf message for this method "
            "(corrupt wire format, or a string field that is not UTF-8)"
        )


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


def _sqlstate(error: sa_exc.DBAPIError) -> str:
    return str(getattr(error.orig, "sqlstate", "") or "")


def is_unique_violation(error: sa_exc.DBAPIError) -> bool:
    return _sqlstate(error) == UNIQUE_VIOLATION


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


Request = TypeVar("Request")
Response = TypeVar("Response")

# grpc's stubs type handlers as synchronous; on an aio server they are coroutines.
Behavior = Callable[[Any, Any], Any]


class _Undecodable:
    """Stands in for a request whose bytes did not parse."""


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    # grpc would answer a parse failure with UNKNOWN and the parser's text;
    # deferring it to the handler lets it become INVALID_ARGUMENT like any bad input.
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return _Undecodable()

    return deserialize


def _with_error_mapping(behavior: Behavior, method: str) -> Behavior:
    async def mapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, _Undecodable):
                raise UndecodableRequest()
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler already chose its status
        except Exception as error:
            await context.abort_with_status(rpc_status.to_status(to_rpc_status(error, method)))

    return mapped


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Applies `to_rpc_status` to every unary RPC of the server."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Request, Response] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Request, Response] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _with_error_mapping(handler.unary_unary, handler_call_details.method),
            request_deserializer=(
                _tolerant(handler.request_deserializer) if handler.request_deserializer else None
            ),
            response_serializer=handler.response_serializer,
        )
