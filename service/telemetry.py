"""Telemetry's per-call wrappers, composed once around each handler as services register.

metrics.py measures every call and tracing.py traces the sampled ones by
wrapping method handlers (`Wrap`), never as server interceptors: grpc.aio
runs an interceptor chain, a few coroutines and a handler lookup, on every
call, for every service. Here each handler is wrapped once, when it is
registered, as guards.py composes the guard.

`registering` hands the services a stand-in for the server (`Registering`)
that wraps what they register and passes it on; with neither metrics nor
tracing on, it hands them the server itself, and calls pay nothing.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from service.guards import Handler

GenericHandler = grpc.GenericRpcHandler
# A handler and its method's path ("/pat.users.v1.UserService/GetUser") -> the handler to run.
Wrap = Callable[[Handler, str], Handler]


def registering(server: grpc.aio.Server, wraps: Sequence[Wrap]) -> grpc.aio.Server:
    """Where services register on `server`: each handler wrapped by `wraps`, the first outermost."""
    if not wraps:
        return server
    return Registering(server, _composed(wraps))


def _composed(wraps: Sequence[Wrap]) -> Wrap:
    def wrap(handler: Handler, method: str) -> Handler:
        for inner_first in reversed(wraps):
            handler = inner_first(handler, method)
        return handler

    return wrap


class Registering(grpc.aio.Server):
    """Stands in for a server while services register on it: what they register, wrapped.

    A grpc.aio.Server, so that what checks (grpc_reflection's
    `enable_server_reflection`) takes it for one. Handlers only: ports,
    start and stop are the server's own business.
    """

    def __init__(self, server: grpc.aio.Server, wrap: Wrap) -> None:
        self._server = server
        self._wrap = wrap

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        wrapped = {
            name: self._wrap(handler, f"/{service_name}/{name}")
            for name, handler in method_handlers.items()
        }
        self._server.add_registered_method_handlers(service_name, wrapped)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[GenericHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            [_WrappedGeneric(handlers, self._wrap) for handlers in generic_rpc_handlers]
        )

    def add_insecure_port(self, address: str) -> int:
        raise TypeError("a port is added to the server itself, not while registering")

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        raise TypeError("a port is added to the server itself, not while registering")

    async def start(self) -> None:
        raise TypeError("the server itself starts, not its stand-in")

    async def stop(self, grace: float | None) -> None:
        raise TypeError("the server itself stops, not its stand-in")

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        raise TypeError("the server itself terminates, not its stand-in")


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler's handlers, each wrapped the first time it is asked for.

    grpc asks generic handlers only for methods not registered by name: the
    generated `add_*_to_server` registers its methods both ways, and names
    take precedence; so this serves unknown methods' lookups, not calls.
    """

    def __init__(self, handlers: grpc.GenericRpcHandler, wrap: Wrap) -> None:
        self._handlers = handlers
        self._wrap = wrap
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        handler: Any = self._handlers.service(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is None or known[0] is not handler:
            known = self._wrapped[method] = (handler, self._wrap(handler, method))
        return known[1]
