"""The change stream's figures: what the outbox costs writes, and change-to-watcher latency.

- CreateUser with the outbox (the trigger of migration 0002 writes a change
  and NOTIFYs in every write's transaction) and without it (the trigger
  disabled), runs interleaved on one server: the outbox's cost per write.
- Change-to-watcher latency: WATCHERS watches open, CreateUser calls paced
  at about WRITE_RATE per second; for every change each watcher receives,
  the time from the write's start to its arrival (p50, p99).
- Memory: the worker's RSS with CROWD watches open, STALLED of which never
  read, before and after CROWD_WRITES creates (32 in flight): the stalled
  ones must have been ended, and RSS must not follow the changes sent.
"""

import asyncio
import time
import uuid

import grpc

from bench import servers
from bench.load import Run, percentiles
from bench.sections import Bench, Runner, rows, write_runner
from bench.servers import Server
from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from toolkit.databases import execute
from toolkit.processes import rss_mb

WATCHERS = 10
CROWD, STALLED, CROWD_WRITES = 100, 10, 5000
WRITES = 600
WRITE_RATE = 200  # per second
TRIGGER = "users_record_change"


def watch(bench: Bench, url: str) -> None:
    with servers.service(url, bench.pool_size, workers=1) as service:
        _outbox_cost(bench, url, service)
        latencies = asyncio.run(_change_latencies(service.address))
        crowd = asyncio.run(_crowd(service))
    bench.report.figures["watch_memory"] = crowd
    bench.report.note(
        f"WatchUsers memory: {CROWD} watches ({STALLED} never reading), {CROWD_WRITES:,} creates:"
        f" worker RSS {crowd['rss_before_mb']:.0f} -> {crowd['rss_after_mb']:.0f} MB;"
        f" {crowd['stalled_ended']} of {STALLED} stalled watches ended as too slow"
    )
    p50, p99 = percentiles(latencies)
    bench.report.figures["watch"] = {
        "watchers": WATCHERS,
        "writes": WRITES,
        "write_rate": WRITE_RATE,
        "deliveries": len(latencies),
        "p50_ms": p50,
        "p99_ms": p99,
    }
    bench.report.note(
        f"WatchUsers: {WATCHERS} watchers, {WRITES} creates at ~{WRITE_RATE}/s: change-to-watcher"
        f" latency (write start to arrival) p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        f" over {len(latencies):,} deliveries"
    )


def _outbox_cost(bench: Bench, url: str, service: Server) -> None:
    with_outbox = _toggled(url, service, write_runner(bench, service, "CreateUser"), enable=True)
    without = _toggled(url, service, write_runner(bench, service, "CreateUser"), enable=False)
    rows(
        bench,
        [
            ("CreateUser (outbox)", service, with_outbox),
            ("CreateUser (no outbox)", service, without),
        ],
    )
    execute(url, f"ALTER TABLE users ENABLE TRIGGER {TRIGGER}")
    outbox = bench.report.find("CreateUser (outbox)", service.name)
    plain = bench.report.find("CreateUser (no outbox)", service.name)
    if outbox and plain and plain.rps:
        bench.report.note(
            f"outbox: CreateUser {outbox.rps:,.0f} rps with it, {plain.rps:,.0f} without"
            f" ({100 * (outbox.rps / plain.rps - 1):+.0f} %)"
        )


def _toggled(url: str, service: Server, runner: Runner, *, enable: bool) -> Runner:
    state = "ENABLE" if enable else "DISABLE"

    def run() -> Run:
        execute(url, f"ALTER TABLE users {state} TRIGGER {TRIGGER}")
        return runner()

    return run


async def _change_latencies(address: str) -> list[float]:
    """Seconds from each write's start to each watcher's receipt of its change."""
    started: dict[str, float] = {}
    arrivals: list[tuple[str, float]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = UserServiceStub(channel)
        calls = [stub.WatchUsers(pb.WatchUsersRequest()) for _ in range(WATCHERS)]
        for call in calls:
            await call.read()  # the first heartbeat: the watch is in place
        readers = [asyncio.ensure_future(_arrivals(call, arrivals)) for call in calls]
        tag = uuid.uuid4().hex[:8]
        for n in range(WRITES):
            email = f"watch-{tag}-{n}@example.com"
            started[email] = time.perf_counter()
            await stub.CreateUser(pb.CreateUserRequest(user=user_pb2.User(email=email)))
            await asyncio.sleep(max(0.0, started[email] + 1 / WRITE_RATE - time.perf_counter()))
        await asyncio.sleep(1)
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    return [at - started[email] for email, at in arrivals if email in started]


async def _arrivals(call: grpc.aio.UnaryStreamCall, into: list[tuple[str, float]]) -> None:
    while (response := await call.read()) is not grpc.aio.EOF:
        now = time.perf_counter()
        into.extend((change.user.email, now) for change in response.changes.changes)


async def _crowd(service: Server) -> dict[str, float]:
    """RSS around a write burst with many watches open, some of which never read."""
    own = [("grpc.use_local_subchannel_pool", 1)]
    # Without BDP probing a stalled caller's window stays at 64 KiB.
    stalled_options = [*own, ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.aio.insecure_channel(service.address, options=own) for _ in range(4)]
    stalled_channel = grpc.aio.insecure_channel(service.address, options=stalled_options)
    try:
        stubs = [UserServiceStub(channel) for channel in channels]
        calls = [stubs[n % 4].WatchUsers(pb.WatchUsersRequest()) for n in range(CROWD - STALLED)]
        stalled = [
            UserServiceStub(stalled_channel).WatchUsers(pb.WatchUsersRequest())
            for _ in range(STALLED)
        ]
        for call in (*calls, *stalled):
            await call.read()
        readers = [asyncio.ensure_future(_arrivals(call, [])) for call in calls]
        before = rss_mb(service.pid)
        async with grpc.aio.insecure_channel(service.address, options=own) as writes:
            await _burst(UserServiceStub(writes), CROWD_WRITES)
        await asyncio.sleep(1)
        after = rss_mb(service.pid)
        ended = [await _ended_as_too_slow(call) for call in stalled]
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    finally:
        for channel in (*channels, stalled_channel):
            await channel.close()
    return {"rss_before_mb": before, "rss_after_mb": after, "stalled_ended": sum(ended)}


async def _burst(stub: UserServiceStub, writes: int) -> None:
    tag, in_flight = uuid.uuid4().hex[:8], asyncio.Semaphore(32)

    async def create(n: int) -> None:
        async with in_flight:
            user = user_pb2.User(email=f"crowd-{tag}-{n}@example.com", display_name="x" * 100)
            await stub.CreateUser(pb.CreateUserRequest(user=user))

    await asyncio.gather(*(create(n) for n in range(writes)))


async def _ended_as_too_slow(call: grpc.aio.UnaryStreamCall) -> bool:
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.UNAVAILABLE and "too far behind" in (
            error.details() or ""
        )
    return False
