"""`python -m bench.floods`: hostile and overloading callers against a real server.

Each flood runs against a fresh `python -m service` process (this checkout's,
or another one's with --server-root, e.g. a git worktree of an older commit)
on a throw-away embedded PostgreSQL (or BENCH_DATABASE_URL), while monitors
watch it from outside the way operators and load balancers do:

- the server's RSS from /proc/PID/status, every 0.25 s;
- Health.Watch on "" (how often SERVING flipped to NOT_SERVING, and for how long),
  and whether the log says "pool renewed" (the watcher took load for an outage);
- a well-behaved caller on its own connection: GetUser every 100 ms, 5 s
  deadline, retrying OVERLOADED refusals with backoff as a gRPC retry policy would.

The floods (each an importable coroutine taking an address, so that
tests/test_overload.py runs them at a small scale):

- bad-masks:  callers sending UpdateUser with a huge invalid update_mask, repeatedly;
- list-flood: connections x streams of ListUsers(page_size 1000) with a deadline;
- never-read: raw HTTP/2 clients that open ListUsers streams and never read the socket;
- idle-conns: plain TCP connections that never send a byte, while a new
  client connects every second.

The driver runs each flood in a process of its own, so that its thousands of
calls in flight do not lag the monitors' event loop.

    python -m bench.floods                           # every flood, full size, 30 s each
    python -m bench.floods list-flood --seconds 10 --connections 20
    python -m bench.floods --server-root /tmp/before --json before.json
    python -m bench.floods --env MAX_CONCURRENT_RPCS=40   # a server setting

Figures are printed, and written as JSON with --json. On 2 shared cores the
client, the server and PostgreSQL compete for CPU: compare runs made under
the same conditions, never figures from different machines. RSS is glibc's
view: after a flood it often stays at the high-water mark (freed memory kept
in arenas); --env MALLOC_ARENA_MAX=1 shows what the server still holds.
"""

from __future__ import annotations

import os

# The embedded PostgreSQL forks pg_ctl while gRPC's threads run; gRPC's fork
# handlers can crash such children. This must precede importing grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import math
import random
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import grpc
import h2.config
import h2.connection
import h2.events
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy.engine import make_url

from bench.servers import database
from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE = "pat.users.v1.UserService"
SERVING = health_pb2.HealthCheckResponse.SERVING
OVERLOADED = "UNAVAILABLE/OVERLOADED"
# HTTP/2 REFUSED_STREAM (error code 7): grpc turned the stream away before
# any handler saw it, e.g. past the connection's MAX_CONCURRENT_STREAMS.
REFUSED_STREAM = "UNAVAILABLE/REFUSED_STREAM"
# A refused stream comes back at once. Re-issued at once, a flood only spins:
# tens of thousands of refusals a second that starve every other flood and
# monitor in its process (seen in CI: the patient flood then never reached the
# admission cap). A real client's retry policy backs off; so does the flood.
REFUSED_STREAM_PAUSE = 0.02
FLOODS = ("bad-masks", "list-flood", "never-read", "idle-conns")


# --- statuses -------------------------------------------------------------------------


@dataclass
class Statuses:
    """A histogram of the status codes callers saw, with a few messages of each.

    An UNAVAILABLE refusal from admission control (ErrorInfo reason OVERLOADED)
    is counted apart from other UNAVAILABLEs: only it says "not started, retry".
    The slowest answer of each kind tells who answered: a refusal comes at
    once, an expired deadline after the deadline.
    """

    counts: Counter[str] = field(default_factory=Counter)
    messages: dict[str, list[str]] = field(default_factory=dict)
    slowest_ms: dict[str, float] = field(default_factory=dict)
    # grpc's debug string of the first error of each kind: whether the status
    # came from the server (its trailers) or was made up by the client's core.
    debug: dict[str, str] = field(default_factory=dict)

    def ok(self, seconds: float = 0.0) -> None:
        self.count("OK", seconds=seconds)

    def failed(self, error: grpc.aio.AioRpcError, seconds: float = 0.0) -> str:
        key = status_key(error)
        self.count(key, seconds=seconds)
        seen = self.messages.setdefault(key, [])
        message = (error.details() or "")[:160]
        if len(seen) < 3 and message not in seen:
            seen.append(message)
        if key not in self.debug:
            self.debug[key] = (error.debug_error_string() or "")[:300]
        return key

    def count(self, key: str, n: int = 1, seconds: float = 0.0) -> None:
        self.counts[key] += n
        self.slowest_ms[key] = round(max(self.slowest_ms.get(key, 0.0), seconds * 1000), 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts.most_common()),
            "messages": self.messages,
            "slowest_ms": self.slowest_ms,
            "debug": self.debug,
        }

    def add(self, other: Statuses) -> None:
        """Fold `other` into this histogram."""
        self.counts.update(other.counts)
        for key, slowest in other.slowest_ms.items():
            self.slowest_ms[key] = max(self.slowest_ms.get(key, 0.0), slowest)
        for key, messages in other.messages.items():
            self.messages.setdefault(key, messages)
        for key, debug in other.debug.items():
            self.debug.setdefault(key, debug)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Statuses:
        return cls(Counter(data["counts"]), data["messages"], data["slowest_ms"], data["debug"])


def status_key(error: grpc.aio.AioRpcError) -> str:
    """The code's name; UNAVAILABLE is split into OVERLOADED, REFUSED_STREAM and the rest."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        if error_reason(error) == "OVERLOADED":
            return OVERLOADED
        if "RST_STREAM with error code 7" in (error.details() or ""):
            return REFUSED_STREAM
    return str(code.name)


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The reason of the google.rpc.ErrorInfo in the error's details, if any."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # trailers disagree with the call's status
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return None


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


# --- monitors -------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants: a server may run worker processes (WORKERS)."""
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pending.extend(int(child) for child in children)
    return pids


def rss_mb(pid: int) -> float | None:
    """The resident set (VmRSS) of `pid` and its descendants in MiB; None once it has gone."""
    total = None
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as status:
                kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        total = (total or 0.0) + kb / 1024
    return total


def open_fds(pid: int) -> int:
    """The most file descriptors one process of the server's tree holds.

    The open-file limit is per process: this is what runs into it.
    """
    counts = [0]
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            counts.append(len(os.listdir(f"/proc/{member}/fd")))
    return max(counts)


class RssMonitor:
    """Samples a process's RSS every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []

    async def run(self) -> None:
        while (value := rss_mb(self.pid)) is not None:
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


# --- floods ---------------------------------------------------------------------------


@dataclass
class FloodResult:
    """What the flood's own callers saw; `extra` holds flood-specific figures."""

    statuses: Statuses = field(default_factory=Statuses)
    extra: dict[str, Any] = field(default_factory=dict)


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
                await _call(update_user, request, deadline, result.statuses)

    await asyncio.gather(*(caller(n) for n in range(callers)))
    return result


async def _call(method: Any, request: bytes, deadline: float, statuses: Statuses) -> str:
    """Make one call and count its answer; returns the answer's status key."""
    started = time.monotonic()
    try:
        await method(request, timeout=deadline)
    except grpc.aio.AioRpcError as error:
        return statuses.failed(error, time.monotonic() - started)
    statuses.ok(time.monotonic() - started)
    return "OK"


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
                    status = await _call(list_users, request, deadline, result.statuses)
                    if status == REFUSED_STREAM:
                        await asyncio.sleep(REFUSED_STREAM_PAUSE)

            await asyncio.gather(*(stream() for _ in range(streams)))

    await asyncio.gather(*(connection(n) for n in range(connections)))
    return result


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def never_read(
    address: str,
    *,
    seconds: float,
    connections: int = 200,
    streams: int = 100,
    page_size: int = 1000,
) -> FloodResult:
    """Raw HTTP/2 clients that send ListUsers calls and never read their responses.

    Each connection reads only the server's first SETTINGS (to learn
    MAX_CONCURRENT_STREAMS and acknowledge it), opens as many streams as that
    allows up to `streams`, and then never calls recv again: the responses
    back up into the server, which must hold or drop them. The sockets are
    closed after `seconds`.
    """
    result = FloodResult(extra={"connected": 0, "streams_opened": 0, "server_max_streams": None})
    body = grpc_frame(pb.ListUsersRequest(page_size=page_size).SerializeToString())
    sockets: list[socket.socket] = []
    try:
        await asyncio.gather(
            *(
                _never_reading_connection(address, streams, body, sockets, result)
                for _ in range(connections)
            )
        )
        await asyncio.sleep(seconds)
    finally:
        for sock in sockets:
            sock.close()
    return result


async def _never_reading_connection(
    address: str, streams: int, body: bytes, sockets: list[socket.socket], result: FloodResult
) -> None:
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sockets.append(sock)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    try:
        async with asyncio.timeout(10):
            await loop.sock_connect(sock, (host, int(port)))
            connection.initiate_connection()
            await loop.sock_sendall(sock, connection.data_to_send())
            await _read_server_settings(loop, sock, connection)
            allowed = min(streams, connection.remote_settings.max_concurrent_streams)
            for _ in range(allowed):
                _send_list_users(connection, address, body)
            await loop.sock_sendall(sock, connection.data_to_send())
    except (OSError, TimeoutError, _ServerClosed) as error:
        result.statuses.count(f"connection failed: {type(error).__name__}")
        return
    result.extra["connected"] += 1
    result.extra["streams_opened"] += allowed
    result.extra["server_max_streams"] = connection.remote_settings.max_concurrent_streams


class _ServerClosed(Exception):
    """The server ended the connection before sending its SETTINGS."""


async def _read_server_settings(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, connection: Any
) -> None:
    """The only reads a never-reading client makes: up to the server's first SETTINGS."""
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise _ServerClosed()
        events = connection.receive_data(data)
        await loop.sock_sendall(sock, connection.data_to_send())  # the SETTINGS ACK
        if any(isinstance(event, h2.events.RemoteSettingsChanged) for event in events):
            return


def _send_list_users(connection: Any, address: str, body: bytes) -> None:
    stream_id = connection.get_next_available_stream_id()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", f"/{SERVICE}/ListUsers"),
        (":authority", address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    connection.send_headers(stream_id, headers)
    connection.send_data(stream_id, body, end_stream=True)


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
            "bench.floods",
            "_idle-worker",
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


async def idle_worker(address: str, count: int, hold: float) -> None:
    """In a worker process: hold `count` connections that never send a byte.

    Reports (one JSON line a second) how many connected, failed to connect
    within 5 s, and were closed by the server, with how long each had lived.
    Ends after `hold` seconds or on SIGTERM.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    state: dict[str, Any] = {"connected": 0, "failed": 0, "closed": 0, "opening_done": False}
    # How long each closed connection lived, in whole seconds: {seconds: connections}.
    lifetimes: Counter[int] = Counter()
    host, port = address.rsplit(":", 1)
    gate = asyncio.Semaphore(500)
    sockets: dict[int, socket.socket] = {}

    async def open_one() -> None:
        async with gate:
            sock = socket.socket()
            sock.setblocking(False)
            try:
                async with asyncio.timeout(5):
                    await loop.sock_connect(sock, (host, int(port)))
            except (OSError, TimeoutError):
                sock.close()
                state["failed"] += 1
                return
            state["connected"] += 1
            sockets[sock.fileno()] = sock
            loop.add_reader(sock.fileno(), _on_readable, sock, time.monotonic())

    def _on_readable(sock: socket.socket, opened: float) -> None:
        """The server spoke (its SETTINGS: discarded) or closed the connection."""
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(sock.fileno())
        sockets.pop(sock.fileno(), None)
        sock.close()
        state["closed"] += 1
        lifetimes[int(time.monotonic() - opened)] += 1

    def report() -> None:
        print(json.dumps({**state, "lifetimes": lifetimes}), flush=True)

    async def opener() -> None:
        await asyncio.gather(*(open_one() for _ in range(count)))
        state["opening_done"] = True

    opening = asyncio.create_task(opener())
    deadline = time.monotonic() + hold
    while not stop.is_set() and time.monotonic() < deadline:
        report()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    opening.cancel()
    report()
    for sock in sockets.values():
        sock.close()


# --- observing a flood ----------------------------------------------------------------


@dataclass
class Report:
    """One flood's figures: its own statuses and what the monitors saw meanwhile."""

    flood: str
    params: dict[str, Any]
    statuses: dict[str, Any]
    extra: dict[str, Any]
    flood_seconds: float
    rss_idle_mb: float
    rss_peak_mb: float
    rss_after_mb: float
    rss_timeline: list[tuple[float, float]]
    health_flips: int
    health_not_serving_s: float
    health_statuses: list[str]
    health_stream_errors: list[str]
    pool_renewed: bool
    # The server's ERROR lines during the flood (cleanup after cancelled calls included).
    server_errors: list[str]
    caller: dict[str, Any]


async def observe(
    name: str,
    flood: Callable[[], Awaitable[FloodResult]],
    *,
    address: str,
    pid: int,
    user_id: str,
    log: Sequence[str],
    params: dict[str, Any] | None = None,
    settle: float = 10.0,
    retry: bool = True,
) -> Report:
    """Run `flood` with every monitor on; RSS "after" is read `settle` s after it ends."""
    rss = RssMonitor(pid)
    health = HealthWatch(address)
    caller = WellBehavedCaller(address, user_id, retry=retry)
    log_start = len(log)
    monitors = [asyncio.create_task(m.run()) for m in (rss, health)]
    calling = asyncio.create_task(caller.run())
    try:
        await asyncio.sleep(1.0)
        rss_idle = statistics.median(mb for _, mb in rss.samples) if rss.samples else 0.0
        flood_start = time.monotonic()
        result = await flood()
        flood_end = time.monotonic()
        await asyncio.sleep(settle)
        rss_after = rss_mb(pid) or 0.0
    finally:
        caller.stop()
        await asyncio.wait_for(calling, caller.deadline + 5)
        for monitor in monitors:
            monitor.cancel()
        await asyncio.gather(*monitors, return_exceptions=True)
    return Report(
        flood=name,
        params=params or {},
        statuses=result.statuses.as_dict(),
        extra=result.extra,
        flood_seconds=round(flood_end - flood_start, 1),
        rss_idle_mb=round(rss_idle, 1),
        rss_peak_mb=round(rss.peak(flood_start), 1),
        rss_after_mb=round(rss_after, 1),
        rss_timeline=rss.timeline(flood_start),
        health_flips=health.flips(),
        health_not_serving_s=round(health.not_serving_seconds(time.monotonic()), 1),
        health_statuses=health.statuses_seen(),
        health_stream_errors=health.stream_errors,
        pool_renewed=any("pool renewed" in line for line in list(log)[log_start:]),
        server_errors=[line for line in list(log)[log_start:] if " ERROR " in line],
        caller=caller.summary(),
    )


def format_report(report: Report) -> str:
    """The per-flood table the driver prints."""
    counts = report.statuses["counts"]
    caller = report.caller
    failures = ", ".join(f"{k} {v}" for k, v in caller["failures"].items()) or "none"
    rows = [
        f"== {report.flood} {json.dumps(report.params)} ==",
        ("flood statuses", ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"),
        (
            "slowest answer ms",
            ", ".join(f"{k} {v:.0f}" for k, v in report.statuses["slowest_ms"].items()) or "-",
        ),
        (
            "server RSS MiB",
            f"idle {report.rss_idle_mb:.0f}, peak {report.rss_peak_mb:.0f}, "
            f"after +settle {report.rss_after_mb:.0f} (flood ran {report.flood_seconds:.0f} s)",
        ),
        (
            'health ""',
            f"SERVING->NOT_SERVING flips {report.health_flips}, not serving "
            f"{report.health_not_serving_s:.1f} s, watch errors {len(report.health_stream_errors)}",
        ),
        ('"pool renewed"', "yes" if report.pool_renewed else "no"),
        ("server ERROR lines", str(len(report.server_errors))),
        (
            "well-behaved",
            f"{caller['calls']} calls, failures: {failures}, retries {caller['retries']}, "
            f"p50 {caller['p50_ms']:.0f} ms, p99 {caller['p99_ms']:.0f} ms, "
            f"worst {caller['worst_ms']:.0f} ms",
        ),
    ]
    rows += [(key, _short(value)) for key, value in report.extra.items() if "timeline" not in key]
    if report.extra.get("new_clients"):
        rows.append(("new clients", _short(report.extra["new_clients"]["timeline"])))
    return "\n".join(row if isinstance(row, str) else f"  {row[0]:<22}{row[1]}" for row in rows)


def _short(value: Any) -> str:
    text = (
        json.dumps({k: v for k, v in value.items() if k != "timeline"})
        if isinstance(value, dict)
        else json.dumps(value)
    )
    return text if len(text) <= 400 else text[:397] + "..."


def format_summary(reports: Sequence[Report]) -> str:
    lines = [
        f"{'flood':<12}{'RSS idle/peak/after MiB':>25}{'flips':>7}{'renewed':>9}"
        f"{'caller fails':>14}{'p99/worst ms':>16}  flood statuses"
    ]
    for r in reports:
        rss = f"{r.rss_idle_mb:.0f}/{r.rss_peak_mb:.0f}/{r.rss_after_mb:.0f}"
        fails = f"{sum(r.caller['failures'].values())}/{r.caller['calls']}"
        tail = f"{r.caller['p99_ms']:.0f}/{r.caller['worst_ms']:.0f}"
        statuses = ", ".join(f"{k} {v}" for k, v in r.statuses["counts"].items())
        renewed = "yes" if r.pool_renewed else "no"
        lines.append(
            f"{r.flood:<12}{rss:>25}{r.health_flips:>7}{renewed:>9}{fails:>14}{tail:>16}"
            f"  {statuses}"
        )
    return "\n".join(lines)


# --- the server and its database ------------------------------------------------------


def server_env(root: Path, **overrides: str) -> dict[str, str]:
    """The environment of a server (or migration) run from the checkout at `root`.

    PYTHONPATH puts that checkout's `service` and generated `pat` ahead of the
    ones this virtualenv has installed (editable, from this checkout).
    """
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GRPC_PORT")}
    env.update(
        PYTHONPATH=f"{root}{os.pathsep}{root / 'generated'}",
        GRPC_ENABLE_FORK_SUPPORT="false",
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        SHUTDOWN_DRAIN_SECONDS="0",
        SHUTDOWN_GRACE_SECONDS="2",
        PAGE_TOKEN_SECRET="floods",  # noqa: S106 - a throw-away server
    )
    env.update(overrides)
    return env


def migrate(root: Path, url: str) -> None:
    """service.migrations.upgrade_to_head, as the checkout at `root` has it."""
    script = (
        "import sys; from service.migrations import upgrade_to_head; upgrade_to_head(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", script, url], cwd=root, env=server_env(root), check=True)


async def seed_users(url: str, count: int) -> str:
    """At least `count` live users (inserted in one statement); returns one user's id."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        have = await connection.fetchval("SELECT count(*) FROM users WHERE delete_time IS NULL")
        await connection.execute(
            "INSERT INTO users (email, display_name) "
            "SELECT 'flood-' || gen_random_uuid() || '@example.com', 'Flood user ' || n "
            "FROM generate_series(1, $1) AS n",
            max(0, count - have),
        )
        return str(
            await connection.fetchval("SELECT id FROM users ORDER BY create_time, id LIMIT 1")
        )
    finally:
        await connection.close()


class ServerProcess:
    """`python -m service` from a checkout, its log kept in memory (and in `log_path`)."""

    def __init__(self, process: asyncio.subprocess.Process, log_file: TextIO | None) -> None:
        self.process = process
        self.log: list[str] = []
        self.port = 0
        self._log_file = log_file
        self._listening = asyncio.Event()
        self._reader = asyncio.create_task(self._read_log())

    @classmethod
    async def start(cls, root: Path, env: dict[str, str], log_path: Path | None) -> ServerProcess:
        log_file = log_path.open("w") if log_path else None
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            cwd=root,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        server = cls(process, log_file)
        try:
            await asyncio.wait_for(server._listening.wait(), 60)
        except BaseException:
            await server.stop()
            raise
        return server

    async def _read_log(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if self._log_file:
                print(line, file=self._log_file, flush=True)
            if "listening on port" in line:
                self.port = int(line.split("listening on port")[1].split()[0])
                self._listening.set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        await self._reader
        if self._log_file:
            self._log_file.close()


async def wait_serving(address: str, within: float = 60) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=within):
            if reply.status == SERVING:
                return


# --- the driver -----------------------------------------------------------------------


def flood_params(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of the flood named `name`, as the command line sized it."""
    if name == "bad-masks":
        return {"seconds": args.seconds, "callers": args.callers, "paths": args.paths}
    if name == "list-flood":
        return {
            "seconds": args.seconds,
            "connections": args.connections,
            "streams": args.streams,
            "deadline": args.deadline,
        }
    if name == "never-read":
        return {
            "seconds": args.seconds,
            "connections": args.connections,
            "streams": args.streams,
            **({"page_size": args.page_size} if args.page_size else {}),
        }
    return {"count": args.idle, "hold": args.idle_seconds}


def start_flood(
    name: str, address: str, user_id: str, pid: int, params: dict[str, Any]
) -> Awaitable[FloodResult]:
    if name == "bad-masks":
        return bad_masks(address, user_id, **params)
    if name == "list-flood":
        return list_flood(address, **params)
    if name == "never-read":
        return never_read(address, **params)
    return idle_conns(address, user_id, pid=pid, **params)


async def flood_in_subprocess(
    name: str, address: str, user_id: str, pid: int, params: dict[str, Any]
) -> FloodResult:
    """Run the flood in a process of its own.

    Thousands of calls in flight lag the event loop that drives them; sharing
    it would make the monitors (the well-behaved caller above all) report the
    flood client's lag as the server's.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.floods",
        "_flood",
        json.dumps([name, address, user_id, pid, params]),
        cwd=PROJECT_ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"the {name} flood failed (exit code {process.returncode})")
    data = json.loads(output.splitlines()[-1])
    return FloodResult(Statuses.from_dict(data["statuses"]), data["extra"])


async def _flood_process(name: str, address: str, user_id: str, pid: int, params: Any) -> None:
    """In the flood's own process: run it, print its result as one JSON line."""
    result = await start_flood(name, address, user_id, pid, params)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result.extra["client_peak_rss_mb"] = round(usage.ru_maxrss / 1024)
    result.extra["client_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    print(json.dumps({"statuses": result.statuses.as_dict(), "extra": result.extra}))


async def run_floods(args: argparse.Namespace, url: str) -> list[Report]:
    root = Path(args.server_root)
    extra_env = dict(item.split("=", 1) for item in args.env)
    user_id = await seed_users(url, args.users)
    reports = []
    for name in args.floods:
        log_path = Path(args.log_dir) / f"floods-{name}.log" if args.log_dir else None
        server = await ServerProcess.start(
            root, server_env(root, DATABASE_URL=url, **extra_env), log_path
        )
        try:
            await wait_serving(server.address)
            params = flood_params(name, args)
            report = await observe(
                name,
                functools.partial(
                    flood_in_subprocess, name, server.address, user_id, server.process.pid, params
                ),
                address=server.address,
                pid=server.process.pid,
                user_id=user_id,
                log=server.log,
                params=params,
                settle=args.settle,
                retry=not args.no_retry,
            )
        finally:
            await server.stop()
        print(format_report(report), flush=True)
        reports.append(report)
    return reports


def conditions(args: argparse.Namespace) -> dict[str, Any]:
    """What the figures depend on: the machine, its load, and which server ran."""
    root = Path(args.server_root).resolve()
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "server_root": str(root),
        "server_commit": commit,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "floods", nargs="*", help=f"which floods: {', '.join(FLOODS)} (default: all)"
    )
    parser.add_argument("--seconds", type=float, default=30, help="how long each flood runs")
    parser.add_argument(
        "--server-root", default=str(PROJECT_ROOT), help="checkout to run the server from"
    )
    parser.add_argument("--json", help="write every report as JSON to this path")
    parser.add_argument("--log-dir", help="keep each server's log here, as floods-NAME.log")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra server setting"
    )
    parser.add_argument("--users", type=int, default=2000, help="users in the database")
    parser.add_argument(
        "--settle", type=float, default=10, help="seconds after a flood to read RSS"
    )
    parser.add_argument(
        "--no-retry", action="store_true", help="the well-behaved caller never retries"
    )
    parser.add_argument("--callers", type=int, default=20, help="bad-masks: concurrent callers")
    parser.add_argument("--paths", type=int, default=100_000, help="bad-masks: paths per mask")
    parser.add_argument(
        "--connections", type=int, default=200, help="list-flood, never-read: connections"
    )
    parser.add_argument(
        "--streams", type=int, default=100, help="list-flood, never-read: streams each"
    )
    parser.add_argument(
        "--page-size", type=int, default=0, help="never-read: ListUsers page size (default 1000)"
    )
    parser.add_argument(
        "--deadline", type=float, default=10, help="list-flood: deadline of each call"
    )
    parser.add_argument("--idle", type=int, default=20_000, help="idle-conns: connections")
    parser.add_argument("--idle-seconds", type=float, default=75, help="idle-conns: longest hold")
    args = parser.parse_args(argv)
    args.floods = args.floods or list(FLOODS)
    args.server_root = str(Path(args.server_root).resolve())
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    if unknown := set(args.floods) - set(FLOODS):
        parser.error(f"no such flood: {', '.join(sorted(unknown))}")
    return args


def main() -> None:
    if sys.argv[1:2] == ["_idle-worker"]:
        address, count, hold = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
        asyncio.run(idle_worker(address, count, hold))
        return
    if sys.argv[1:2] == ["_flood"]:
        asyncio.run(_flood_process(*json.loads(sys.argv[2])))
        return
    args = parse_args()
    run_conditions = conditions(args)
    print(
        f"# floods: {json.dumps({k: v for k, v in run_conditions.items() if k != 'args'})}",
        flush=True,
    )
    with database(prefix="pat-users-floods-") as url:
        migrate(Path(args.server_root).resolve(), url)
        reports = asyncio.run(run_floods(args, url))
    print("\n" + format_summary(reports))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"conditions": run_conditions, "reports": [asdict(r) for r in reports]}, indent=1
            )
        )


if __name__ == "__main__":
    main()
