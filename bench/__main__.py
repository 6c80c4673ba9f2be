"""`python -m bench`: throughput and latency of a real `python -m service` process.

The server runs as its own process on a throw-away embedded PostgreSQL (or on
BENCH_DATABASE_URL). Read RPCs are driven by h2load (nghttp2-client), real
HTTP/2 gRPC traffic from a C client; writes, which need a different body per
call, by a grpc.aio client in this process. Figures are printed, not asserted:
they depend on the machine. On 2 cores the load generator, the server and
PostgreSQL share the CPU, so treat them as a floor.
"""

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.migrations import upgrade_to_head

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "pat.users.v1.UserService"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10, help="duration of each run")
    parser.add_argument("--concurrency", type=int, default=64, help="RPCs in flight")
    parser.add_argument("--users", type=int, default=2000, help="users created before reads")
    args = parser.parse_args()
    with database() as url:
        upgrade_to_head(url)
        with service_process(url) as address:
            asyncio.run(run_all(address, args))


@contextmanager
def database() -> Iterator[str]:
    if url := os.environ.get("BENCH_DATABASE_URL"):
        yield url
        return
    from service.embedded import embedded_postgres

    with (
        tempfile.TemporaryDirectory(prefix="pat-users-bench-") as folder,
        embedded_postgres(Path(folder) / "pgdata") as url,
    ):
        yield url


@contextmanager
def service_process(database_url: str) -> Iterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "GRPC_PORT": str(port),
        "GRPC_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_DRAIN_SECONDS": "0",
        "DB_POOL_SIZE": "20",
    }
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=PROJECT_ROOT, env=env)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def run_all(address: str, args: argparse.Namespace) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        stub = UserServiceStub(channel)
        await wait_serving(stub)
        print(
            f"# pat-users benchmark: {args.concurrency} RPCs in flight, {args.seconds:g}s per run"
        )
        print(f"{'RPC':<36}{'client':<10}{'req/s':>10}{'mean ms':>10}{'p99/max ms':>12}")

        created = await python_load(
            lambda n: stub.CreateUser(
                pb.CreateUserRequest(
                    user=user_pb2.User(email=f"bench-{uuid.uuid4().hex}@example.com")
                )
            ),
            args.concurrency,
            args.seconds,
            limit=args.users,
        )
        report("CreateUser", "grpc.aio", created)
        users = list((await stub.ListUsers(pb.ListUsersRequest(page_size=1000))).users)
        one = users[len(users) // 2]

        reads: list[tuple[str, str, Message]] = [
            ("GetUser", "GetUser", pb.GetUserRequest(id=one.id)),
            ("LookupUser", "LookupUser", pb.LookupUserRequest(email=one.email.upper())),
            ("ListUsers (50 per page)", "ListUsers", pb.ListUsersRequest()),
            (
                "BatchGetUsers (100 ids)",
                "BatchGetUsers",
                pb.BatchGetUsersRequest(ids=[u.id for u in users[:100]]),
            ),
        ]
        for label, method, request in reads:
            await getattr(stub, method)(request)  # h2load counts HTTP 200s: check it works first
            if shutil.which("h2load"):
                report(label, "h2load", h2load(address, method, request, args))
            else:
                call = getattr(stub, method)
                result = await python_load(
                    lambda n, call=call, request=request: call(request),
                    args.concurrency,
                    args.seconds,
                )
                report(label, "grpc.aio", result)

        updated = await python_load(
            lambda n: stub.UpdateUser(
                pb.UpdateUserRequest(
                    user=user_pb2.User(id=users[n % len(users)].id, display_name=f"n{n}")
                )
            ),
            args.concurrency,
            args.seconds,
        )
        report("UpdateUser", "grpc.aio", updated)
        if not shutil.which("h2load"):
            print("# h2load not found (apt-get install nghttp2-client): reads used grpc.aio too")


async def wait_serving(stub: UserServiceStub) -> None:
    for _ in range(100):
        try:
            await stub.ListUsers(pb.ListUsersRequest(page_size=1), timeout=1)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    raise SystemExit("the service did not start")


Result = dict[str, float]


async def python_load(
    call: Callable[[int], Awaitable[Any]],
    concurrency: int,
    seconds: float,
    limit: int | None = None,
) -> Result:
    """Keep `concurrency` calls in flight for `seconds` (or `limit` calls)."""
    latencies: list[float] = []
    counter = iter(range(limit if limit is not None else sys.maxsize))
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        for n in counter:
            if limit is None and time.monotonic() > deadline:
                return
            started = time.perf_counter()
            await call(n)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "rps": len(latencies) / elapsed,
        "mean_ms": statistics.fmean(ordered) * 1000,
        "tail_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
    }


def h2load(address: str, method: str, request: Message, args: argparse.Namespace) -> Result:
    """Real HTTP/2 load from nghttp2's h2load, with a gRPC-framed request body."""
    body = request.SerializeToString()
    with tempfile.NamedTemporaryFile(suffix=".bin") as frame:
        frame.write(struct.pack(">?I", False, len(body)) + body)  # gRPC length-prefixed message
        frame.flush()
        connections = 4
        output = subprocess.run(
            [
                "h2load",
                f"--duration={args.seconds:g}",
                "--warm-up-time=1",
                f"--clients={connections}",
                f"--max-concurrent-streams={max(1, args.concurrency // connections)}",
                "--header=content-type: application/grpc",
                "--header=te: trailers",
                f"--data={frame.name}",
                f"http://{address}/{SERVICE}/{method}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output).group(1))  # type: ignore[union-attr]
    failed = int(re.search(r"(\d+) failed", output).group(1))  # type: ignore[union-attr]
    timing = re.search(r"time for request:\s+(\S+)\s+(\S+)\s+(\S+)", output)
    assert timing is not None, output
    assert failed == 0, output
    return {"rps": rps, "mean_ms": _ms(timing.group(3)), "tail_ms": _ms(timing.group(2))}


_MILLISECONDS_PER = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(value: str) -> float:
    """h2load's "850us", "12.5ms" or "1.2s", in milliseconds."""
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    assert match is not None, value
    return float(match.group(1)) * _MILLISECONDS_PER[match.group(2)]


def report(label: str, client: str, result: Result) -> None:
    print(
        f"{label:<36}{client:<10}{result['rps']:>10.0f}{result['mean_ms']:>10.1f}{result['tail_ms']:>12.1f}"
    )


if __name__ == "__main__":
    main()
