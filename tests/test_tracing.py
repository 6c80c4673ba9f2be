"""Traces: a span per RPC in the caller's trace, its SQL as child spans.

Each test starts its own server with an in-memory exporter (the seam
`start(..., span_exporter=...)`), so no collector is needed and no
OpenTelemetry global is set; stopping the server un-instruments asyncpg.
"""

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, sampling
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from pat.users.v1 import user_pb2
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service import tracing
from service.server import RunningServer, start
from tests.support import (
    ServiceProcess,
    create_user,
    eventually,
    fails,
    health_status,
    hold_row_lock,
    more_health_checks,
    server_settings,
    service_queries_waiting_for_locks,
    subprocess_env,
    unique_email,
    user_service,
    wait_until_serving,
)

GET_USER = "/pat.users.v1.UserService/GetUser"
LOW_BITS = sampling.TraceIdRatioBased.TRACE_ID_LIMIT
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def traced(database_url: str, exporter: InMemorySpanExporter) -> AsyncIterator[RunningServer]:
    running = await start(server_settings(database_url), database_url, span_exporter=exporter)
    try:
        yield running
    finally:
        await running.stop(drain_seconds=0, grace_seconds=1)
    assert not hasattr(asyncpg.Connection.fetch, "__wrapped__")  # un-instrumented


def server_spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [
        s for s in exporter.get_finished_spans() if s.name == name and s.kind is SpanKind.SERVER
    ]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [
        s
        for s in exporter.get_finished_spans()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]


async def test_rpc_span_continues_the_callers_trace_and_parents_its_sql(
    traced: RunningServer, exporter: InMemorySpanExporter
) -> None:
    trace_id, caller_span_id = secrets.token_hex(16), secrets.token_hex(8)
    email = unique_email("traced")
    async with user_service(traced) as stub:
        user = await create_user(stub, email)
        exporter.clear()
        traceparent = f"00-{trace_id}-{caller_span_id}-01"
        await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=(("traceparent", traceparent),))

    (rpc,) = server_spans(exporter, GET_USER)
    assert rpc.context is not None
    assert rpc.parent is not None
    assert rpc.context.trace_id == int(trace_id, 16)  # the caller's trace
    assert rpc.parent.span_id == int(caller_span_id, 16)  # under the caller's span
    assert rpc.parent.is_remote
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    # The SELECT ran in SQLAlchemy's greenlet (db.read), yet is the RPC's child.
    (sql,) = children(exporter, rpc)
    assert sql.kind is SpanKind.CLIENT
    assert sql.context is not None
    assert sql.context.trace_id == int(trace_id, 16)
    assert sql.attributes is not None
    assert str(sql.attributes["db.statement"]).startswith("SELECT")
    assert "FROM users" in str(sql.attributes["db.statement"])
    # Statements are recorded without their parameters: no personal data.
    for span in exporter.get_finished_spans():
        assert email not in repr(dict(span.attributes or {}))


async def test_an_rpc_without_trace_context_starts_a_trace(
    traced: RunningServer, exporter: InMemorySpanExporter
) -> None:
    async with user_service(traced) as stub:
        user = await create_user(stub)
        exporter.clear()
        await stub.GetUser(pb.GetUserRequest(id=user.id))
    (rpc,) = server_spans(exporter, GET_USER)
    assert rpc.parent is None
    assert len(children(exporter, rpc)) == 1


async def test_failed_calls_record_their_status_and_keep_their_details(
    traced: RunningServer, exporter: InMemorySpanExporter
) -> None:
    async with user_service(traced) as stub:
        missing = await fails(stub.GetUser(pb.GetUserRequest(id=_unused_id())))
        invalid = await fails(stub.GetUser(pb.GetUserRequest(id="not-a-uuid")))

    # The caller sees what it sees without tracing: codes, messages, details.
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert missing.details  # google.rpc details (ResourceInfo) survive the interceptor
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.bad_fields == ["id"]
    spans = server_spans(exporter, GET_USER)
    codes = sorted(s.attributes["rpc.grpc.status_code"] for s in spans if s.attributes)
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0]]
    # A caller's mistake is no server error (OpenTelemetry's semantic conventions).
    assert {s.status.status_code for s in spans} == {StatusCode.UNSET}


async def test_server_errors_mark_the_span_as_an_error(
    database_url: str, exporter: InMemorySpanExporter
) -> None:
    # One call in progress at most: while an update waits on a row lock the
    # test holds, a GetUser is refused UNAVAILABLE (OVERLOADED).
    settings = server_settings(database_url, max_concurrent_rpcs=1)
    running = await start(settings, database_url, span_exporter=exporter)
    try:
        async with user_service(running) as stub:
            user = await create_user(stub)
            lock = await hold_row_lock(database_url, user.id)
            try:
                request = pb.UpdateUserRequest(user=user_pb2.User(id=user.id, display_name="x"))
                held = asyncio.ensure_future(stub.UpdateUser(request, timeout=30))
                await eventually(
                    lambda: service_queries_waiting_for_locks(database_url, "UPDATE users"), 1
                )
                refused = await fails(stub.GetUser(pb.GetUserRequest(id=user.id)))
            finally:
                await lock.close()
            await held
    finally:
        await running.stop(drain_seconds=0, grace_seconds=1)
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    (rpc,) = server_spans(exporter, GET_USER)
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert rpc.status.status_code is StatusCode.ERROR
    assert children(exporter, rpc) == []  # refused before any SQL


async def test_sql_outside_rpcs_and_health_checks_are_not_traced(
    traced: RunningServer, exporter: InMemorySpanExporter, database_url: str
) -> None:
    address = f"127.0.0.1:{traced.port}"
    await eventually(lambda: health_status(address), SERVING)
    # The health watcher queries the database every 0.2 s here (its own SQL,
    # with no RPC around it): seen to run, its checks had their chance to be
    # traced. Probes call Health/Check.
    await more_health_checks(traced, 3)
    assert await health_status(address) == SERVING
    assert exporter.get_finished_spans() == ()


def _unused_id() -> str:
    return "00000000-0000-4000-8000-000000000000"


async def test_watch_users_is_traced_and_still_streams(
    traced: RunningServer, exporter: InMemorySpanExporter
) -> None:
    async with user_service(traced) as stub:
        call = stub.WatchUsers(pb.WatchUsersRequest(), timeout=10)
        first = await call.read()
        assert first.HasField("heartbeat")
        user = await create_user(stub)
        while not (response := await call.read()).HasField("changes"):
            pass
        assert [c.user.id for c in response.changes.changes] == [user.id]
        call.cancel()

        async def watch_spans() -> int:
            return len(server_spans(exporter, "/pat.users.v1.UserService/WatchUsers"))

        await eventually(watch_spans, 1, within=10)  # the server ends the cancelled call's span


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OpenTelemetry collector's OTLP/gRPC trace endpoint, keeping what it receives."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_the_otlp_endpoint(database_url: str) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT alone turns tracing on in `python -m service`."""
    collector = Collector()
    receiver = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)
    collector_port = receiver.add_insecure_port("127.0.0.1:0")
    await receiver.start()
    env = subprocess_env(
        DATABASE_URL=database_url,
        GRPC_HOST="127.0.0.1",
        GRPC_PORT="0",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector_port}",
        SHUTDOWN_DRAIN_SECONDS="0",
    )
    child = await ServiceProcess.start(env)
    try:
        async with grpc.aio.insecure_channel(child.address) as channel:
            await wait_until_serving(channel)
            stub = UserServiceStub(channel)
            user = await create_user(stub)
            await stub.GetUser(pb.GetUserRequest(id=user.id))
    finally:
        child.process.terminate()  # a stop exports what is left
        assert await child.wait() == 0, child.text
        await receiver.stop(None)
    resources = [r for request in collector.requests for r in request.resource_spans]
    names = {
        a.value.string_value
        for r in resources
        for a in r.resource.attributes
        if a.key == "service.name"
    }
    assert names == {"pat-users"}
    spans = [s for r in resources for scope in r.scope_spans for s in scope.spans]
    (rpc,) = [s for s in spans if s.name == GET_USER]
    assert [s.name for s in spans if s.parent_span_id == rpc.span_id] == ["SELECT"]


# Sampling: decided once per call, before any instrumentation runs.


@pytest.mark.parametrize(
    ("name", "arg", "bound"),
    [
        ("parentbased_always_on", None, LOW_BITS + 1),  # the default
        ("always_on", None, LOW_BITS + 1),
        ("always_off", None, 0),
        ("parentbased_always_off", None, 0),
        ("traceidratio", "0.25", round(0.25 * (LOW_BITS + 1))),
        ("parentbased_traceidratio", "0.01", round(0.01 * (LOW_BITS + 1))),
    ],
)
def test_the_samplers_decision_without_a_parent_is_known_ahead(
    monkeypatch: pytest.MonkeyPatch, name: str, arg: str | None, bound: int
) -> None:
    """What tracing._bound_without_parent reads of the SDK's samplers (one private attribute)."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    if arg is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    sampler = tracing._env_sampler()
    assert tracing._bound_without_parent(sampler) == bound
    # And it is what the sampler decides, at the edge of the bound too.
    for trace_id in {1 << 64, max(bound - 1, 0) | 1 << 64, bound | 1 << 64, LOW_BITS}:
        result = sampler.should_sample(Context(), trace_id, GET_USER, SpanKind.SERVER)
        assert result.decision.is_sampled() == ((trace_id & LOW_BITS) < bound), trace_id


def test_a_sampler_not_known_here_is_asked_for_every_call() -> None:
    class Plugin(sampling.Sampler):
        def should_sample(self, *args: object, **kwargs: object) -> sampling.SamplingResult:
            return sampling.SamplingResult(sampling.Decision.DROP)

        def get_description(self) -> str:
            return "Plugin"

    assert tracing._bound_without_parent(Plugin()) is None
    assert tracing._bound_without_parent(sampling.ParentBased(Plugin())) is None


async def test_unsampled_calls_run_no_instrumentation(
    database_url: str, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a ratio of one half, the calls not sampled start no span, not even their SQL's.

    The sampled ones have the spans they always had, under trace ids the
    ratio sampler itself would keep.
    """
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.5")
    running = await start(server_settings(database_url), database_url, span_exporter=exporter)
    try:
        assert running.tracing is not None
        sql = CountingTracer(running.tracing._asyncpg._tracer)
        running.tracing._asyncpg._tracer = sql
        async with user_service(running) as stub:
            user = await create_user(stub)
            exporter.clear()
            sql.statements.clear()
            calls = 200
            for _ in range(calls):
                await stub.GetUser(pb.GetUserRequest(id=user.id))
            traced = server_spans(exporter, GET_USER)
            assert calls * 0.3 < len(traced) < calls * 0.7  # binomial(200, 0.5): 100 ± 7
            users_sql = [s for s in sql.statements if "FROM users" in s]
            assert len(users_sql) == len(traced)  # none for the calls not sampled
            for rpc in traced:
                assert rpc.context is not None
                assert rpc.context.trace_id & LOW_BITS < round(0.5 * (LOW_BITS + 1))
                assert [s.name for s in children(exporter, rpc)] == ["SELECT"]

            # A caller's decision is followed, either way.
            exporter.clear()
            for flags in ("01", "00"):
                for _ in range(10):
                    parent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-{flags}"
                    metadata = (("traceparent", parent),)
                    await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=metadata)
            followed = server_spans(exporter, GET_USER)
            assert len(followed) == 10
            assert all(s.parent is not None and s.parent.is_remote for s in followed)
    finally:
        await running.stop(drain_seconds=0, grace_seconds=1)


class CountingTracer:
    """The asyncpg instrumentation's tracer, noting the statement of every span it is asked for."""

    def __init__(self, tracer: Any) -> None:
        self._tracer = tracer
        self.statements: list[str] = []

    def start_as_current_span(self, name: str, **kwargs: Any) -> Any:
        self.statements.append(str((kwargs.get("attributes") or {}).get("db.statement", "")))
        return self._tracer.start_as_current_span(name, **kwargs)
