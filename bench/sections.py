"""The benchmark's sections, each a function of the servers it measures and the report.

Service and baseline runs of one RPC are made back to back, so that a noisy
neighbour on a shared machine hits both sides of a ratio alike.
"""

import asyncio
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import asyncpg
from grpc_health.v1 import health_pb2

from bench import servers
from bench.load import Run, Shape, call_raw, counted_run, fixed_body_run, varying_body_run
from bench.report import Report
from bench.seed import seed
from bench.servers import Server
from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from service.config import Settings
from toolkit.databases import asyncpg_dsn, execute, migrate_to_head
from toolkit.pgbouncer import pgbouncer_binary
from toolkit.processes import cpu_seconds, rss_mb, worker_pids

USER_SERVICE = "/pat.users.v1.UserService"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
LIST_PAGE_SIZE = 50
LIST_FAR_PAGE = 2000


@dataclass
class Bench:
    """What every section needs: the load shape, the pool size, the users, the report."""

    shape: Shape
    pool_size: int
    user_ids: list[str]
    report: Report
    rounds: int = 1  # runs of each row, interleaved; the median one is reported

    @property
    def read_id(self) -> str:
        return self.user_ids[len(self.user_ids) // 2]


def has_setting(name: str) -> bool:
    return name in Settings.model_fields


def user_ids(url: str) -> list[str]:
    """Every user's id, in ListUsers order."""

    async def fetch() -> list[str]:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            rows = await connection.fetch("SELECT id::text FROM users ORDER BY create_time, id")
            return [row[0] for row in rows]
        finally:
            await connection.close()

    return asyncio.run(fetch())


def reads(bench: Bench, service: Server, baseline: Server, names: set[str]) -> None:
    """GetUser and LookupUser on both servers; Health/Check on the service."""
    user = pb.GetUserResponse.FromString(
        _raw(service, "GetUser", pb.GetUserRequest(id=bench.read_id).SerializeToString())
    ).user
    requests = {
        "GetUser": pb.GetUserRequest(id=user.id),
        "LookupUser": pb.LookupUserRequest(email=user.email),
    }
    for rpc, request in requests.items():
        if rpc.lower().removesuffix("user") in names:
            path, body = f"{USER_SERVICE}/{rpc}", request.SerializeToString()
            rows(
                bench,
                [
                    (rpc, s, _fixed_runner(bench, s, path, body, cpu=True))
                    for s in (service, baseline)
                ],
            )
    if "health" in names:
        body = health_pb2.HealthCheckRequest().SerializeToString()
        health = _fixed_runner(bench, service, HEALTH_CHECK, body, cpu=True)
        rows(bench, [("Health/Check", service, health)])


Runner = Callable[[], Run]


def _fixed_runner(
    bench: Bench,
    server: Server,
    path: str,
    body: bytes,
    shape: Shape | None = None,
    *,
    cpu: bool = False,
) -> Runner:
    """A fixed-body run; `cpu`: also the CPU per call of `server` (one process, no workers)."""
    pid = server.pid if cpu else None
    return lambda: fixed_body_run(server.address, path, body, shape or bench.shape, pid)


def rows(bench: Bench, planned: list[tuple[str, Server, Runner]]) -> None:
    """One row per (rpc, server): `bench.rounds` runs each, interleaved, the median by rps kept.

    Interleaving puts a noisy neighbour's burst on both sides of a ratio, and
    the median drops a run it hit alone. Every run's errors count, kept or not.
    """
    runs: list[list[Run]] = [[] for _ in planned]
    for _ in range(bench.rounds):
        for done, (_, _, runner) in zip(runs, planned, strict=True):
            done.append(runner())
    for done, (rpc, server, _) in zip(runs, planned, strict=True):
        row = replace(sorted(done, key=lambda run: run.rps)[len(done) // 2], rpc=rpc)
        row.server, row.errors = server.name, sum(run.errors for run in done)
        if len(done) > 1:
            rps = "/".join(f"{run.rps:.0f}" for run in done)
            row.note = "; ".join(n for n in (row.note, f"median of {rps} rps") if n)
        bench.report.add(row)


def _raw(server: Server, rpc: str, body: bytes) -> bytes:
    return call_raw(server.address, f"{USER_SERVICE}/{rpc}", body)


def listing(bench: Bench, service: Server) -> None:
    """ListUsers page 1 and page 2,000 (page_size 50) of the seeded table, interleaved."""
    first = pb.ListUsersRequest(page_size=LIST_PAGE_SIZE)
    far = pb.ListUsersRequest(page_size=LIST_PAGE_SIZE, page_token=_far_token(service))
    path = f"{USER_SERVICE}/ListUsers"
    pages = (("ListUsers page 1", first), (f"ListUsers page {LIST_FAR_PAGE:,}", far))
    rows(
        bench,
        [
            (label, service, _fixed_runner(bench, service, path, request.SerializeToString()))
            for label, request in pages
        ],
    )


def _far_token(service: Server) -> str:
    """The token of page LIST_FAR_PAGE, walked to with large pages (page_size may change)."""
    remaining, token = (LIST_FAR_PAGE - 1) * LIST_PAGE_SIZE, ""
    while remaining:
        size = min(1000, remaining)
        request = pb.ListUsersRequest(page_size=size, page_token=token)
        token = pb.ListUsersResponse.FromString(
            _raw(service, "ListUsers", request.SerializeToString())
        ).next_page_token
        remaining -= size
    return token


def writes(bench: Bench, service: Server, baseline: Server, names: set[str]) -> None:
    """CreateUser and UpdateUser on both servers, every call with a body of its own."""
    for rpc in ("CreateUser", "UpdateUser"):
        if rpc.lower().removesuffix("user") in names:
            rows(bench, [(rpc, s, write_runner(bench, s, rpc)) for s in (service, baseline)])


def write_runner(bench: Bench, server: Server, rpc: str) -> Runner:
    def run() -> Run:
        new = _create_body(server.name) if rpc == "CreateUser" else _update_body(bench, server.name)
        return varying_body_run(server.address, f"{USER_SERVICE}/{rpc}", new, bench.shape)

    return run


_runs = itertools.count()


def _create_body(tag: str) -> Callable[[int], bytes]:
    """Call n creates bench-<tag>-<run>-<n>@example.com: a new email every call."""
    prefix = f"bench-{tag}-{next(_runs)}-"

    def body(n: int) -> bytes:
        user = user_pb2.User(email=f"{prefix}{n}@example.com", display_name="Bench user")
        return pb.CreateUserRequest(user=user).SerializeToString()

    return body


def _update_body(bench: Bench, tag: str) -> Callable[[int], bytes]:
    """Call n renames user n (mod the table): calls in flight never share a row lock."""
    ids, start = bench.user_ids, next(_runs) * 7919

    def body(n: int) -> bytes:
        user = user_pb2.User(id=ids[(start + n) % len(ids)], display_name=f"{tag} {n}")
        return pb.UpdateUserRequest(user=user).SerializeToString()

    return body


def rss(bench: Bench, url: str, requests: int) -> None:
    """A fresh one-worker service answers `requests` GetUser calls; its RSS every quarter."""
    chunk = max(1, requests // 4)
    body = pb.GetUserRequest(id=bench.read_id).SerializeToString()
    samples: list[tuple[int, float]] = []
    with servers.service(url, bench.pool_size, workers=1) as server:
        for quarter in range(1, 5):
            run = counted_run(server.address, f"{USER_SERVICE}/GetUser", body, bench.shape, chunk)
            run.rpc, run.server = f"GetUser (RSS run {quarter}/4)", server.name
            bench.report.add(run)
            pids = worker_pids(server.pid)
            samples.append((quarter * chunk, max(rss_mb(pid) for pid in pids)))
    mid, end = samples[1][1], samples[3][1]
    bench.report.figures["rss"] = {
        "requests": 4 * chunk,
        "samples_mb": samples,
        "mid_mb": mid,
        "end_mb": end,
        "growth_mb": end - mid,
    }
    bench.report.note(
        "worker RSS after "
        + ", ".join(f"{n:,}: {mb:.1f} MB" for n, mb in samples)
        + f" (second-half growth {end - mid:+.1f} MB)"
    )


def workers(bench: Bench, url: str) -> None:
    """GetUser on one worker and on two (both services up, runs interleaved).

    SO_REUSEPORT hands each connection to one worker, so 4 connections could
    easily land 3 to 1: these runs spread the same 32 calls in flight over 16
    connections of 2 streams, and note how the workers shared the CPU.
    """
    if not has_setting("workers"):
        bench.report.note("1 vs 2 workers skipped: service/config.py has no WORKERS setting yet")
        return
    shape = replace(bench.shape, connections=max(1, bench.shape.in_flight // 2), streams=2)
    body = pb.GetUserRequest(id=bench.read_id).SerializeToString()
    with (
        servers.service(url, bench.pool_size, workers=1) as one,
        servers.service(url, bench.pool_size, workers=2) as two,
    ):
        one.name, two.name = "service 1w", "service 2w"
        rows(bench, [("GetUser", s, _cpu_split(bench, s, body, shape)) for s in (one, two)])


def _cpu_split(bench: Bench, server: Server, body: bytes, shape: Shape) -> Runner:
    """A GetUser run noting each worker's share of the CPU the service used."""
    fixed = _fixed_runner(bench, server, f"{USER_SERVICE}/GetUser", body, shape)

    def run() -> Run:
        pids = worker_pids(server.pid)
        before = [cpu_seconds(pid) for pid in pids]
        done = fixed()
        used = [cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
        split = "/".join(f"{100 * u / (sum(used) or 1):.0f}" for u in used)
        notes = (done.note, f"{len(pids)} process(es), CPU split {split} %", *server.notes)
        done.note = "; ".join(note for note in notes if note)
        return done

    return run


PGBOUNCER_MAX_CONNECTIONS = 20
PGBOUNCER_POOL_SIZE = 10
PGBOUNCER_WORKERS = 4


def pgbouncer(bench: Bench) -> None:
    """4 workers through PgBouncer, on a PostgreSQL allowing far fewer connections than 4 pools."""
    why = [
        reason
        for reason, missing in (
            ("pgbouncer is not installed (apt-get install pgbouncer)", not pgbouncer_binary()),
            ("service/config.py has no DB_POOLER setting yet", not has_setting("db_pooler")),
            ("service/config.py has no WORKERS setting yet", not has_setting("workers")),
        )
        if missing
    ]
    if why:
        bench.report.note(f"PgBouncer section skipped: {'; '.join(why)}")
        return
    with servers.small_database(PGBOUNCER_MAX_CONNECTIONS) as direct:
        migrate_to_head(direct)
        # PgBouncer cannot pass statement_timeout at connect: the role sets it (docs/pgbouncer.md).
        timeout = f"{int(Settings().db_statement_timeout_seconds * 1000)}ms"
        execute(direct, f"ALTER ROLE postgres SET statement_timeout = '{timeout}'")
        seed(direct, 1000)
        _through_pgbouncer(replace(bench, user_ids=user_ids(direct)), direct)


def _through_pgbouncer(bench: Bench, direct: str) -> None:
    direct_need = PGBOUNCER_WORKERS * (bench.pool_size + 1)  # + each worker's health connection
    label = f"{PGBOUNCER_WORKERS}w+pgbouncer"
    with (
        servers.pgbouncer(direct, PGBOUNCER_POOL_SIZE) as bouncer,
        servers.service(
            bouncer,
            bench.pool_size,
            workers=PGBOUNCER_WORKERS,
            DB_POOLER="pgbouncer",
            MIGRATION_DATABASE_URL=direct,
        ) as server,
        peak_connections(direct) as peak,
    ):
        server.name = label
        body = pb.GetUserRequest(id=bench.read_id).SerializeToString()
        get = _fixed_runner(bench, server, f"{USER_SERVICE}/GetUser", body)
        rows(bench, [("GetUser", server, get)])
        rows(bench, [("CreateUser", server, write_runner(bench, server, "CreateUser"))])
    bench.report.figures["pgbouncer"] = {
        "workers": PGBOUNCER_WORKERS,
        "pool_size_per_worker": bench.pool_size,
        "direct_connections_needed": direct_need,
        "max_connections": PGBOUNCER_MAX_CONNECTIONS,
        "pgbouncer_pool_size": PGBOUNCER_POOL_SIZE,
        "peak_server_connections": peak[0],
    }
    bench.report.note(
        f"PgBouncer: {PGBOUNCER_WORKERS} workers x (pool {bench.pool_size} + 1 health) would open"
        f" {direct_need} connections directly; PostgreSQL allows {PGBOUNCER_MAX_CONNECTIONS},"
        f" PgBouncer at most {PGBOUNCER_POOL_SIZE}; most PostgreSQL connections seen: {peak[0]}"
    )


@contextmanager
def peak_connections(url: str, interval: float = 0.2) -> Iterator[list[int]]:
    """The most client connections pg_stat_activity showed (ours excluded) while the block ran."""
    peak = [0]
    stop = threading.Event()

    async def watch() -> None:
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            while not stop.is_set():
                count = await connection.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                peak[0] = max(peak[0], int(count))
                await asyncio.sleep(interval)
        finally:
            await connection.close()

    thread = threading.Thread(target=asyncio.run, args=(watch(),), daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(timeout=5)
