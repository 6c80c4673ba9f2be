"""What telemetry costs: GetUser with each kind on, against all of it off, in one run.

Four servers, each with one kind of telemetry on, or none:

- "no telemetry": ACCESS_LOG=false (LOG_LEVEL=INFO, like the others);
- "access log": ACCESS_LOG=true, LOG_LEVEL=INFO, the default; its lines go
  to the server's log file, as every server's output does here;
- "metrics": METRICS_PORT (any free one), nobody scraping;
- "tracing 1%": OTEL_TRACES_SAMPLER=parentbased_traceidratio with
  OTEL_TRACES_SAMPLER_ARG=0.01, exporting over OTLP/gRPC to a collector in
  this process that counts the spans and keeps nothing (the exporter's own
  code path, the network included). h2load sends no `traceparent`, so the
  sampler alone decides, as for most callers.

The differences are a few per cent, the size of this machine's noise, so
the section takes care to be fair (`--rounds`, at least TELEMETRY_ROUNDS):

- Each run has a server of its own, started for it and stopped after it
  (which exports its last spans), alone: two servers alike differed by 1
  to 4 % for their whole life on this shared 2-core machine (the later
  started tended to be faster), so a server kept for every round would
  carry its luck into every ratio. A round runs the four kinds in an order
  rotated from round to round.
- A target is the median over rounds of one round's rps ratio: on / off,
  measured minutes apart at most, so that load from elsewhere hits both.

The rows are each server's median run; bench/__main__.py prints the targets
this module makes (`targets`).
"""

import statistics
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, replace

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench import servers
from bench.load import Run, fixed_body_run
from bench.report import Report, Target
from bench.sections import USER_SERVICE, Bench
from pat.users.v1 import user_service_pb2 as pb

TELEMETRY_ROUNDS = 9  # the targets are 3 and 5 % below 1; one ratio varies by ±5 % here
SAMPLED = 0.01
OFF, ACCESS_LOG, METRICS, TRACING = "no telemetry", "access log", "metrics", "tracing 1%"
# Each kind's target: at least this fraction of GetUser's rps without telemetry.
BOUNDS = {ACCESS_LOG: 0.97, METRICS: 0.97, TRACING: 0.95}
QUIET = {"LOG_LEVEL": "INFO", "ACCESS_LOG": "false"}
GET_USER = f"{USER_SERVICE}/GetUser"


def telemetry(bench: Bench, url: str) -> None:
    """The section: GetUser on the four servers, round after round, each round afresh."""
    body = pb.GetUserRequest(id=bench.read_id).SerializeToString()
    rounds = max(bench.rounds, TELEMETRY_ROUNDS)
    runs: dict[str, list[Run]] = {}
    with collector() as spans:
        kinds = _settings(spans.endpoint)
        names = list(kinds)
        for number in range(rounds):
            order = names[number % len(names) :] + names[: number % len(names)]
            for name in order:
                with servers.service(url, bench.pool_size, **kinds[name]) as server:
                    run = fixed_body_run(server.address, GET_USER, body, bench.shape, server.pid)
                runs.setdefault(name, []).append(replace(run, rpc="GetUser", server=name))
    for name in names:
        _add_median(bench.report, runs[name])
    ratios = {
        name: [on.rps / off.rps for on, off in zip(runs[name], runs[OFF], strict=True)]
        for name in BOUNDS
    }
    _note(bench, runs, ratios, spans.received, rounds)


def _settings(endpoint: str) -> dict[str, dict[str, str]]:
    return {
        OFF: QUIET,
        ACCESS_LOG: {"LOG_LEVEL": "INFO", "ACCESS_LOG": "true"},
        METRICS: {**QUIET, "METRICS_PORT": "0"},
        TRACING: {
            **QUIET,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(SAMPLED),
        },
    }


def _add_median(report: Report, runs: list[Run]) -> None:
    """The row of a kind: its median run by rps, with every round's rps and errors."""
    row = replace(sorted(runs, key=lambda run: run.rps)[len(runs) // 2])
    row.errors = sum(run.errors for run in runs)
    rps = "/".join(f"{run.rps:.0f}" for run in runs)
    row.note = "; ".join(n for n in (row.note, f"median of {rps} rps") if n)
    report.add(row)


def targets(report: Report) -> list[Target]:
    """The issue's telemetry targets, from this run's figures (none if not measured)."""
    figures = report.figures.get("telemetry")
    if not figures:
        return []
    found = []
    for name, bound in BOUNDS.items():
        kind = figures[name]
        detail = (
            f"median of {len(kind['ratios'])} rounds' ratios; server CPU"
            f" {kind['cpu_us']:.0f} / {figures['cpu_us_off']:.0f} µs/call"
        )
        found.append(
            Target(f"GetUser: {_described(name)} / off", kind["ratio"], ">=", bound, "", detail)
        )
    return found


def _described(name: str) -> str:
    return {ACCESS_LOG: "access log on", METRICS: "metrics on", TRACING: "tracing at 1 %"}[name]


def _note(
    bench: Bench,
    runs: dict[str, list[Run]],
    ratios: dict[str, list[float]],
    spans: int,
    rounds: int,
) -> None:
    def cpu(name: str) -> float:
        return statistics.median(run.server_cpu_us or 0.0 for run in runs[name])

    figures: dict[str, object] = {"rounds": rounds, "spans_received": spans, "cpu_us_off": cpu(OFF)}
    parts = []
    for name, each in ratios.items():
        figures[name] = {
            "ratio": round(statistics.median(each), 3),
            "ratios": [round(r, 3) for r in each],
            "cpu_us": round(cpu(name), 1),
        }
        parts.append(f"{name} {cpu(name):.0f} µs ({cpu(name) - cpu(OFF):+.0f})")
    bench.report.figures["telemetry"] = figures
    calls = sum(run.calls for run in runs[TRACING])
    bench.report.note(
        f"telemetry: GetUser server CPU per call (medians of {rounds} rounds), off"
        f" {cpu(OFF):.0f} µs; "
        + ", ".join(parts)
        + f"; the collector received {spans:,} spans, 2 a sampled call, for about"
        f" {calls:,} measured calls at {SAMPLED:.0%} (and the warm-ups')"
    )


@dataclass
class Spans:
    endpoint: str
    received: int = 0


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace endpoint that counts spans and keeps nothing."""

    def __init__(self, spans: Spans) -> None:
        self._spans = spans

    def Export(  # noqa: N802 (the proto's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: object
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._spans.received += sum(
            len(scope.spans) for spans in request.resource_spans for scope in spans.scope_spans
        )  # one export at a time: the pool has one thread
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def collector() -> Iterator[Spans]:
    """A collector on a free local port, in this process (a thread: it idles at 1 %)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    spans = Spans(f"http://127.0.0.1:{port}")
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Collector(spans), server)
    server.start()
    try:
        yield spans
    finally:
        server.stop(None)
