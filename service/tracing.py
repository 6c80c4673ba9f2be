"""OTEL_EXPORTER_OTLP_ENDPOINT: a span per RPC, its SQL as child spans, exported over OTLP/gRPC.

server.py imports this module only when tracing is on: otherwise none of it
is loaded, and nothing wraps the handlers.

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

Sampled calls only pay for it (`traced`). The interceptor is not installed
as one: each handler is wrapped once, at registration (telemetry.py), and
each call decides first, before any span or context work, whether it will
be traced. A call carrying trace context (`traceparent`) is, as before: the
sampler follows the caller's decision. Without one, the call's trace id is
drawn and held against the sampler's bound (OTEL_TRACES_SAMPLER_ARG's
ratio), which is what the SDK's sampler would do. A call it drops runs no
instrumentation at all, and its SQL none either (instrumentation is
suppressed for it). A call it keeps runs the interceptor's instrumentation,
whose span gets that very trace id (`_DrawnFirst`), so the sampler, asked
then, decides the same, and the spans are what the interceptor always made.

The provider is this server's, handed to both instrumentations, never set as
OpenTelemetry's global one: a process (a test run) may start several servers.
The exporter reads the standard OTEL_EXPORTER_OTLP_* variables itself;
OTEL_SERVICE_NAME defaults to "pat-users".
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from random import getrandbits
from typing import Any

import grpc
from opentelemetry import propagate
from opentelemetry.context import Context, attach, detach, get_current
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation import grpc as instrumentation_grpc
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor
from opentelemetry.instrumentation.grpc.version import __version__ as instrumentation_version
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import Link, SpanKind, get_current_span
from opentelemetry.util.types import Attributes

from service.guards import Behavior, Handler, behavior_of, rebuilt

DEFAULT_SERVICE_NAME = "pat-users"
HEALTH_SERVICE = "grpc.health.v1.Health"
ServicerContext = grpc.aio.ServicerContext[Any, Any]

# A kept call's trace id, drawn to decide its sampling ahead; its span takes it (_DrawnFirst).
_DRAWN: ContextVar[int | None] = ContextVar("pat_users_drawn_trace_id", default=None)
_LOW_BITS = sampling.TraceIdRatioBased.TRACE_ID_LIMIT  # what TraceIdRatioBased compares


class Tracing:
    """This server's tracer provider and instrumentations, until `stop()`."""

    def __init__(self, endpoint: str | None, exporter: SpanExporter | None = None) -> None:
        """Export in batches to the OTLP/gRPC `endpoint`, or span by span to `exporter` (tests)."""
        self._sampler = _env_sampler()
        self.provider = TracerProvider(
            resource=_resource(), sampler=_RpcWork(self._sampler), id_generator=_DrawnFirst()
        )
        processor = (
            SimpleSpanProcessor(exporter)
            if exporter is not None
            else BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
        )
        self.provider.add_span_processor(processor)
        self._asyncpg = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
        self._asyncpg.instrument(tracer_provider=self.provider)
        tracer = self.provider.get_tracer(instrumentation_grpc.__name__, instrumentation_version)
        self._interceptor = OpenTelemetryAioServerInterceptor(tracer)  # type: ignore[no-untyped-call]
        # The metadata keys that carry a caller's trace context (traceparent,
        # tracestate, baggage: OTEL_PROPAGATORS' fields).
        self._carriers = frozenset(propagate.get_global_textmap().fields)
        self._bound = _bound_without_parent(self._sampler)
        with suppress_instrumentation():
            self._suppressed = get_current()  # what an untraced call runs in

    def traced(self, handler: Handler, method: str) -> Handler:
        """`handler` of `method`, traced when its call is sampled (health checks: never)."""
        if method.startswith(f"/{HEALTH_SERVICE}/"):
            return handler
        kind, behavior = behavior_of(handler)
        if kind in ("unary_unary", "stream_unary"):
            return rebuilt(handler, self._traced_unary(handler, behavior, method))
        if inspect.isasyncgenfunction(behavior):
            return rebuilt(handler, self._traced_stream(handler, behavior, method))
        return handler  # a streaming coroutine, writing with context.write: none of ours

    async def stop(self) -> None:
        """Export what is left (blocking, so on a thread) and un-instrument asyncpg."""
        self._asyncpg.uninstrument()
        await asyncio.to_thread(self.provider.shutdown)

    def _traced_unary(self, handler: Handler, behavior: Behavior, method: str) -> Behavior:
        sampled, suppressed = self._sampled, self._suppressed

        async def traced(request: Any, context: ServicerContext) -> Any:
            if sampled(context):
                instrumented = await self._instrumented(handler, method, context)
                return await behavior_of(instrumented)[1](request, context)
            token = attach(suppressed)  # its SQL makes no span either
            try:
                return await behavior(request, context)
            finally:
                detach(token)

        return traced

    def _traced_stream(self, handler: Handler, behavior: Behavior, method: str) -> Behavior:
        """Streamed answers (WatchUsers, reflection): untraced calls skip the span only.

        Their SQL is not suppressed: a stream's generator may be closed by
        the garbage collector in another context, where a detach would fail.
        """

        async def traced(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            if self._sampled(context):
                behaving = behavior_of(await self._instrumented(handler, method, context))[1]
            else:
                behaving = behavior
            async for response in behaving(request, context):
                yield response

        return traced

    def _sampled(self, context: ServicerContext) -> bool:
        """Will the call be traced? Decided once, before any span or context work.

        What the sampler would decide, without asking it (asked, it took 6
        µs of the server's time a call): the lowest 64 bits of the call's
        trace id under its bound. Drawn here, they are its span's if it is kept.
        """
        carriers = self._carriers
        for key, _ in context.invocation_metadata() or ():
            if key in carriers:
                return True  # the caller's trace context: the instrumentation reads it
        bound = self._bound
        if bound is None or bound > _LOW_BITS:
            return True  # a sampler that keeps them all, or one not known here: as always
        low = getrandbits(64)
        if low >= bound:
            return False
        _DRAWN.set(getrandbits(64) << 64 | low)  # the call's own task: its span takes it
        return True

    async def _instrumented(
        self, handler: Handler, method: str, context: ServicerContext
    ) -> Handler:
        """`handler` as the interceptor wraps it for this one call."""

        async def continuation(_: grpc.HandlerCallDetails) -> Handler:
            return handler

        details = _CallDetails(method, context.invocation_metadata() or ())
        intercept = self._interceptor.intercept_service
        instrumented: Handler = await intercept(continuation, details)  # type: ignore[no-untyped-call]
        return instrumented


@dataclass(frozen=True)
class _CallDetails:
    """What the interceptor is told of a call (grpc.HandlerCallDetails)."""

    method: str
    invocation_metadata: Any


class _DrawnFirst(RandomIdGenerator):
    """Random ids; but a kept call's first trace id is the one drawn to decide it (_sampled)."""

    def generate_trace_id(self) -> int:
        drawn = _DRAWN.get()
        if not drawn:  # none, or the one id in 2**128 that is no trace id
            return super().generate_trace_id()
        _DRAWN.set(None)
        return drawn


def _resource() -> Resource:
    """The standard OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, "pat-users" if unnamed."""
    detected = Resource.create()
    if str(detected.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        return detected.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return detected


def _bound_without_parent(sampler: sampling.Sampler) -> int | None:
    """How `sampler` decides a span without a parent: kept iff `trace_id & _LOW_BITS` < this.

    None for a sampler not known here (OTEL_TRACES_SAMPLER naming a plugin).
    The SDK's samplers decide such a span by its trace id alone, which makes
    the decision the same when the sampler is asked again with that id
    (`_DrawnFirst`). A ParentBased keeps its sampler of root spans in a
    private attribute (tests/test_tracing.py fails if it goes).
    """
    root = sampler
    if type(sampler) in (sampling.ParentBased, sampling.ParentBasedTraceIdRatio):
        root = sampler._root  # type: ignore[attr-defined]
    if root is sampling.ALWAYS_ON:
        return _LOW_BITS + 1
    if root is sampling.ALWAYS_OFF:
        return 0
    if type(root) is sampling.TraceIdRatioBased:
        return root.bound
    return None


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
