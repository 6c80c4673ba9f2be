"""Read replicas: GetUser with 0, 1 and 2 streaming standbys; what tokens cost.

On one 2-core machine, standbys cannot add throughput: they share the cores
with the primary, the service and the load generator. What they change is
where reads run, so the figure that shows scale-out is the primary's CPU
per GetUser, which falls toward zero as standbys take the reads. Measured
from outside: the CPU of the primary's postmaster and every backend under it.

Also, in the same run: GetUser with a consistency token against without
(1 standby; the token is a write's, long replayed), and CreateUser with
replicas configured (every write reads its position after COMMIT) against
without.
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from bench import servers
from bench.load import Run, fixed_body_run
from bench.sections import USER_SERVICE, Bench, Runner, rows, write_runner
from bench.servers import Server
from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from toolkit.databases import execute
from toolkit.processes import tree_cpu_seconds
from toolkit.standby import Standby

GET_USER = f"{USER_SERVICE}/GetUser"
TOKEN = "pat-consistency-token"  # noqa: S105 (a metadata key)
STANDBYS = 2


def replicas(bench: Bench, url: str) -> None:
    """The section; skipped (with a note) on BENCH_DATABASE_URL, where no standby can be made."""
    if "host=" not in url:
        bench.report.note("replicas skipped: standbys are made of the embedded PostgreSQL only")
        return
    primary_pid = _postmaster_pid(url)
    with _standbys(url) as standbys, ExitStack() as stack:
        services = [
            stack.enter_context(_service(bench, url, standbys[:count]))
            for count in range(STANDBYS + 1)
        ]
        body = pb.GetUserRequest(id=bench.read_id).SerializeToString()
        rows(bench, [("GetUser", s, _primary_cpu(bench, s, body, primary_pid)) for s in services])
        one = services[1]
        token = _token_of_a_write(one)
        with_token = _primary_cpu(bench, one, body, primary_pid, headers=((TOKEN, token),))
        rows(bench, [("GetUser+token", one, with_token)])
        creates = [("CreateUser", s, write_runner(bench, s, "CreateUser")) for s in services[:2]]
        rows(bench, creates)
    _note(bench)


@contextmanager
def _standbys(url: str) -> Iterator[list[Standby]]:
    made: list[Standby] = []
    try:
        for number in range(1, STANDBYS + 1):
            made.append(Standby(url, f"bench-standby-{number}"))
        yield made
    finally:
        for standby in made:
            standby.remove()


@contextmanager
def _service(bench: Bench, url: str, standbys: list[Standby]) -> Iterator[Server]:
    urls = ",".join(standby.url_for(url) for standby in standbys)
    extra = {"DATABASE_REPLICA_URLS": urls} if urls else {}
    with servers.service(url, bench.pool_size, workers=1, **extra) as server:
        server.name = f"service+{len(standbys)}r"
        yield server


def _primary_cpu(
    bench: Bench,
    server: Server,
    body: bytes,
    primary_pid: int,
    headers: tuple[tuple[str, str], ...] = (),
) -> Runner:
    """A GetUser run noting the primary's CPU per call (its postmaster and backends)."""

    def run() -> Run:
        before = tree_cpu_seconds(primary_pid)
        done = fixed_body_run(server.address, GET_USER, body, bench.shape, server.pid, headers)
        if done.calls:
            per_call = (tree_cpu_seconds(primary_pid) - before) * 1e6 / done.calls
            done.note = "; ".join(
                n for n in (done.note, f"primary CPU {per_call:.0f} µs/call") if n
            )
            done.primary_cpu_us = per_call
        return done

    return run


def _token_of_a_write(server: Server) -> str:
    """A consistency token from a CreateUser on `server` (replayed long before it is used)."""
    user = user_pb2.User(email=f"bench-token-{server.pid}@example.com", display_name="Token")
    with grpc.insecure_channel(server.address) as channel:
        create = channel.unary_unary(
            f"{USER_SERVICE}/CreateUser",
            request_serializer=pb.CreateUserRequest.SerializeToString,
            response_deserializer=pb.CreateUserResponse.FromString,
        )
        _, call = create.with_call(pb.CreateUserRequest(user=user), timeout=10)
        return str(dict(call.trailing_metadata() or ())[TOKEN])


def _postmaster_pid(url: str) -> int:
    folder = Path(str(execute(url, "SHOW data_directory")))
    return int((folder / "postmaster.pid").read_text().split()[0])


def _note(bench: Bench) -> None:
    report = bench.report
    gets = [report.find("GetUser", f"service+{n}r") for n in range(STANDBYS + 1)]
    if any(run is None for run in gets):
        return
    base = gets[0]
    assert base is not None
    cpu = [run.primary_cpu_us if run else None for run in gets]
    figures = {
        "getuser_rps": [run.rps for run in gets if run],
        "getuser_rps_ratio": [round(run.rps / base.rps, 3) for run in gets if run],
        "primary_cpu_us_per_getuser": [round(c or 0, 1) for c in cpu],
    }
    token = report.find("GetUser+token", "service+1r")
    if token and gets[1]:
        figures["token_read_ratio"] = round(token.rps / gets[1].rps, 3)
    creates = [report.find("CreateUser", f"service+{n}r") for n in range(2)]
    if creates[0] and creates[1]:
        figures["create_with_token_ratio"] = round(creates[1].rps / creates[0].rps, 3)
    report.figures["replicas"] = figures
    report.note(
        "replicas: GetUser rps with 0/1/2 standbys "
        + "/".join(f"{r:.0f}" for r in figures["getuser_rps"])
        + " (ratios "
        + "/".join(f"{r:.2f}" for r in figures["getuser_rps_ratio"])
        + "); the primary's CPU per GetUser "
        + "/".join(f"{c:.0f}" for c in figures["primary_cpu_us_per_getuser"])
        + " µs"
        + (
            f"; a read carrying a token: {figures['token_read_ratio']:.2f} x the rps without"
            if "token_read_ratio" in figures
            else ""
        )
        + (
            f"; CreateUser returning a token: {figures['create_with_token_ratio']:.2f} x without"
            if "create_with_token_ratio" in figures
            else ""
        )
    )
