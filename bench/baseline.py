"""`python -m bench.baseline`: the raw-asyncpg yardstick the service is measured against.

A minimal grpc.aio server for four UserService RPCs (GetUser, LookupUser,
CreateUser, UpdateUser; every other RPC is UNIMPLEMENTED) that does what the
service must do on the wire and nothing more: one asyncpg statement per call
over a pool as large as the service's, no SQLAlchemy, no session, no
admission or error-mapping layers, validation cut to what keeps the SQL
well-formed. It builds responses with the service's own `to_proto`, so the
same row yields the same bytes (the bench checks that before measuring):
whatever the service costs beyond this server is its layers' cost.

Configuration comes from the environment: BASELINE_DATABASE_URL,
BASELINE_PORT (0 picks one; the chosen one is printed),
BASELINE_POOL_SIZE, and EVENT_LOOP as the service reads it.
"""

from __future__ import annotations  # grpc.RpcMethodHandler is generic only in its stubs

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # before grpc is imported

import asyncio
import functools
import signal
import uuid
from typing import Any

import asyncpg
import grpc

from pat.users.v1 import user_service_pb2 as pb
from service.config import Settings
from service.convert import parse_etag, to_proto

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = pb.DESCRIPTOR.services_by_name["UserService"].full_name

# Every column, as the service's select(User) and RETURNING User read them.
GET = "SELECT * FROM users WHERE id = $1"
LOOKUP = "SELECT * FROM users WHERE lower(email) = lower($1) AND delete_time IS NULL"
INSERT = (
    "INSERT INTO users (email, display_name, create_request_id, create_request_digest)"
    " VALUES ($1, $2, NULL, NULL) ON CONFLICT DO NOTHING RETURNING *"
)
MUTABLE_FIELDS = ("email", "display_name")


class Row(asyncpg.Record):  # type: ignore[misc]  # asyncpg ships no type stubs
    """An asyncpg record readable by attribute, as `to_proto` reads a model row."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


class BaselineUsers:
    """GetUser, LookupUser, CreateUser and UpdateUser as one asyncpg call each."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get_user(self, request: pb.GetUserRequest, context: Context) -> pb.GetUserResponse:
        row = await self._pool.fetchrow(GET, _uuid(request.id))
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
        return pb.GetUserResponse(user=to_proto(row))

    async def lookup_user(
        self, request: pb.LookupUserRequest, context: Context
    ) -> pb.LookupUserResponse:
        row = await self._pool.fetchrow(LOOKUP, request.email)
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no live user has this email")
        return pb.LookupUserResponse(user=to_proto(row))

    async def create_user(
        self, request: pb.CreateUserRequest, context: Context
    ) -> pb.CreateUserResponse:
        if not request.user.email:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "user.email is required")
        row = await self._pool.fetchrow(INSERT, request.user.email, request.user.display_name)
        if row is None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "email taken")
        return pb.CreateUserResponse(user=to_proto(row))

    async def update_user(
        self, request: pb.UpdateUserRequest, context: Context
    ) -> pb.UpdateUserResponse:
        user = request.user
        paths = tuple(request.update_mask.paths)
        fields = MUTABLE_FIELDS if paths == ("*",) else paths or _populated(user)
        version = parse_etag(user.etag) if user.etag else None
        values = [getattr(user, name) for name in fields]
        arguments = [_uuid(user.id), *values] + ([version] if version is not None else [])
        row = await self._pool.fetchrow(_update(fields, version is not None), *arguments)
        if row is None:
            await context.abort(grpc.StatusCode.ABORTED, "no live user with this id and etag")
        return pb.UpdateUserResponse(user=to_proto(row))


def _uuid(value: str) -> uuid.UUID:
    """Enough validation to keep asyncpg from raising: a bad id becomes the nil UUID."""
    try:
        return uuid.UUID(value)
    except ValueError:
        return uuid.UUID(int=0)


def _populated(user: Any) -> tuple[str, ...]:
    return tuple(name for name in MUTABLE_FIELDS if getattr(user, name))


@functools.cache
def _update(fields: tuple[str, ...], versioned: bool) -> str:
    """The service's UPDATE ... RETURNING for one set of fields, as SQL text."""
    unknown = set(fields) - set(MUTABLE_FIELDS)
    assert not unknown, unknown  # only ever names from MUTABLE_FIELDS reach the SQL
    assignments = [f"{name} = ${i}" for i, name in enumerate(fields, start=2)]
    assignments += ["version = version + 1", "update_time = now()"]
    condition = f" AND version = ${len(fields) + 2}" if versioned else ""
    # Column names come from MUTABLE_FIELDS only, values are all parameters.
    where = f"id = $1 AND delete_time IS NULL{condition}"
    return f"UPDATE users SET {', '.join(assignments)} WHERE {where} RETURNING *"  # noqa: S608


def _handlers(users: BaselineUsers) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The four RPCs; every other UserService method stays UNIMPLEMENTED."""
    methods: dict[str, tuple[Any, Any, Any]] = {
        "GetUser": (users.get_user, pb.GetUserRequest, pb.GetUserResponse),
        "LookupUser": (users.lookup_user, pb.LookupUserRequest, pb.LookupUserResponse),
        "CreateUser": (users.create_user, pb.CreateUserRequest, pb.CreateUserResponse),
        "UpdateUser": (users.update_user, pb.UpdateUserRequest, pb.UpdateUserResponse),
    }
    return {
        name: grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
        for name, (behavior, request, response) in methods.items()
    }


async def _nothing_to_reset(connection: asyncpg.Connection) -> None:
    """Skip asyncpg's default reset query on release (a second round trip per call).

    Every call here is one autocommit statement that leaves no session state
    behind (no transaction, SET, LISTEN or lock); SQLAlchemy's pool does not
    query on check-in either, so the service pays no such trip.
    """


async def create_pool(database_url: str, pool_size: int) -> asyncpg.Pool:
    """The baseline's pool: `pool_size` connections, records readable by attribute."""
    return await asyncpg.create_pool(
        database_url.replace("postgresql+asyncpg://", "postgresql://", 1),
        min_size=pool_size,
        max_size=pool_size,
        record_class=Row,
        reset=_nothing_to_reset,
        server_settings={"application_name": "pat-users-baseline"},
    )


async def serve(database_url: str, port: int, pool_size: int) -> None:
    pool = await create_pool(database_url, pool_size)
    server = grpc.aio.server()
    handlers = _handlers(BaselineUsers(pool))
    # Registered as the service registers its own (server.py): the same dispatch path.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    chosen = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    loop = type(asyncio.get_running_loop()).__module__
    print(f"port {chosen}, event loop {loop}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)
    await pool.close()


def event_loop_runner() -> asyncio.Runner:
    """The event loop the service would pick (EVENT_LOOP: uvloop where installed).

    The loop is not one of the service's layers: the yardstick runs on the same one.
    """
    if getattr(Settings(), "event_loop", "asyncio") == "uvloop":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def main() -> None:
    with event_loop_runner() as runner:
        runner.run(
            serve(
                os.environ["BASELINE_DATABASE_URL"],
                int(os.environ.get("BASELINE_PORT", "0")),
                int(os.environ.get("BASELINE_POOL_SIZE", "20")),
            )
        )


if __name__ == "__main__":
    main()
