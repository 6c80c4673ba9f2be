"""Caller authentication: AUTH_TOKENS_FILE bearer tokens, mTLS identities, REFLECTION.

Real servers, real channels: every refusal is what a caller sees over the wire.
"""

import asyncio
import hashlib
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.auth import CallersFileError, parse_callers
from service.server import RunningServer, read_credentials
from tests.certificates import CertificateAuthority, Issued
from tests.support import (
    PROJECT_ROOT,
    Failure,
    create_user,
    eventually,
    fails,
    health_status,
    hold_row_lock,
    server_settings,
    serving,
    subprocess_env,
)

READER_METHODS = "GetUser,ListUsers,BatchGetUsers,LookupUser"
SERVING = health_pb2.HealthCheckResponse.SERVING


def token_line(name: str, token: str, methods: str = "") -> str:
    return f"{name} sha256:{hashlib.sha256(token.encode()).hexdigest()} {methods}".rstrip()


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` as a careful operator (or the kubelet) does: write, then rename."""
    draft = path.with_suffix(".tmp")
    draft.write_text(text)
    os.replace(draft, path)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "callers"
    path.write_text(
        "# callers of pat-users\n"
        "\n"
        f"{token_line('writer', 'writer-token')}   # all methods\n"
        f"{token_line('reader', 'reader-token', READER_METHODS)}\n"
    )
    return path


@pytest.fixture
async def server(database_url: str, tokens_file: Path) -> AsyncIterator[RunningServer]:
    async with serving(database_url, auth_tokens_file=tokens_file) as running:
        yield running


@pytest.fixture
async def channel(server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


def assert_unauthenticated(failure: Failure) -> None:
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED, failure
    assert failure.detail(error_details_pb2.ErrorInfo).reason == "UNAUTHENTICATED"


async def get_user(stub: UserServiceStub, metadata: object = None) -> object:
    return await stub.GetUser(pb.GetUserRequest(id=str(uuid.uuid4())), metadata=metadata)


async def test_a_valid_token_calls_and_every_bad_credential_is_refused_alike(
    channel: grpc.aio.Channel,
) -> None:
    stub = UserServiceStub(channel)
    created = await stub.CreateUser(
        pb.CreateUserRequest(user={"email": f"{uuid.uuid4().hex}@example.com"}),
        metadata=bearer("writer-token"),
    )
    # The scheme is case-insensitive (RFC 9110); surrounding spaces do not count.
    again = await stub.GetUser(
        pb.GetUserRequest(id=created.user.id),
        metadata=(("authorization", "bearer  writer-token "),),
    )
    assert again.user.id == created.user.id

    refusals = [
        await fails(get_user(stub, metadata))
        for metadata in (
            None,  # no header
            bearer("no-such-token"),  # unknown token
            bearer("writer-token-"),  # almost a known one
            (("authorization", "Basic d3JpdGVyLXRva2Vu"),),  # another scheme
            (("authorization", "Bearer"),),  # no token
            (("authorization", "Bearer "),),
            (("authorization", "writer-token"),),  # no scheme
        )
    ]
    for failure in refusals:
        assert_unauthenticated(failure)
    # One message whatever was wrong: it never tells whether a caller exists.
    assert len({failure.message for failure in refusals}) == 1, refusals
    assert "writer" not in refusals[0].message


async def test_a_caller_outside_its_allow_list_is_permission_denied(
    channel: grpc.aio.Channel,
) -> None:
    stub = UserServiceStub(channel)
    user = await create_user_as(stub, "writer-token")
    read = await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=bearer("reader-token"))
    assert read.user.id == user.id
    listed = await stub.ListUsers(pb.ListUsersRequest(page_size=1), metadata=bearer("reader-token"))
    assert len(listed.users) == 1

    failure = await fails(
        stub.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=bearer("reader-token"))
    )
    assert failure.code == grpc.StatusCode.PERMISSION_DENIED
    info = failure.detail(error_details_pb2.ErrorInfo)
    assert (info.reason, dict(info.metadata)) == ("METHOD_NOT_ALLOWED", {"method": "DeleteUser"})
    assert "DeleteUser" in failure.message
    for allowed in READER_METHODS.split(","):
        assert allowed not in failure.message  # the allow-list is not told
    # Refused before any work: the user is still there, undeleted.
    still = await stub.GetUser(pb.GetUserRequest(id=user.id), metadata=bearer("reader-token"))
    assert not still.user.HasField("delete_time")


async def create_user_as(stub: UserServiceStub, token: str) -> object:
    request = pb.CreateUserRequest(user={"email": f"{uuid.uuid4().hex}@example.com"})
    return (await stub.CreateUser(request, metadata=bearer(token))).user


async def test_health_is_open_and_reflection_open_by_default(server: RunningServer) -> None:
    address = f"127.0.0.1:{server.port}"
    await eventually(lambda: health_status(address), SERVING)
    assert "pat.users.v1.UserService" in await list_services(address)


async def test_watch_users_needs_credentials_too(database_url: str, tokens_file: Path) -> None:
    async with (
        serving(database_url, auth_tokens_file=tokens_file, watch_heartbeat_seconds=0.1) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = UserServiceStub(channel)
        refused = stub.WatchUsers(pb.WatchUsersRequest(), timeout=5)
        assert_unauthenticated(await fails(refused.read()))
        denied = stub.WatchUsers(pb.WatchUsersRequest(), metadata=bearer("reader-token"), timeout=5)
        assert (await fails(denied.read())).code == grpc.StatusCode.PERMISSION_DENIED
        watch = stub.WatchUsers(pb.WatchUsersRequest(), metadata=bearer("writer-token"), timeout=5)
        first = await watch.read()
        assert first.resume_token
        watch.cancel()


async def test_an_unauthenticated_call_takes_no_admission_slot(
    database_url: str, tokens_file: Path
) -> None:
    async with (
        serving(database_url, auth_tokens_file=tokens_file, max_concurrent_rpcs=1) as running,
        grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel,
    ):
        stub = UserServiceStub(channel)
        user = await create_user_as(stub, "writer-token")
        lock = await hold_row_lock(database_url, user.id)
        try:
            update = pb.UpdateUserRequest(user={"id": user.id, "display_name": "held"})
            held = asyncio.ensure_future(
                stub.UpdateUser(update, metadata=bearer("writer-token"), timeout=30)
            )
            await wait_for(lambda: running.admission.in_progress == 1)
            assert_unauthenticated(await fails(get_user(stub, bearer("wrong"))))
            overloaded = await fails(get_user(stub, bearer("writer-token")))
            assert overloaded.code == grpc.StatusCode.UNAVAILABLE
        finally:
            await lock.close()
        await held


async def wait_for(condition: Callable[[], bool]) -> None:
    async def holds() -> bool:
        return condition()

    await eventually(holds, True)


async def test_the_file_is_reread_when_it_changes_without_a_restart(
    server: RunningServer,
    channel: grpc.aio.Channel,
    tokens_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    stub = UserServiceStub(channel)
    await create_user_as(stub, "writer-token")

    # A broken file is not taken: the callers read before stay, the log says where.
    write_atomically(tokens_file, f"{token_line('writer', 'writer-token')}\nnew sha256:abc\n")
    await until_logged_as_calls_go_on(
        stub, "writer-token", caplog, "line 2", "keeping the callers read before"
    )
    await create_user_as(stub, "writer-token")  # still in, after the failed re-read

    write_atomically(tokens_file, token_line("newcomer", "new-token") + "\n")
    await wait_until_accepted(stub, "new-token")
    assert_unauthenticated(await fails(get_user(stub, bearer("writer-token"))))
    assert_unauthenticated(await fails(get_user(stub, bearer("reader-token"))))

    await asyncio.to_thread(tokens_file.unlink)  # gone: an error logged, the last callers stay
    await until_logged_as_calls_go_on(stub, "new-token", caplog, "cannot read it")
    await create_user_as(stub, "new-token")


async def until_logged_as_calls_go_on(
    stub: UserServiceStub, token: str, caplog: pytest.LogCaptureFixture, *parts: str
) -> None:
    """Call as `token` (each call must get in) until service.auth has logged `parts`.

    The file is re-read on a call, at most once a second.
    """

    async def call_then_look() -> bool:
        await create_user_as(stub, token)
        return await has_logged(caplog, *parts)

    await eventually(call_then_look, True, within=15)


async def has_logged(caplog: pytest.LogCaptureFixture, *parts: str) -> bool:
    return any(
        record.name == "service.auth" and all(part in record.getMessage() for part in parts)
        for record in caplog.records
    )


async def wait_until_accepted(stub: UserServiceStub, token: str, within: float = 5) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await create_user_as(stub, token)
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAUTHENTICATED or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.1)


HASH = hashlib.sha256(b"some token").hexdigest()


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (f"# ok\nreader sha256:{HASH[:-1]}\n", "line 2"),  # 63 digits
        (f"reader md5:{HASH}\n", "line 1"),
        ("ok x509\nreader\n", "line 2"),
        (f"ok x509\n\nreader sha256:{HASH} GetUser,DropDatabase\n", "line 3: not UserService"),
        (f"reader GetUser sha256:{HASH}\n", "line 1: the credential"),  # columns swapped
        (f"reader x509 sha256:{HASH}\n", "line 1: not UserService methods: see the list"),
        (f"reader sha256:{HASH} GetUser extra\n", "line 1"),
        (f"a sha256:{HASH}\nb sha256:{HASH.upper()}\n", "line 2: the same token hash as line 1"),
        ("svc x509\nsvc x509 GetUser\n", "line 2"),
        ("r\u00e9ader x509\n", "line 1"),
    ],
)
def test_a_malformed_file_fails_start_naming_the_line(
    database_url: str, tmp_path: Path, content: str, complaint: str
) -> None:
    path = tmp_path / "callers"
    path.write_text(content)
    with pytest.raises(CallersFileError) as raised:
        read_credentials(server_settings(database_url, auth_tokens_file=path))
    message = str(raised.value)
    assert complaint in message
    assert HASH[:16] not in message.lower()  # never the hash


def test_a_missing_file_fails_start(database_url: str, tmp_path: Path) -> None:
    with pytest.raises(CallersFileError, match="cannot read it"):
        read_credentials(server_settings(database_url, auth_tokens_file=tmp_path / "nowhere"))


async def test_the_service_refuses_to_start_with_a_malformed_file(
    database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "callers"
    path.write_text(f"# callers\nreader sha256:{HASH}\nwriter sha256:{HASH[:10]}\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        cwd=PROJECT_ROOT,
        env=subprocess_env(DATABASE_URL=database_url, GRPC_PORT="0", AUTH_TOKENS_FILE=str(path)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    text = stderr.decode()
    assert "configuration error: AUTH_TOKENS_FILE" in text
    assert "line 3" in text
    assert HASH[:10] not in text
    assert len(text.strip().splitlines()) == 1, text


async def list_services(address: str, metadata: object = None) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        call = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=5)
        services: list[str] = []
        async for response in call:
            services += [s.name for s in response.list_services_response.service]
        return services


async def test_reflection_authenticated_needs_the_same_credentials(
    database_url: str, tokens_file: Path
) -> None:
    async with serving(
        database_url, auth_tokens_file=tokens_file, reflection="authenticated"
    ) as running:
        address = f"127.0.0.1:{running.port}"
        assert_unauthenticated(await fails(list_services(address)))
        assert_unauthenticated(await fails(list_services(address, bearer("wrong"))))
        # Any caller may look; allow-lists are about UserService methods.
        assert "pat.users.v1.UserService" in await list_services(address, bearer("reader-token"))
        await eventually(lambda: health_status(address), SERVING)


def test_reflection_authenticated_without_a_way_to_authenticate_stops_start(
    database_url: str,
) -> None:
    with pytest.raises(ValidationError, match="REFLECTION=authenticated needs"):
        server_settings(database_url, reflection="authenticated")


async def test_reflection_off_is_unimplemented(database_url: str) -> None:
    async with serving(database_url, reflection="off") as running:
        failure = await fails(list_services(f"127.0.0.1:{running.port}"))
        assert failure.code == grpc.StatusCode.UNIMPLEMENTED


# mTLS: the identity of a client certificate verified against TLS_CLIENT_CA_FILE.


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@asynccontextmanager
async def mtls_server(
    database_url: str, ca: CertificateAuthority, tokens_file: Path | None
) -> AsyncIterator[RunningServer]:
    issued = ca.server()
    async with serving(
        database_url,
        tls_cert_file=issued.cert_file,
        tls_key_file=issued.key_file,
        tls_client_ca_file=ca.cert_file,
        auth_tokens_file=tokens_file,
    ) as running:
        yield running


@asynccontextmanager
async def as_client(
    running: RunningServer, ca: CertificateAuthority, client: Issued
) -> AsyncIterator[UserServiceStub]:
    credentials = grpc.ssl_channel_credentials(ca.cert_pem, client.key_pem, client.cert_pem)
    async with grpc.aio.secure_channel(f"localhost:{running.port}", credentials) as channel:
        yield UserServiceStub(channel)


async def test_without_x509_lines_every_certificate_of_the_client_ca_is_a_caller(
    database_url: str, ca: CertificateAuthority, tokens_file: Path
) -> None:
    async with mtls_server(database_url, ca, None) as running:
        async with as_client(running, ca, ca.client("anyone.internal")) as stub:
            await create_user(stub)
        # A token still wins over the certificate when sent: no file, no token is good.
        async with as_client(running, ca, ca.client("anyone.internal")) as stub:
            assert_unauthenticated(await fails(get_user(stub, bearer("writer-token"))))
    # Token lines alone: certificates are still callers, with every method.
    async with (
        mtls_server(database_url, ca, tokens_file) as running,
        as_client(running, ca, ca.client("cn-only", with_san=False)) as stub,
    ):
        await create_user(stub)


async def test_x509_lines_name_the_certificates_that_may_call_and_what(
    database_url: str, ca: CertificateAuthority, tmp_path: Path
) -> None:
    path = tmp_path / "callers"
    path.write_text(
        "orders.internal x509\n"
        f"audit.internal x509 {READER_METHODS}\n"
        "legacy-cn x509 GetUser\n"
        f"{token_line('reader', 'reader-token', READER_METHODS)}\n"
    )
    async with mtls_server(database_url, ca, path) as running:
        async with as_client(running, ca, ca.client("orders.internal")) as stub:
            user = await create_user(stub)
            # A token sent takes precedence, even when the certificate may do more.
            failure = await fails(
                stub.DeleteUser(pb.DeleteUserRequest(id=user.id), metadata=bearer("reader-token"))
            )
            assert failure.code == grpc.StatusCode.PERMISSION_DENIED
            assert_unauthenticated(await fails(get_user(stub, bearer("unknown"))))

        async with as_client(running, ca, ca.client("audit.internal")) as stub:
            read = await stub.GetUser(pb.GetUserRequest(id=user.id))
            assert read.user.id == user.id
            denied = await fails(stub.DeleteUser(pb.DeleteUserRequest(id=user.id)))
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED

        async with as_client(running, ca, ca.client("legacy-cn", with_san=False)) as stub:
            assert (await stub.GetUser(pb.GetUserRequest(id=user.id))).user.id == user.id

        # Signed by the right CA, but not listed: the same refusal as a bad token.
        async with as_client(running, ca, ca.client("stranger.internal")) as stub:
            assert_unauthenticated(await fails(stub.GetUser(pb.GetUserRequest(id=user.id))))
            # With a token of its own, the token decides.
            read = await stub.GetUser(
                pb.GetUserRequest(id=user.id), metadata=bearer("reader-token")
            )
            assert read.user.id == user.id


def test_the_readme_example_file_and_start_up_error_are_what_the_server_reads_and_says() -> None:
    page = PROJECT_ROOT / "docs" / "tls-and-callers.md"
    section = page.read_text().split("## Callers and tokens")[1]
    section = section.split("\n## ")[0]
    blocks = re.findall(r"^```text\n(.*?)^```", section, re.DOTALL | re.MULTILINE)
    example = next(block for block in blocks if "# NAME" in block)
    callers = parse_callers(example.encode(), Path("callers"))
    assert [caller.name for _, caller in callers.tokens] == ["orders", "reporting"]
    assert callers.tokens[1][1].methods == frozenset(READER_METHODS.split(","))
    assert callers.certificates is not None
    assert sorted(callers.certificates) == ["audit.internal", "billing.internal"]

    error_line = next(block for block in blocks if "configuration error" in block).strip()
    path = Path(error_line.split("Value error, ")[1].split(",")[0])
    with pytest.raises(CallersFileError) as raised:
        parse_callers(f"orders sha256:{HASH}\nwriter sha256:abc\n".encode(), path)
    assert error_line.endswith(f"AUTH_TOKENS_FILE: Value error, {raised.value}")
