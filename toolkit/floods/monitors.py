"""What watches a server from outside during a flood, as operators and load balancers do.

- its RSS (with its workers'), every 0.25 s;
- Health.Watch on "": how often SERVING flipped to NOT_SERVING, and for how long;
- a well-behaved caller on its own connection: GetUser every 100 ms, 5 s
  deadline, retrying OVERLOADED refusals with backoff as a gRPC retry policy would.
"""

import asyncio
import contextlib
import itertools
import math
import random
import statistics
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pat.users.v1 import user_service_pb2 as pb
from toolkit.floods.calls import raw_method, separate_channel
from toolkit.floods.statuses import OVERLOADED, Statuses, status_key
from toolkit.processes import tree_rss_mb

SERVING = health_pb2.HealthCheckResponse.SERVING


class RssMonitor:
    """Samples a process's RSS every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []

    async def run(self) -> None:
        while (value := tree_rss_mb(self.pid)) is not None:
            self.samples.append((time.monotonic(), value))
            await asyncio.sleep(self.interval)

    def peak(self, since: float) -> float:
        return max((mb for t, mb in self.samples if t >= since), default=0.0)

    def timeline(self, since: float, step: float = 1.0) -> list[tuple[float, float]]:
        """(seconds since `since`, MiB) about every `step` seconds, for the JSON."""
        picked: list[tuple[float, float]] = []
        for t, mb in self.samples:
            if t >= since and (not picked or t - since - picked[-1][0] >= step):
                picked.append((round(t - since, 2), round(mb, 1)))
        return picked


class HealthWatch:
    """Health.Watch on "" for the whole run: every status, and the stream's failures."""

    def __init__(self, address: str, service: str = "") -> None:
        self.address = address
        self.service = service
        self.events: list[tuple[float, int]] = []
        self.stream_errors: list[str] = []

    async def run(self) -> None:
        async with separate_channel(self.address, "health-watch") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=self.service)
            while True:
                try:
                    async for reply in stub.Watch(request):
                        self.events.append((time.monotonic(), int(reply.status)))
                except grpc.aio.AioRpcError as error:
                    self.stream_errors.append(str(error.code().name))
                    await asyncio.sleep(0.2)

    def flips(self) -> int:
        """SERVING → anything else transitions."""
        statuses = [status for _, status in self.events]
        return sum(1 for a, b in itertools.pairwise(statuses) if a == SERVING != b)

    def statuses_seen(self) -> list[str]:
        names = health_pb2.HealthCheckResponse.ServingStatus.Name
        return sorted({names(status) for _, status in self.events})  # type: ignore[arg-type]

    def not_serving_seconds(self, until: float) -> float:
        total = 0.0
        for (t, status), (t_next, _) in zip(
            self.events, [*self.events[1:], (until, SERVING)], strict=True
        ):
            if status != SERVING:
                total += t_next - t
        return total


class WellBehavedCaller:
    """GetUser of a real user every `interval` s with a `deadline`, on its own connection.

    With `retry`, an OVERLOADED refusal is retried after a jittered exponential
    backoff (50 ms doubling to 1 s) while the call's deadline allows, as a gRPC
    retry policy on UNAVAILABLE would; the latency is the whole call's.
    """

    def __init__(
        self,
        address: str,
        user_id: str,
        *,
        interval: float = 0.1,
        deadline: float = 5.0,
        retry: bool = True,
    ) -> None:
        self.address = address
        self.request = pb.GetUserRequest(id=user_id).SerializeToString()
        self.interval = interval
        self.deadline = deadline
        self.retry = retry
        self.latencies: list[float] = []
        self.statuses = Statuses()
        self.retries = 0
        self._calls: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        async with separate_channel(self.address, "well-behaved") as channel:
            get_user = raw_method(channel, "GetUser")
            while not self._stopping.is_set():
                task = asyncio.create_task(self._one(get_user))
                self._calls.add(task)
                task.add_done_callback(self._calls.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.interval)
            await asyncio.gather(*self._calls)

    def stop(self) -> None:
        """No new calls; `run` returns once the calls in flight have ended."""
        self._stopping.set()

    async def _one(self, get_user: Any) -> None:
        started = time.monotonic()
        backoff = 0.05
        while True:
            remaining = self.deadline - (time.monotonic() - started)
            try:
                await get_user(self.request, timeout=max(remaining, 0.001))
            except grpc.aio.AioRpcError as error:
                pause = backoff * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
                if self.retry and status_key(error) == OVERLOADED and remaining > pause + 0.05:
                    self.retries += 1
                    await asyncio.sleep(pause)
                    backoff = min(backoff * 2, 1.0)
                    continue
                self.statuses.failed(error, time.monotonic() - started)
            else:
                self.statuses.ok(time.monotonic() - started)
            self.latencies.append(time.monotonic() - started)
            return

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        p99 = ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)] if ordered else 0.0
        failures = {k: v for k, v in self.statuses.counts.items() if k != "OK"}
        return {
            "calls": len(ordered),
            "failures": failures,
            "retries": self.retries,
            "p50_ms": round(statistics.median(ordered) * 1000, 1) if ordered else 0.0,
            "p99_ms": round(p99 * 1000, 1),
            "worst_ms": round(ordered[-1] * 1000, 1) if ordered else 0.0,
            "messages": self.statuses.messages,
        }
