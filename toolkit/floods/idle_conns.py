"""idle-conns: TCP connections that never send a byte, while a new client connects every second.

The connections are held by worker processes (toolkit/floods/idle_worker.py):
there may be more of them than one process may hold descriptors.
"""

import asyncio
import contextlib
import json
import math
import resource
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc

from pat.users.v1 import user_service_pb2 as pb
from toolkit import PROJECT_ROOT
from toolkit.floods.calls import FloodResult, raw_method, separate_channel
from toolkit.floods.statuses import status_key
from toolkit.processes import open_fds


async def idle_conns(
    address: str,
    user_id: str,
    *,
    pid: int | None,
    count: int = 20_000,
    hold: float = 75.0,
    probe_interval: float = 1.0,
    probe_deadline: float = 5.0,
) -> FloodResult:
    """`count` TCP connections that never send a byte, held up to `hold` seconds.

    They are opened by worker processes (`count` may exceed this process's
    descriptor limit, which only root can raise past its hard limit), which
    report how many connected and when the server closed each. Meanwhile a new
    client connects every `probe_interval` s and calls GetUser, as a new pod or
    a reconnecting caller would; and the server's descriptors are counted.
    The flood ends early once the server has closed every idle connection.
    """
    result = FloodResult()
    baseline_fds = open_fds(pid) if pid else 0
    fds: list[tuple[float, int]] = []
    probes: list[tuple[float, float, str]] = []
    started = time.monotonic()
    async with _idle_workers(address, count, hold) as workers:
        probing = asyncio.create_task(
            _probe_new_clients(address, user_id, probes, probe_interval, probe_deadline, result)
        )
        try:
            while time.monotonic() - started < hold and not workers.all_closed(count):
                if pid:
                    fds.append((round(time.monotonic() - started, 1), open_fds(pid)))
                await asyncio.sleep(1.0)
        finally:
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)
    result.extra = {
        **workers.totals(),
        "server_fds_baseline": baseline_fds,
        "server_fds_peak": max((n for _, n in fds), default=0),
        "server_fds_timeline": fds,
        "new_clients": _probe_summary(probes),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    return result


async def _probe_new_clients(
    address: str,
    user_id: str,
    probes: list[tuple[float, float, str]],
    interval: float,
    deadline: float,
    result: FloodResult,
) -> None:
    """Every `interval` s, a new connection and one GetUser within `deadline` s."""
    request = pb.GetUserRequest(id=user_id).SerializeToString()
    origin = time.monotonic()
    pending: set[asyncio.Task[None]] = set()

    async def probe(n: int) -> None:
        started = time.monotonic()
        outcome = "OK"
        try:
            async with separate_channel(address, f"new-client-{n}") as channel:
                await raw_method(channel, "GetUser")(request, timeout=deadline)
        except grpc.aio.AioRpcError as error:
            outcome = status_key(error)
        latency = time.monotonic() - started
        probes.append((round(started - origin, 1), latency, outcome))
        result.statuses.count(f"new client {outcome}", seconds=latency)

    try:
        for n in range(sys.maxsize):
            task = asyncio.create_task(probe(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(interval)
    finally:
        await asyncio.gather(*pending, return_exceptions=True)


def _probe_summary(probes: list[tuple[float, float, str]]) -> dict[str, Any]:
    latencies = sorted(latency for _, latency, _ in probes)
    return {
        "count": len(probes),
        "failures": dict(Counter(outcome for _, _, outcome in probes if outcome != "OK")),
        "worst_ms": round(latencies[-1] * 1000, 1) if latencies else 0.0,
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else 0.0,
        "timeline": [(t, round(latency * 1000), outcome) for t, latency, outcome in probes],
    }


class _IdleWorkers:
    """The latest report of each idle-connection worker process."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, Any]] = {}

    def totals(self) -> dict[str, Any]:
        reports = list(self.latest.values())
        lifetimes: Counter[int] = Counter()
        for r in reports:
            lifetimes.update({int(s): n for s, n in r["lifetimes"].items()})
        return {
            "idle_connected": sum(r["connected"] for r in reports),
            "idle_connect_failed": sum(r["failed"] for r in reports),
            "idle_closed_by_server": sum(r["closed"] for r in reports),
            "idle_lifetime_s": _spread(sorted(lifetimes.elements())),
        }

    def all_closed(self, count: int) -> bool:
        reports = list(self.latest.values())
        done = sum(r["closed"] + r["failed"] for r in reports)
        return bool(reports) and all(r["opening_done"] for r in reports) and done >= count


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    """min, median and max of sorted `values`."""
    if not values:
        return None
    return {
        "min": round(values[0], 1),
        "median": round(statistics.median(values), 1),
        "max": round(values[-1], 1),
    }


@asynccontextmanager
async def _idle_workers(address: str, count: int, hold: float) -> AsyncIterator[_IdleWorkers]:
    """Worker processes holding `count` idle connections; stopped (SIGTERM) on exit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per_worker = max(1, hard - 256)
    shares = _split(count, math.ceil(count / per_worker))
    workers = _IdleWorkers()
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "toolkit.floods.idle_worker",
            address,
            str(share),
            str(hold + 30),
            cwd=PROJECT_ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        for share in shares
    ]
    readers = [
        asyncio.create_task(_read_worker(n, process, workers))
        for n, process in enumerate(processes)
    ]
    try:
        yield workers
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*readers, return_exceptions=True)
        for process in processes:
            await process.wait()


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if n < total % parts else 0) for n in range(parts)]


async def _read_worker(n: int, process: asyncio.subprocess.Process, workers: _IdleWorkers) -> None:
    assert process.stdout is not None
    async for line in process.stdout:
        workers.latest[n] = json.loads(line)
