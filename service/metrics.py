"""METRICS_PORT: Prometheus metrics, gRPC's standard ones and the service's own.

server.py imports this module only when METRICS_PORT is set: otherwise none
of it is loaded, registered or run, and no call pays for it.

- gRPC's standard server metrics (gRFC A66: grpc.server.call.started,
  grpc.server.call.duration and the sent and received message sizes, per
  method and status), under the names gRPC's OpenTelemetry plugin gives them
  in Prometheus. Not through that plugin (grpcio-observability): with a
  grpc.aio server it deadlocks under load (docs/observability.md).
  They are measured by a wrapper composed around each method's handler when
  it is registered (telemetry.py), not by a server interceptor, into plain
  counts that a collector of ours turns into Prometheus' series at each
  scrape (`CallMetrics`). Calls to methods the server lacks are counted by
  a last generic handler, which has none for them either.
- The service's own instruments are OpenTelemetry observables: their
  callbacks read state kept anyway (the pool, Admission's counts, the
  loop-lag sample, the health statuses) when Prometheus scrapes, and cost
  nothing per call.

prometheus_client answers scrapes on a thread of its own. The callbacks and
CallMetrics read plain integers and floats that the event loop writes, which
the GIL keeps whole.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

import asyncio
import inspect
import logging
import math
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy.ext.asyncio import AsyncEngine

from service.admission import Admission
from service.change_feed import ChangeFeed
from service.db import PoolStatus, pool_status
from service.guards import Handler, behavior_of, rebuilt
from service.health import SERVING, DatabaseHealth
from service.loop_lag import LoopLag
from service.replicas import ReplicaSet

logger = logging.getLogger(__name__)

Callback = Callable[[CallbackOptions], Iterable[Observation]]
Context = grpc.aio.ServicerContext[Any, Any]

# gRFC A66's bucket boundaries: seconds, and bytes.
LATENCY_BUCKETS = (
    0, 0.00001, 0.00005, 0.0001, 0.0003, 0.0006, 0.0008, 0.001, 0.002, 0.003, 0.004,
    0.005, 0.006, 0.008, 0.01, 0.013, 0.016, 0.02, 0.025, 0.03, 0.04, 0.05, 0.065, 0.08,
    0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.65, 0.8, 1, 2, 5, 10, 20, 50, 100,
)  # fmt: skip
SIZE_BUCKETS = (
    0, 1024, 2048, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
    268435456, 1073741824, 4294967296,
)  # fmt: skip
# The method label of calls to methods the server does not have (A66's "other").
OTHER_METHOD = "other"


class Metrics:
    """The Prometheus endpoint and what it exports, until `stop()`."""

    def __init__(self, host: str, port: int) -> None:
        """Serve `port` (0: any free one) on `host`, the interface GRPC_PORT uses."""
        # A registry of our own: what this server exports, and nothing a
        # library put in prometheus_client's global one.
        self.registry = CollectorRegistry(auto_describe=True)
        # No *_created series beside each counter and histogram: a scrape's
        # size doubled for a start time Prometheus does not use.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        ProcessCollector(registry=self.registry)  # CPU, resident memory, open files
        # Prometheus' job and instance labels say which target a series is
        # from; OpenTelemetry's target_info would only repeat it, and the
        # otel_scope_* labels on every series what its name already says.
        reader = PrometheusMetricReader(
            disable_target_info=True, scope_info_enabled=False, registry=self.registry
        )
        self.provider = MeterProvider(metric_readers=[reader])
        self._calls = CallMetrics(self.registry)
        self._http, _ = start_http_server(port, host.strip("[]"), registry=self.registry)
        self.port: int = self._http.server_port
        logger.info("metrics on port %d (Prometheus, /metrics)", self.port)

    def measured(self, handler: Handler, method: str) -> Handler:
        """`handler` of `method` ("/package.Service/Method"), its calls counted, timed and sized."""
        return _measured(handler, self._calls.method(method.lstrip("/")))

    def count_unknown_methods(self, server: grpc.aio.Server) -> None:
        """Count calls to methods `server` lacks; after every service (grpc asks in order)."""
        server.add_generic_rpc_handlers((_UnknownMethods(self._calls),))

    def observe(
        self, engine: AsyncEngine, admission: Admission, loop_lag: LoopLag, health: DatabaseHealth
    ) -> None:
        """The service's instruments, read at each scrape."""
        meter = self.provider.get_meter("pat-users")
        for field, description in POOL_GAUGES.items():
            meter.create_observable_gauge(
                f"pat_users.db.pool.{field}",
                [_pool_field(engine, field)],
                unit="{connection}",
                description=description,
            )
        meter.create_observable_gauge(
            "pat_users.rpc.in_progress",
            [lambda _: [Observation(admission.in_progress)]],
            unit="{call}",
            description="UserService calls admitted and not yet finished",
        )
        meter.create_observable_counter(
            "pat_users.rpc.refused",
            [lambda _: [Observation(n, {"reason": r}) for r, n in admission.refused.items()]],
            unit="{call}",
            description="UserService calls refused with UNAVAILABLE (OVERLOADED), by reason",
        )
        meter.create_observable_counter(
            "pat_users.rpc.refused_by_caller",
            [_refused_by_caller(admission)],
            unit="{call}",
            description="UserService calls refused for their caller's share, by caller",
        )
        meter.create_observable_gauge(
            "pat_users.rpc.unsent_response_bytes",
            [lambda _: [Observation(admission.unsent_bytes)]],
            unit="By",
            description="Answers written but not yet taken by their callers",
        )
        meter.create_observable_gauge(
            "pat_users.event_loop.lag",
            [lambda _: [Observation(loop_lag.last)]],
            unit="s",
            description="How late the event loop ran its last sample (every 0.1 s)",
        )
        meter.create_observable_gauge(
            "pat_users.event_loop.tasks",
            [_task_count(asyncio.get_running_loop())],
            unit="{task}",
            description="Tasks alive on the event loop: one per call, watch and background job",
        )
        meter.create_observable_gauge(
            "pat_users.health.serving",
            [_health_statuses(health)],
            description="1 if the health service answers SERVING for this name, else 0",
        )

    def observe_replicas(self, replicas: ReplicaSet) -> None:
        """DATABASE_REPLICA_URLS' standbys: up, lag, and reads served by each and the primary."""
        meter = self.provider.get_meter("pat-users")
        meter.create_observable_gauge(
            "pat_users.replica.up",
            [lambda _: [Observation(int(r.up), {"replica": r.name}) for r in replicas.replicas]],
            description="1 while the standby answers its checks in recovery (and no read failed)",
        )
        meter.create_observable_gauge(
            "pat_users.replica.lag",
            [
                lambda _: [
                    Observation(r.lag_seconds, {"replica": r.name}) for r in replicas.replicas
                ]
            ],
            unit="s",
            description="How long ago the primary last held no more than the standby has replayed",
        )
        meter.create_observable_counter(
            "pat_users.db.reads",
            [lambda _: [Observation(n, {"target": t}) for t, n in list(replicas.reads.items())]],
            unit="{read}",
            description="Reads served, by the primary or by each standby",
        )

    def observe_change_feed(self, feed: ChangeFeed) -> None:
        """WatchUsers: the open watches, and how long a transaction holds changes back."""
        meter = self.provider.get_meter("pat-users")
        meter.create_observable_gauge(
            "pat_users.change_feed.watchers",
            [lambda _: [Observation(feed.watchers)]],
            unit="{watch}",
            description="WatchUsers streams open now",
        )
        meter.create_observable_gauge(
            "pat_users.change_feed.held_back",
            [lambda _: [Observation(feed.held_back_seconds)]],
            unit="s",
            description="How long the oldest running transaction has held later changes back",
        )

    async def stop(self) -> None:
        """Close the endpoint (its thread notices within 0.5 s: waited for on a thread)."""
        await asyncio.to_thread(self._http.shutdown)
        self._http.server_close()
        self.provider.shutdown()


POOL_GAUGES = {
    "size": "Connections the pool keeps open (DB_POOL_SIZE)",
    "checked_out": "Connections in use by calls now",
    "overflow": "Connections open beyond the pool's size (up to DB_MAX_OVERFLOW)",
    "waiters": "Calls waiting for a connection",
}


def _pool_field(engine: AsyncEngine, field: str) -> Callback:
    def observe(_: CallbackOptions) -> Iterable[Observation]:
        status: PoolStatus = pool_status(engine)
        return [Observation(getattr(status, field))]

    return observe


def _refused_by_caller(admission: Admission) -> Callback:
    def observe(_: CallbackOptions) -> Iterable[Observation]:
        refused = list(admission.refused_by_caller.items())  # a copy: calls add to it meanwhile
        return [Observation(n, {"caller": caller}) for caller, n in refused]

    return observe


def _task_count(loop: asyncio.AbstractEventLoop) -> Callback:
    """The loop's tasks, counted from the exporter's thread (all_tasks retries a changing set)."""

    def observe(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(len(asyncio.all_tasks(loop)))]

    return observe


def _health_statuses(health: DatabaseHealth) -> Callback:
    def observe(_: CallbackOptions) -> Iterable[Observation]:
        statuses = list(health.statuses.items())  # a copy: the loop may add a name
        return [Observation(int(s == SERVING), {"service": n}) for n, s in statuses]

    return observe


class CallMetrics(Collector):
    """gRPC's standard server metrics: counts the calls' wrappers add to, read at each scrape.

    Each method's wrapper is made once, when its handler is registered, with
    its `_Method`. A call adds one to its method's count when it starts, and
    when it ends, one to a bucket of each of the three histograms of its
    method and status, and its value to their sums: plain integers and
    floats in lists, about a tenth of what prometheus_client's own Counter
    and Histogram took per call in the server (15 µs: a lock and a Python
    call per update, a linear search for the bucket). The event loop alone
    writes them; a scrape reads them on prometheus_client's thread, each
    value whole under the GIL, and exports the same series prometheus_client
    would: the same names, labels, buckets and values.

    Durations start when the handler runs, after the call's headers arrived
    (gRPC's own metric starts at the transport). Message sizes are those of
    the request and the answer of unary calls, as encoded (uncompressed: the
    service compresses nothing); streams report 0.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._methods: dict[str, _Method] = {}
        registry.register(self)

    def method(self, name: str) -> _Method:
        """The counts of `name` ("package.Service/Method"); a method has one, however wrapped."""
        method = self._methods.get(name)
        if method is None:
            method = self._methods[name] = _Method(name)
        return method

    def collect(self) -> Iterable[Metric]:
        labels = ("grpc_method", "grpc_status")
        started = CounterMetricFamily(
            "grpc_server_call_started", "Number of server calls started", labels=("grpc_method",)
        )
        histograms = (
            HistogramMetricFamily(
                "grpc_server_call_duration_seconds",
                "End-to-end time taken to complete a call from server transport's perspective",
                labels=labels,
            ),
            HistogramMetricFamily(
                "grpc_server_call_sent_total_compressed_message_size_bytes",
                "Compressed message bytes sent per server call",
                labels=labels,
            ),
            HistogramMetricFamily(
                "grpc_server_call_rcvd_total_compressed_message_size_bytes",
                "Compressed message bytes received per server call",
                labels=labels,
            ),
        )
        for method in list(self._methods.values()):  # a copy: the loop may add one
            if method.started:  # a method never called has no series, as with gRPC's plugin
                started.add_metric((method.name,), float(method.started))
            for status, series in list(method.by_status.items()):
                duration, received, sent = series
                for family, counts, bounds in (
                    (histograms[0], duration, _LATENCY_LE),
                    (histograms[1], sent, _SIZE_LE),
                    (histograms[2], received, _SIZE_LE),
                ):
                    family.add_metric((method.name, status), *_cumulative(counts, bounds))
        yield started
        yield from histograms


def _cumulative(
    counts: list[Any], bounds: tuple[str, ...]
) -> tuple[list[tuple[str, float]], float]:
    """A histogram's buckets as Prometheus has them (each counting all below), and its sum."""
    buckets, below = [], 0.0
    for le, count in zip(bounds, counts, strict=False):  # counts ends with the sum
        below += count
        buckets.append((le, below))
    return buckets, float(counts[-1])


class _UnknownMethods(grpc.GenericRpcHandler):
    """The last generic handler: counts a call to a method no service has, and has none either.

    grpc asks generic handlers once per call to a method not registered by
    name, so each such call is counted once; grpc then answers UNIMPLEMENTED
    itself, as without metrics. The caller's name for it is not a label:
    callers could make up any number of them.
    """

    def __init__(self, metrics: CallMetrics) -> None:
        self._counted = metrics.method(OTHER_METHOD)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        self._counted.started += 1
        return None


class _Method:
    """One method's counts: calls started, and per status, its three histograms.

    A histogram is a list: the count of each bucket (A66's boundaries, then
    +Inf), then the sum of what was observed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = 0
        self.by_status: dict[str, tuple[list[Any], list[Any], list[Any]]] = {}

    def ended(self, status: str, seconds: float, received: int, sent: int) -> None:
        series = self.by_status.get(status)
        if series is None:
            series = self.by_status[status] = (_empty(LATENCY), _empty(SIZES), _empty(SIZES))
        duration, received_sizes, sent_sizes = series
        duration[bisect_left(LATENCY, seconds)] += 1
        duration[-1] += seconds
        received_sizes[bisect_left(SIZES, received)] += 1
        received_sizes[-1] += received
        sent_sizes[bisect_left(SIZES, sent)] += 1
        sent_sizes[-1] += sent


def _empty(bounds: tuple[float, ...]) -> list[Any]:
    return [0] * len(bounds) + [0.0]


def _le(bound: float) -> str:
    """A bucket's `le` label, as prometheus_client writes it ("0.0008", "1e-05", "+Inf")."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]


# Upper bounds with +Inf, as bisect looks them up, and as Prometheus' `le` labels.
LATENCY = (*LATENCY_BUCKETS, math.inf)
SIZES = (*SIZE_BUCKETS, math.inf)
_LATENCY_LE = tuple(_le(bound) for bound in LATENCY)
_SIZE_LE = tuple(_le(bound) for bound in SIZES)


def _measured(handler: Handler, method: _Method) -> Handler:
    """`handler` with its calls counted, timed and sized."""
    kind, behavior = behavior_of(handler)
    if kind == "unary_unary":
        return rebuilt(handler, _unary(behavior, method))
    return rebuilt(handler, _streaming(behavior, method))


def _unary(behavior: Any, method: _Method) -> Any:
    async def measured(request: Any, context: Context) -> Any:
        method.started += 1
        started = time.perf_counter()
        response = None
        error: BaseException | None = None
        try:
            response = await behavior(request, context)
            return response
        except BaseException as raised:
            error = raised
            raise
        finally:
            sent = len(response) if type(response) is bytes else _size(response)
            method.ended(
                _status(context, error), time.perf_counter() - started, _size(request), sent
            )

    return measured


def _streaming(behavior: Any, method: _Method) -> Any:
    """A streaming handler: an async generator (WatchUsers, reflection), or a
    coroutine that writes with context.write (grpc's own Health/Watch)."""
    if inspect.isasyncgenfunction(behavior):

        async def generating(request: Any, context: Context) -> AsyncIterator[Any]:
            method.started += 1
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                async for response in behavior(request, context):
                    yield response
            except BaseException as raised:
                error = raised
                raise
            finally:
                method.ended(_status(context, error), time.perf_counter() - started, 0, 0)

        return generating

    async def writing(request: Any, context: Context) -> Any:
        method.started += 1
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as raised:
            error = raised
            raise
        finally:
            method.ended(_status(context, error), time.perf_counter() - started, 0, 0)

    return writing


def _status(context: Context, error: BaseException | None) -> str:
    """The status the call ends with, as gRPC will send it."""
    if error is None or isinstance(error, grpc.aio.AbortError):
        code = context.code()  # set by abort() or set_code(); None: OK
        return code.name if isinstance(code, grpc.StatusCode) else "OK"
    # GeneratorExit: the call ended (its caller cancelled) while grpc was
    # sending the generator's last answer, and grpc closed the generator.
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.UNKNOWN.name


def _size(message: Any) -> int:
    """A message's encoded size (UserService's handlers hand gRPC bytes already)."""
    try:
        return int(message.ByteSize())
    except AttributeError:  # bytes; a request that did not parse (guards.Undecodable); None
        return len(message) if isinstance(message, bytes) else 0
