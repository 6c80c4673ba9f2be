"""One authenticated caller flooding the server: `python -m toolkit.floods.caller_flood`.

`calls` loops each keep one UpdateUser of the same user in flight for
`seconds`, with the caller's bearer token; a refusal (OVERLOADED) waits the
RetryInfo delay the server asked for, as a retry policy would. Printed as
JSON: how each call ended, OVERLOADED counted by whose share was full.
Run as a process of its own, so that its calls never share an event loop
with what measures the server (tests/test_fair_shares.py).
"""

import argparse
import asyncio
import json
import time
from collections import Counter

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub

CHANNELS = 4


async def flood(address: str, token: str, user_id: str, calls: int, seconds: float) -> Counter[str]:
    ended: Counter[str] = Counter()
    metadata = (("authorization", f"Bearer {token}"),)
    request = pb.UpdateUserRequest(user=user_pb2.User(id=user_id, display_name="flood"))
    stop_at = time.monotonic() + seconds

    async def keep_one_in_flight(stub: UserServiceStub) -> None:
        while time.monotonic() < stop_at:
            try:
                await stub.UpdateUser(request, metadata=metadata, timeout=2)
                ended["OK"] += 1
            except grpc.aio.AioRpcError as error:
                key, pause = _ending(error)
                ended[key] += 1
                await asyncio.sleep(pause)

    channels = [grpc.aio.insecure_channel(address) for _ in range(CHANNELS)]
    try:
        stubs = [UserServiceStub(channel) for channel in channels]
        await asyncio.gather(*(keep_one_in_flight(stubs[n % CHANNELS]) for n in range(calls)))
    finally:
        for channel in channels:
            await channel.close()
    return ended


def _ending(error: grpc.aio.AioRpcError) -> tuple[str, float]:
    """How a failed call ended ("UNAVAILABLE/OVERLOADED share_of=NAME"), and how long to wait."""
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.reason == "OVERLOADED":
            retry = error_details_pb2.RetryInfo()
            delay = next(
                (retry.retry_delay.ToTimedelta().total_seconds()
                 for d in status.details if d.Unpack(retry)),
                0.2,
            )  # fmt: skip
            whose = info.metadata.get("share_of", "")
            return f"UNAVAILABLE/OVERLOADED share_of={whose}", delay
    return error.code().name, 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("address")
    parser.add_argument("token")
    parser.add_argument("user_id")
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    ended = asyncio.run(flood(args.address, args.token, args.user_id, args.calls, args.seconds))
    print(json.dumps(dict(ended)))


if __name__ == "__main__":
    main()
