"""The one per-call wrapper of every UserService handler, composed once, at registration.

Every UserService call passes, in this order: its request decoded (bytes that
do not parse become INVALID_ARGUMENT, not grpc's UNKNOWN), authentication and
the caller's allow-list, admission under the caps (unary calls), with read
replicas its consistency token (consistency.py), the handler, and the mapping
of whatever escaped it to a status (errors.py); the access log writes one
line around all of it. Composed here, when the handlers are
registered, instead of as server interceptors: an interceptor chain costs a
coroutine per call.

Reflection, when REFLECTION=authenticated, passes authentication alone.
`rebuilt` and `behavior_of` rebuild a handler of any kind around a wrapped
behavior: metrics.py wraps handlers with them too.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from service.access_log import AccessLog
from service.admission import Admission
from service.auth import ANONYMOUS, Authenticator, calling_as
from service.consistency import ReadYourWrites
from service.errors import ServiceError, Unauthenticated, abort

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic only in its stubs
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
# grpc's stubs type handlers as synchronous; on an aio server they are
# coroutine functions, or async generator functions for streamed answers.
Behavior = Callable[[Any, Any], Any]

# The constructor of each kind of handler, by the attribute that holds its behavior.
_KINDS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


@dataclass(frozen=True)
class Guards:
    """What every UserService call passes in its one wrapper: authentication,
    then admission, with the access log around both; with read replicas, the
    consistency token in and out of unary calls."""

    authenticator: Authenticator | None  # None: authentication is off
    admission: Admission
    access_log: AccessLog | None  # None: ACCESS_LOG=false, or INFO not logged
    read_your_writes: ReadYourWrites | None = None  # None: no DATABASE_REPLICA_URLS


class Undecodable:
    """Stands in for a request whose bytes did not parse."""


class UndecodableRequest(ServiceError):
    """The request bytes are not the message the method takes."""

    code = code_pb2.INVALID_ARGUMENT

    def __init__(self) -> None:
        super().__init__(
            "the request is not a valid protobuf message for this method "
            "(corrupt wire format, or a string field that is not UTF-8)"
        )


def deferring_decode_errors(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserializer`, but undecodable bytes become an `Undecodable` request.

    grpc would answer a parse failure with UNKNOWN and the parser's text;
    deferring it to the wrapper lets it become INVALID_ARGUMENT like any bad input.
    """

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return Undecodable()

    return deserialize


def add_guarded(
    add_to_server: Callable[[Any, Any], None],
    servicer: object,
    server: grpc.aio.Server,
    guards: Guards,
) -> None:
    """Register `servicer` (by its generated `add_*_to_server`), every handler guarded."""
    handlers = Handlers()
    add_to_server(servicer, handlers)
    guarded = {
        name: _guarded_handler(handler, f"/{handlers.service}/{name}", guards)
        for name, handler in handlers.by_method.items()
    }
    register(server, handlers.service, guarded)


def add_reflection(
    server: grpc.aio.Server,
    mode: str,
    service_names: tuple[str, ...],
    authenticator: Authenticator | None,
) -> None:
    """Server reflection: REFLECTION=open to anyone, "authenticated" like UserService, or "off"."""
    if mode == "off":
        return
    if mode == "open":
        reflection.enable_server_reflection(service_names, server)
        return
    assert authenticator is not None  # server.py: "authenticated" needs a way to authenticate
    handlers = Handlers()
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(service_names), handlers
    )
    authenticated = {
        name: rebuilt(handler, _authenticated_stream(behavior_of(handler)[1], authenticator))
        for name, handler in handlers.by_method.items()
    }
    register(server, handlers.service, authenticated)


class Handlers:
    """Stands in for the server in a generated `add_*Servicer_to_server`, to get its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.by_method: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers also come through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, by_method: dict[str, Handler]) -> None:
        self.service, self.by_method = service, by_method


def register(server: grpc.aio.Server, service: str, by_method: dict[str, Handler]) -> None:
    """What a generated `add_*Servicer_to_server` does with its handlers."""
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, by_method),))
    server.add_registered_method_handlers(service, by_method)


def behavior_of(handler: Handler) -> tuple[str, Behavior]:
    """The kind of `handler` ("unary_unary", ...) and its behavior."""
    for kind in _KINDS:
        behavior = getattr(handler, kind)
        if behavior is not None:
            return kind, behavior
    raise ValueError("a method handler without a behavior")


def rebuilt(
    handler: Handler,
    behavior: Behavior,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
    serialize_in_behavior: bool = False,
) -> Handler:
    """A handler of `handler`'s kind running `behavior`, with its serializers.

    `request_deserializer` replaces the handler's own; `serialize_in_behavior`:
    the behavior hands grpc bytes, so grpc serializes nothing.
    """
    kind, _ = behavior_of(handler)
    return _KINDS[kind](
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=None if serialize_in_behavior else handler.response_serializer,
    )


def _guarded_handler(handler: Handler, method: str, guards: Guards) -> Handler:
    kind, behavior = behavior_of(handler)
    assert handler.request_deserializer is not None
    decoding = deferring_decode_errors(handler.request_deserializer)
    if kind == "unary_unary":
        assert handler.response_serializer is not None
        if guards.read_your_writes is not None:
            behavior = guards.read_your_writes.wrap(behavior)
        # The wrapper serializes the answer itself and hands grpc bytes: grpc then
        # holds only those until the caller takes them, not the message object too.
        guarded = _guarded_unary(behavior, handler.response_serializer, method, guards)
        return rebuilt(handler, guarded, request_deserializer=decoding, serialize_in_behavior=True)
    assert kind == "unary_stream", f"{method}: UserService streams answers only"
    guarded = _guarded_stream(behavior, method, guards)
    return rebuilt(handler, guarded, request_deserializer=decoding)


def _guarded_unary(
    behavior: Behavior, serialize: Callable[[Any], bytes], method: str, guards: Guards
) -> Behavior:
    """`behavior` for authenticated, admitted callers only, every error mapped, one log line.

    Authentication comes before admission: a caller without credentials never
    takes a slot. The answer is serialized here and counted as unsent until
    its caller takes it (admission.py).
    """
    name = method.rpartition("/")[2]
    authenticator, admission, access_log = guards.authenticator, guards.admission, guards.access_log

    async def guarded(request: Any, context: Context) -> bytes:
        entry = access_log.begin(context) if access_log is not None else None
        caller = ANONYMOUS
        returned = False
        try:
            if authenticator is not None:
                caller = authenticator.identify(context)
                caller.authorize(name)
                calling_as(caller)
            admitted = admission.enter(context, caller)
            try:
                if isinstance(request, Undecodable):
                    raise UndecodableRequest()
                response = serialize(await behavior(request, context))
            finally:
                admission.leave(admitted)
            admission.track_unsent(context, len(response))
            returned = True
            return response
        except grpc.aio.AbortError:
            raise  # the handler already chose its status
        except Exception as error:
            await abort(context, error, method)
        finally:
            if entry is not None:
                entry.write(context, name, caller.name, returned)

    return guarded


def _guarded_stream(behavior: Behavior, method: str, guards: Guards) -> Behavior:
    """A server-streaming `behavior` (an async generator: WatchUsers), guarded alike.

    Not admitted under MAX_CONCURRENT_RPCS: a watch lasts as long as its
    caller wants; the change feed caps watches (MAX_WATCHERS) itself. A
    cancellation is never caught: it must reach grpc (grpc/grpc#43360).
    """
    name = method.rpartition("/")[2]
    authenticator, access_log = guards.authenticator, guards.access_log

    async def guarded(request: Any, context: Context) -> AsyncIterator[Any]:
        entry = access_log.begin(context) if access_log is not None else None
        caller = ANONYMOUS
        returned = False
        try:
            if authenticator is not None:
                caller = authenticator.identify(context)
                caller.authorize(name)
            if isinstance(request, Undecodable):
                raise UndecodableRequest()
            async for response in behavior(request, context):
                yield response
            returned = True
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await abort(context, error, method)
        finally:
            if entry is not None:
                entry.write(context, name, caller.name, returned)

    return guarded


def _authenticated_stream(behavior: Behavior, authenticator: Authenticator) -> Behavior:
    """A bidirectional-streaming `behavior` (reflection) for any authenticated caller."""

    async def authenticated(requests: Any, context: Context) -> AsyncIterator[Any]:
        try:
            authenticator.identify(context)
        except Unauthenticated as error:
            await abort(context, error, reflection.SERVICE_NAME)
        async for response in behavior(requests, context):
            yield response

    return authenticated
