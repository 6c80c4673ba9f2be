"""Server reflection, used by a real outside client: `buf curl` (grpcurl's stand-in)."""

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from service.server import RunningServer
from tests.support import USER_SERVICE_RPCS

BUF = shutil.which("buf") or str(Path(sys.executable).parent / "buf")


async def buf_curl(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    command = [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


def url(server: RunningServer, path: str = "") -> str:
    return f"http://127.0.0.1:{server.port}/{path}"


async def test_lists_every_service(server: RunningServer, channel: object) -> None:
    result = await buf_curl(server, "--list-services", url(server))
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= {
        "pat.users.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_lists_user_service_methods(server: RunningServer, channel: object) -> None:
    result = await buf_curl(server, "--list-methods", url(server))
    assert result.returncode == 0, result.stderr
    listed = {m for m in result.stdout.split() if m.startswith("pat.users.v1.UserService/")}
    every_rpc = (*USER_SERVICE_RPCS, "WatchUsers")
    assert listed == {f"pat.users.v1.UserService/{rpc}" for rpc in every_rpc}


def describe(port: int) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """What `grpcurl describe` shows: the schema, fetched by reflection alone."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as sync_channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(sync_channel))
        service = pool.FindServiceByName("pat.users.v1.UserService")
        methods = {
            m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods
        }
        user = pool.FindMessageTypeByName("pat.users.v1.User")
        return methods, [field.name for field in user.fields]


async def test_describes_user_service_like_grpcurl(server: RunningServer, channel: object) -> None:
    methods, user_fields = await asyncio.to_thread(describe, server.port)
    assert methods == {
        rpc: (f"pat.users.v1.{rpc}Request", f"pat.users.v1.{rpc}Response")
        for rpc in (*USER_SERVICE_RPCS, "WatchUsers")
    }
    assert user_fields == [
        "id",
        "email",
        "display_name",
        "create_time",
        "update_time",
        "delete_time",
        "etag",
    ]


async def test_create_and_get_with_json_bodies(server: RunningServer, channel: object) -> None:
    body = json.dumps({"user": {"email": "curl@example.com", "displayName": "Curl"}})
    created = await buf_curl(server, "-d", body, url(server, "pat.users.v1.UserService/CreateUser"))
    assert created.returncode == 0, created.stderr
    user = json.loads(created.stdout)["user"]
    assert (user["email"], user["displayName"]) == ("curl@example.com", "Curl")

    fetched = await buf_curl(
        server,
        "-d",
        json.dumps({"id": user["id"]}),
        url(server, "pat.users.v1.UserService/GetUser"),
    )
    assert fetched.returncode == 0, fetched.stderr
    assert json.loads(fetched.stdout)["user"] == user


async def test_errors_reach_buf_curl_with_their_code(
    server: RunningServer, channel: object
) -> None:
    result = await buf_curl(
        server, "-d", '{"id": "nope"}', url(server, "pat.users.v1.UserService/GetUser")
    )
    assert result.returncode != 0
    assert "invalid_argument" in result.stderr


async def test_health_check_by_reflection(server: RunningServer, channel: object) -> None:
    result = await buf_curl(server, "-d", "{}", url(server, "grpc.health.v1.Health/Check"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}
