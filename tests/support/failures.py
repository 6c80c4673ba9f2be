"""What a caller sees of a failed RPC: its code, its message and its unpacked details."""

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

DetailT = TypeVar("DetailT", bound=Message)

_DETAIL_TYPES: list[type[Message]] = [
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
]


@dataclass
class Failure:
    """What a caller sees of a failed RPC."""

    code: grpc.StatusCode
    message: str
    details: list[Message]

    def detail(self, kind: type[DetailT]) -> DetailT:
        found = [d for d in self.details if isinstance(d, kind)]
        assert len(found) == 1, f"expected one {kind.__name__} in {self.details}"
        return found[0]

    @property
    def bad_fields(self) -> list[str]:
        return [v.field for v in self.detail(error_details_pb2.BadRequest).field_violations]


async def fails(call: Awaitable[Any]) -> Failure:
    """Await an RPC that must fail and return its status with unpacked details."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return failure_of(raised.value)


def failure_of(error: grpc.aio.AioRpcError) -> Failure:
    """The status of a failed RPC with unpacked details, e.g. from asyncio.gather."""
    status = rpc_status.from_call(error)
    details = [_unpack(d) for d in status.details] if status is not None else []
    return Failure(error.code(), error.details() or "", details)


def _unpack(packed: any_pb2.Any) -> Message:
    for kind in _DETAIL_TYPES:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    raise AssertionError(f"unexpected detail type {packed.type_url}")
