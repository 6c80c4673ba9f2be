"""list-flood: connections x streams of ListUsers(page_size 1000) with a deadline."""

import asyncio
import time

from pat.users.v1 import user_service_pb2 as pb
from toolkit.floods.calls import FloodResult, counted_call, raw_method, separate_channel
from toolkit.floods.statuses import REFUSED_STREAM

# A refused stream comes back at once. Re-issued at once, a flood only spins:
# tens of thousands of refusals a second that starve every other flood and
# monitor in its process (seen in CI: the patient flood then never reached the
# admission cap). A real client's retry policy backs off; so does the flood.
REFUSED_STREAM_PAUSE = 0.02


async def list_flood(
    address: str,
    *,
    seconds: float,
    connections: int = 200,
    streams: int = 100,
    deadline: float = 10.0,
    page_size: int = 1000,
) -> FloodResult:
    """`connections` x `streams` ListUsers calls kept in flight for `seconds`.

    Each stream issues its next call as soon as the last one ends. When time is
    up no new call starts, and the flood waits for the calls in flight (each
    ends by its deadline) before closing its channels: closing a channel
    earlier would cancel them here, and count CANCELLED that no server sent.
    """
    result = FloodResult(extra={"issued": 0})
    request = pb.ListUsersRequest(page_size=page_size).SerializeToString()
    stop_at = time.monotonic() + seconds

    async def connection(n: int) -> None:
        async with separate_channel(address, f"list-flood-{n}") as channel:
            list_users = raw_method(channel, "ListUsers")

            async def stream() -> None:
                while time.monotonic() < stop_at:
                    result.extra["issued"] += 1
                    status = await counted_call(list_users, request, deadline, result.statuses)
                    if status == REFUSED_STREAM:
                        await asyncio.sleep(REFUSED_STREAM_PAUSE)

            await asyncio.gather(*(stream() for _ in range(streams)))

    await asyncio.gather(*(connection(n) for n in range(connections)))
    return result
