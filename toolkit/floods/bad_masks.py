"""bad-masks: callers sending UpdateUser with a huge invalid update_mask, again and again."""

import asyncio
import time

from google.protobuf import field_mask_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from toolkit.floods.calls import FloodResult, counted_call, raw_method, separate_channel


def bad_mask_request(user_id: str, paths: int) -> bytes:
    """UpdateUser with `paths` invalid update_mask paths "nope0", "nope1", ..."""
    request = pb.UpdateUserRequest(
        user=user_pb2.User(id=user_id, display_name="x"),
        update_mask=field_mask_pb2.FieldMask(paths=[f"nope{i}" for i in range(paths)]),
    )
    return request.SerializeToString()


async def bad_masks(
    address: str,
    user_id: str,
    *,
    seconds: float,
    callers: int = 20,
    paths: int = 100_000,
    deadline: float = 30.0,
) -> FloodResult:
    """`callers` concurrent callers, each on its own connection, sending huge bad masks."""
    result = FloodResult(extra={"request_bytes": 0})
    request = bad_mask_request(user_id, paths)
    result.extra["request_bytes"] = len(request)
    stop_at = time.monotonic() + seconds

    async def caller(n: int) -> None:
        async with separate_channel(address, f"bad-masks-{n}") as channel:
            update_user = raw_method(channel, "UpdateUser")
            while time.monotonic() < stop_at:
                await counted_call(update_user, request, deadline, result.statuses)

    await asyncio.gather(*(caller(n) for n in range(callers)))
    return result
