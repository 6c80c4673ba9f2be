"""The callers' gRPC service config shipped with the stubs: what it says and what it does.

A stub whose channel uses it rides through a short database outage (its
calls are retried on UNAVAILABLE with backoff) where a plain stub fails. The
outage is a proxy between the server and PostgreSQL that the test cuts:
open connections drop and new ones are refused, as when the database
restarts, then it lets them through again.
"""

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy.engine import make_url

from pat.users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.server import RunningServer
from tests.support import (
    PROJECT_ROOT,
    create_user,
    eventually,
    fails,
    run_sql,
    server_settings,
    serving,
    unique_email,
)

# How README's "From another service" loads it.
SERVICE_CONFIG_FILE = Path(user_service_pb2_grpc.__file__).with_name("service_config.json")
SOURCE_FILE = PROJECT_ROOT / "protos" / "pat" / "users" / "v1" / "service_config.json"
USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
# gRPC clamps maxAttempts to 5: more would be ignored with an error in the log.
GRPC_MAX_ATTEMPTS = 5
REQUEST_ID = "x-request-id"  # the access log's request id, which every attempt of a call carries


def service_config() -> dict[str, Any]:
    config: dict[str, Any] = json.loads(SERVICE_CONFIG_FILE.read_text())
    return config


def method_configs() -> dict[str, dict[str, Any]]:
    """Each configured method's name and its methodConfig entry."""
    configured: dict[str, dict[str, Any]] = {}
    for entry in service_config()["methodConfig"]:
        for name in entry["name"]:
            assert name["service"] == USER_SERVICE.full_name, name
            assert name["method"] not in configured, f"{name['method']} is configured twice"
            configured[name["method"]] = entry
    return configured


def seconds(duration: str) -> float:
    assert re.fullmatch(r"\d+(\.\d+)?s", duration), duration
    return float(duration.removesuffix("s"))


def test_service_config_covers_every_method_of_the_service_and_nothing_else() -> None:
    assert set(method_configs()) == set(USER_SERVICE.methods_by_name)
    assert SERVICE_CONFIG_FILE.read_bytes() == SOURCE_FILE.read_bytes()


def test_every_method_retries_unavailable_only_with_backoff_within_its_timeout() -> None:
    for method, entry in method_configs().items():
        policy = entry["retryPolicy"]
        # ABORTED is not listed: a stale etag (re-read first) and a deadlock
        # (retry as is) share it, and only the ErrorInfo reason tells them apart.
        assert policy["retryableStatusCodes"] == ["UNAVAILABLE"], method
        assert 2 <= policy["maxAttempts"] <= GRPC_MAX_ATTEMPTS, method
        backoff = seconds(policy["initialBackoff"])
        assert 0 < backoff <= seconds(policy["maxBackoff"]), method
        assert policy["backoffMultiplier"] > 1, method
        if USER_SERVICE.methods_by_name[method].server_streaming:
            # A watch lasts as long as the caller wants; its caller sets a deadline, if any.
            assert "timeout" not in entry, method
            continue
        # The deadline leaves room for every attempt's backoff (gRPC jitters each by ±20 %).
        waits = [
            min(backoff * policy["backoffMultiplier"] ** n, seconds(policy["maxBackoff"]))
            for n in range(policy["maxAttempts"] - 1)
        ]
        assert seconds(entry["timeout"]) > 1.2 * sum(waits) + 1, method


# --- riding through a database outage ------------------------------------------------------


class CuttableProxy:
    """A TCP proxy to PostgreSQL; `cut()` drops its connections and refuses new ones."""

    def __init__(self, database_url: str) -> None:
        self._target = make_url(database_url)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """`database_url`, reached through the proxy."""
        through = self._target.difference_update_query(["host"])
        return through.set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for transport in self._transports:
            transport.abort()  # a reset, as when the database goes away
        self._transports.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await self._connect_upstream()
        self._transports |= {writer.transport, upstream_writer.transport}
        await asyncio.gather(
            _pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True
        )

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        socket_folder = self._target.query.get("host")  # the embedded server's Unix socket
        port = self._target.port or 5432
        if isinstance(socket_folder, str) and socket_folder.startswith("/"):
            return await asyncio.open_unix_connection(f"{socket_folder}/.s.PGSQL.{port}")
        return await asyncio.open_connection(self._target.host or "localhost", port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def cuttable_proxy(database_url: str) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(database_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.cut()


def channel_options() -> list[tuple[str, Any]]:
    """What README's "From another service" passes to its channel."""
    return [("grpc.service_config", SERVICE_CONFIG_FILE.read_text()), ("grpc.enable_retries", 1)]


async def test_a_stub_with_the_service_config_rides_through_a_short_database_outage(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.access")  # before the server starts

    def failed_attempts(request_id: str) -> int:
        """How many attempts of the call the server answered UNAVAILABLE (its access log)."""
        return sum(
            record.name == "service.access"
            and getattr(record, "request_id", None) == request_id
            and getattr(record, "code", None) == "UNAVAILABLE"
            for record in caplog.records
        )

    async with (
        cuttable_proxy(database_url) as proxy,
        serving(proxy.url, migration_database_url=proxy.url) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=channel_options()) as chan,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain_channel,
    ):
        configured, plain = UserServiceStub(chan), UserServiceStub(plain_channel)
        user = await create_user(configured)
        email = unique_email("outage")
        create = pb.CreateUserRequest(user=user_pb2.User(email=email), request_id=str(uuid.uuid4()))

        await proxy.cut()
        failure = await fails(plain.GetUser(pb.GetUserRequest(id=user.id), timeout=5))
        assert failure.code == grpc.StatusCode.UNAVAILABLE, failure
        # No timeout given: the service config's apply.
        calls = (
            configured.GetUser(pb.GetUserRequest(id=user.id), metadata=[(REQUEST_ID, "get")]),
            configured.CreateUser(create, metadata=[(REQUEST_ID, "create")]),
        )
        replies = asyncio.gather(*calls)

        async def failed_twice() -> list[int]:
            return [min(failed_attempts(call), 2) for call in ("get", "create")]

        # Each call failed on the server more than once, and its caller saw no failure.
        # (Within GetUser's own 5 s: past it, the call fails anyway.)
        await eventually(failed_twice, [2, 2], within=5)
        assert not replies.done(), replies  # still retrying, not failed
        await proxy.start()  # the database is back, on the same address

        got, created = await replies
        assert got.user == user
        assert created.user.email == email
        # The retried CreateUser made one user.
        rows = await run_sql(database_url, "SELECT id FROM users WHERE email = $1", email)
        assert [str(row["id"]) for row in rows] == [created.user.id]


async def test_calls_past_the_servers_stream_limit_on_one_channel_all_succeed_with_it(
    server: RunningServer, stub: UserServiceStub
) -> None:
    """grpcio sends calls past GRPC_MAX_CONCURRENT_STREAMS; refused, they are retried."""
    user = await create_user(stub)
    in_flight = 3 * server_settings("").grpc_max_concurrent_streams
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=channel_options()
    ) as channel:
        configured = UserServiceStub(channel)
        replies = await asyncio.gather(
            *(configured.GetUser(pb.GetUserRequest(id=user.id)) for _ in range(in_flight))
        )
    assert [reply.user for reply in replies] == [user] * in_flight
