"""OTEL_EXPORTER_OTLP_ENDPOINT: a span per RPC, its SQL as child spans, exported over OTLP/gRPC.

server.py imports this module only when tracing is on: otherwise none of it
is loaded, and no interceptor is in the call path.

- The RPC spans come from opentelemetry-instrumentation-grpc's aio server
  interceptor, which takes W3C trace context (`traceparent`) from the
  caller's metadata. Health checks are not traced: probes would drown the rest.
- The SQL spans come from opentelemetry-instrumentation-asyncpg, one per
  statement, with its text (parameters are never recorded: they hold emails).
  SQLAlchemy's own instrumentation does not support SQLAlchemy 2.1. The
  statements of an RPC run in a SQLAlchemy greenlet (db.py), but each
  asyncpg coroutine is awaited by the RPC's task, so the RPC's span is their
  parent.
- SQL outside any RPC (the health watcher's checks, twice a second; the change
  feed's polls) is not traced: such spans would have no RPC to belong to.

The provider is this server's, handed to both instrumentations, never set as
OpenTelemetry's global one: a process (a test run) may start several servers.
The exporter reads the standard OTEL_EXPORTER_OTLP_* variables itself;
OTEL_SERVICE_NAME defaults to "pat-users".
"""

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation import grpc as instrumentation_grpc
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc import filters
from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor
from opentelemetry.instrumentation.grpc.version import __version__ as instrumentation_version
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes

DEFAULT_SERVICE_NAME = "pat-users"
HEALTH_SERVICE = "grpc.health.v1.Health"


class Tracing:
    """This server's tracer provider and instrumentations, until `stop()`."""

    def __init__(self, endpoint: str | None, exporter: SpanExporter | None = None) -> None:
        """Export in batches to the OTLP/gRPC `endpoint`, or span by span to `exporter` (tests)."""
        self.provider = TracerProvider(resource=_resource(), sampler=_RpcWork(_env_sampler()))
        processor = (
            SimpleSpanProcessor(exporter)
            if exporter is not None
            else BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
        )
        self.provider.add_span_processor(processor)
        self._asyncpg = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
        self._asyncpg.instrument(tracer_provider=self.provider)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The server interceptor that opens each RPC's span (health checks excepted)."""
        tracer = self.provider.get_tracer(instrumentation_grpc.__name__, instrumentation_version)
        not_health = filters.negate(filters.service_name(HEALTH_SERVICE))
        return [OpenTelemetryAioServerInterceptor(tracer, filter_=not_health)]  # type: ignore[no-untyped-call]

    async def stop(self) -> None:
        """Export what is left (blocking, so on a thread) and un-instrument asyncpg."""
        self._asyncpg.uninstrument()
        await asyncio.to_thread(self.provider.shutdown)


def _resource() -> Resource:
    """The standard OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, "pat-users" if unnamed."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def _env_sampler() -> sampling.Sampler:
    # What TracerProvider would choose itself from OTEL_TRACES_SAMPLER (by
    # default: parent-based, always on); a private function, as the SDK
    # offers no public one (tests/test_tracing.py fails if it goes).
    return sampling._get_from_env_or_default()


class _RpcWork(sampling.Sampler):
    """Drops SQL spans with no RPC span above them; otherwise `sampler` decides."""

    def __init__(self, sampler: sampling.Sampler) -> None:
        self._sampler = sampler

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: Any = None,
    ) -> sampling.SamplingResult:
        if (
            kind is SpanKind.CLIENT
            and not get_current_span(parent_context).get_span_context().is_valid
        ):
            return sampling.SamplingResult(sampling.Decision.DROP)
        return self._sampler.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"RpcWork{{{self._sampler.get_description()}}}"
