"""How a flood calls: connections of its own, bytes in and out, every answer counted."""

import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from toolkit.floods.statuses import Statuses

SERVICE = "pat.users.v1.UserService"


@dataclass
class FloodResult:
    """What the flood's own callers saw; `extra` holds flood-specific figures."""

    statuses: Statuses = field(default_factory=Statuses)
    extra: dict[str, Any] = field(default_factory=dict)


def raw_method(channel: grpc.aio.Channel, method: str) -> Any:
    """A unary method that takes and returns bytes: the flood spends no CPU on protobuf."""
    return channel.unary_unary(f"/{SERVICE}/{method}")


def separate_channel(address: str, tag: str) -> grpc.aio.Channel:
    """A channel with a TCP connection of its own.

    gRPC shares one connection among channels with equal arguments; a local
    subchannel pool and a distinct (otherwise unused) argument prevent that.
    """
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.channel_id", tag)]
    return grpc.aio.insecure_channel(address, options=options)


async def counted_call(method: Any, request: bytes, deadline: float, statuses: Statuses) -> str:
    """Make one call and count its answer; returns the answer's status key."""
    started = time.monotonic()
    try:
        await method(request, timeout=deadline)
    except grpc.aio.AioRpcError as error:
        return statuses.failed(error, time.monotonic() - started)
    statuses.ok(time.monotonic() - started)
    return "OK"
