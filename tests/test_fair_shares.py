"""Fair shares: one caller's flood fills its own share of MAX_CONCURRENT_RPCS, never the others'.

The server is a real `python -m service` with two callers in AUTH_TOKENS_FILE;
the flooder runs in a process of its own (toolkit/floods/caller_flood.py),
its UpdateUser calls waiting on a row lock this test holds, so every call it
gets admitted keeps its slot. The steady caller's GetUser calls are timed
before and during the flood.
"""

import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from tests.support import (
    PROJECT_ROOT,
    ServiceProcess,
    eventually,
    fails,
    hold_row_lock,
    service_queries_waiting_for_locks,
    subprocess_env,
    unique_email,
)
from tests.test_auth import bearer, token_line
from tests.test_metrics import metrics_ports, scrape, value

CAP = 8  # MAX_CONCURRENT_RPCS
SHARE = CAP // 2  # MAX_CONCURRENT_RPCS_PER_CALLER's default
FLOOD_CALLS = 64  # calls the flooder keeps in flight: far more than the cap
FLOOD_SECONDS = 8
STEADY_CALLS = 400
STEADY = bearer("steady-token")


def callers(path: Path, steady_weight: int = 1) -> Path:
    weight = f" weight={steady_weight}" if steady_weight != 1 else ""
    lines = [token_line("flooder", "flooder-token"), token_line("steady", "steady-token") + weight]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    return callers(tmp_path / "callers")


@pytest.fixture
def weighted_tokens(tmp_path: Path) -> Path:
    """The steady caller with weight=2: twice MAX_CONCURRENT_RPCS_PER_CALLER."""
    return callers(tmp_path / "weighted", steady_weight=2)


@asynccontextmanager
async def server(url: str, tokens: Path, **env: str) -> AsyncIterator[ServiceProcess]:
    child = await ServiceProcess.start(
        subprocess_env(
            DATABASE_URL=url,
            GRPC_HOST="127.0.0.1",
            GRPC_PORT="0",
            AUTH_TOKENS_FILE=str(tokens),
            MAX_CONCURRENT_RPCS=str(CAP),
            DB_POOL_SIZE=str(CAP),
            DB_MAX_OVERFLOW="0",
            ACCESS_LOG="false",
            SHUTDOWN_DRAIN_SECONDS="0",
            PAGE_TOKEN_SECRET="test-fair-shares-secret",
            **env,
        )
    )
    try:
        yield child
    finally:
        child.stop()


@asynccontextmanager
async def flooding(address: str, user_id: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """The flooder's process, its UpdateUser calls all on `user_id`, for FLOOD_SECONDS."""
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "toolkit.floods.caller_flood", address, "flooder-token", user_id,
        "--calls", str(FLOOD_CALLS), "--seconds", str(FLOOD_SECONDS),
        cwd=PROJECT_ROOT, env=subprocess_env(), stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield flood
    finally:
        if flood.returncode is None:
            flood.kill()
            await flood.wait()


async def created(stub: UserServiceStub) -> user_pb2.User:
    request = pb.CreateUserRequest(user=user_pb2.User(email=unique_email(), display_name="S"))
    return (await stub.CreateUser(request, metadata=STEADY)).user


async def latencies(stub: UserServiceStub, user_id: str) -> list[float]:
    """STEADY_CALLS GetUser calls one after another, as the steady caller; seconds each."""
    taken = []
    for _ in range(STEADY_CALLS):
        started = time.perf_counter()
        await stub.GetUser(pb.GetUserRequest(id=user_id), metadata=STEADY, timeout=5)
        taken.append(time.perf_counter() - started)
    return taken


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def ms(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:.2f} ms, p99 {p99(samples) * 1000:.2f} ms"


async def test_a_flood_fills_its_own_share_and_the_steady_caller_is_served_as_before(
    migrated_database: Callable[[], Awaitable[str]], tokens: Path
) -> None:
    url = await migrated_database()
    async with (
        server(url, tokens, METRICS_PORT="0") as child,
        grpc.aio.insecure_channel(child.address) as channel,
    ):
        stub = UserServiceStub(channel)
        steady_user, flooded_user = await created(stub), await created(stub)
        await latencies(stub, steady_user.id)  # warm up connections and statement caches
        unloaded = await latencies(stub, steady_user.id)

        lock = await hold_row_lock(url, flooded_user.id)
        try:
            async with flooding(child.address, flooded_user.id) as flood:
                # The flooder holds its whole share, and no more: SHARE updates wait on the lock.
                waiting = lambda: service_queries_waiting_for_locks(url, "UPDATE")  # noqa: E731
                await eventually(waiting, SHARE, within=20)
                loaded = await latencies(stub, steady_user.id)
                assert flood.returncode is None, "the flood ended before the steady caller did"
                assert await waiting() == SHARE
                output, _ = await flood.communicate()
        finally:
            await lock.close()
        (port,) = metrics_ports(child)
        scraped = await asyncio.to_thread(scrape, port)
    ended = json.loads(output)
    refused = "pat_users_rpc_refused_by_caller_total"
    assert (
        value(scraped, refused, 'caller="flooder"')
        == ended["UNAVAILABLE/OVERLOADED share_of=flooder"]
    )
    assert value(scraped, refused, 'caller="steady"') is None
    print(f"\nsteady caller, {STEADY_CALLS} GetUser one after another, each phase:")
    print(f"  unloaded:         {ms(unloaded)}")
    print(f"  during the flood: {ms(loaded)}  (flooder's calls: {ended})")
    assert ended["UNAVAILABLE/OVERLOADED share_of=flooder"] > FLOOD_CALLS  # refused, and again
    assert p99(loaded) < 5 * p99(unloaded)


async def test_without_shares_the_flood_takes_every_slot(
    migrated_database: Callable[[], Awaitable[str]], tokens: Path
) -> None:
    """The control: a share as large as the cap, and the steady caller is refused."""
    url = await migrated_database()
    async with (
        server(url, tokens, MAX_CONCURRENT_RPCS_PER_CALLER=str(CAP)) as child,
        grpc.aio.insecure_channel(child.address) as channel,
    ):
        stub = UserServiceStub(channel)
        steady_user, flooded_user = await created(stub), await created(stub)
        lock = await hold_row_lock(url, flooded_user.id)
        try:
            async with flooding(child.address, flooded_user.id):
                waiting = lambda: service_queries_waiting_for_locks(url, "UPDATE")  # noqa: E731
                await eventually(waiting, CAP, within=20)
                failure = await fails(
                    stub.GetUser(pb.GetUserRequest(id=steady_user.id), metadata=STEADY)
                )
        finally:
            await lock.close()
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    info = failure.detail(error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == ("OVERLOADED", {})  # the server's cap, not a share


async def test_a_weighted_caller_holds_its_weight_in_shares_then_is_told_whose_is_full(
    migrated_database: Callable[[], Awaitable[str]], weighted_tokens: Path
) -> None:
    url = await migrated_database()
    async with (
        server(url, weighted_tokens, MAX_CONCURRENT_RPCS_PER_CALLER="1") as child,
        grpc.aio.insecure_channel(child.address) as channel,
    ):
        stub = UserServiceStub(channel)
        user = await created(stub)
        lock = await hold_row_lock(url, user.id)
        try:
            request = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="x"))
            held = [
                asyncio.ensure_future(stub.UpdateUser(request, metadata=STEADY, timeout=20))
                for _ in range(2)
            ]
            waiting = lambda: service_queries_waiting_for_locks(url, "UPDATE")  # noqa: E731
            await eventually(waiting, 2)  # weight 2: two calls in progress
            failure = await fails(stub.GetUser(pb.GetUserRequest(id=user.id), metadata=STEADY))
        finally:
            await lock.close()
        await asyncio.gather(*held)
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    info = failure.detail(error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == ("OVERLOADED", {"share_of": "steady"})
    assert failure.detail(error_details_pb2.RetryInfo).retry_delay.ToMilliseconds() > 0
