"""TLS and mTLS on GRPC_PORT, certificate rotation, and the plaintext HEALTH_PORT.

Every test makes its own CAs and certificates (tests/certificates.py) and
talks to a real server over real TLS connections.
"""

import asyncio
import hashlib
import logging
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from pat.users.v1 import user_service_pb2 as pb
from pat.users.v1.user_service_pb2_grpc import UserServiceStub
from service.config import Settings
from service.server import read_credentials, start
from service.tls import CertificateFiles, TlsFilesError, add_port
from tests.certificates import CertificateAuthority, Issued
from tests.support import (
    PROJECT_ROOT,
    ServiceProcess,
    create_user,
    eventually,
    fails,
    health_status,
    server_settings,
    serving,
    subprocess_env,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def tls_channel(
    port: int, trusted: CertificateAuthority, client: Issued | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel with a TCP connection of its own, trusting `trusted`, presenting `client`."""
    credentials = grpc.ssl_channel_credentials(
        trusted.cert_pem,
        client.key_pem if client else None,
        client.cert_pem if client else None,
    )
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options) as channel:
        yield channel


async def call_user_service(channel: grpc.aio.Channel) -> None:
    """A real UserService call (a write and a read) that must succeed."""
    users = UserServiceStub(channel)
    created = await create_user(users)
    fetched = await users.GetUser(pb.GetUserRequest(id=created.id), timeout=5)
    assert fetched.user.email == created.email


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The status of a call that never gets through; the connection itself is refused."""
    request = pb.GetUserRequest(id="00000000-0000-0000-0000-000000000000")
    return (await fails(UserServiceStub(channel).GetUser(request, timeout=5))).code


def install(issued: Issued, cert_file: Path, key_file: Path) -> None:
    """Write a certificate and its key over the served files, in place, key first."""
    key_file.write_bytes(issued.key_pem)
    cert_file.write_bytes(issued.cert_pem)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca", "pat-users test CA")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "other", "another CA")


# --- TLS and mTLS ----------------------------------------------------------------------


async def test_tls_client_is_served_and_plaintext_client_is_refused(
    database_url: str, ca: CertificateAuthority
) -> None:
    issued = ca.server()
    async with serving(
        database_url, tls_cert_file=issued.cert_file, tls_key_file=issued.key_file
    ) as running:
        async with tls_channel(running.port, ca) as channel:
            await call_user_service(channel)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plaintext:
            assert await refused(plaintext) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_serves_only_clients_with_a_certificate_from_the_client_ca(
    database_url: str, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    issued = ca.server()
    async with serving(
        database_url,
        tls_cert_file=issued.cert_file,
        tls_key_file=issued.key_file,
        tls_client_ca_file=ca.cert_file,
    ) as running:
        async with tls_channel(running.port, ca, ca.client("billing")) as channel:
            await call_user_service(channel)
        async with tls_channel(running.port, ca) as anonymous:
            assert await refused(anonymous) == grpc.StatusCode.UNAVAILABLE
        async with tls_channel(running.port, ca, other_ca.client("billing")) as stranger:
            assert await refused(stranger) == grpc.StatusCode.UNAVAILABLE


# --- rotation --------------------------------------------------------------------------


def kubelet_layout(folder: Path, issued: Issued) -> tuple[Path, Path]:
    """A mounted Secret as the kubelet lays it out: tls.crt -> ..data/tls.crt, ..data -> a dir."""
    folder.mkdir()
    kubelet_swap(folder, issued, "..first")
    for name in ("tls.crt", "tls.key"):
        (folder / name).symlink_to(Path("..data") / name)
    return folder / "tls.crt", folder / "tls.key"


def kubelet_swap(folder: Path, issued: Issued, version: str) -> None:
    """The kubelet's update: write a new version folder, then swap ..data to it at once."""
    (folder / version).mkdir()
    (folder / version / "tls.crt").write_bytes(issued.cert_pem)
    (folder / version / "tls.key").write_bytes(issued.key_pem)
    (folder / "..data_tmp").symlink_to(version)
    os.replace(folder / "..data_tmp", folder / "..data")


@pytest.mark.parametrize("update", ["in place", "kubelet symlink swap"])
async def test_rotated_certificate_is_served_to_new_connections_without_restart(
    database_url: str,
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    tmp_path: Path,
    update: str,
) -> None:
    first, second = ca.server(), other_ca.server()
    if update == "in place":
        cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
        install(first, cert_file, key_file)
    else:
        cert_file, key_file = kubelet_layout(tmp_path / "secret", first)
    async with (
        serving(database_url, tls_cert_file=cert_file, tls_key_file=key_file) as running,
        tls_channel(running.port, ca) as before,
    ):
        await call_user_service(before)
        if update == "in place":
            install(second, cert_file, key_file)
        else:
            kubelet_swap(tmp_path / "secret", second, "..second")
        # A new connection gets the new certificate: only the new CA verifies it.
        async with tls_channel(running.port, other_ca) as after:
            await call_user_service(after)
        async with tls_channel(running.port, ca) as stale:
            assert await refused(stale) == grpc.StatusCode.UNAVAILABLE
        # A connection made before the rotation keeps its session.
        await call_user_service(before)


async def test_unusable_new_files_keep_the_old_certificate_served(
    database_url: str,
    ca: CertificateAuthority,
    other_ca: CertificateAuthority,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    install(ca.server(), cert_file, key_file)
    async with serving(database_url, tls_cert_file=cert_file, tls_key_file=key_file) as running:
        # Half a rotation: a new certificate, but still the old key.
        cert_file.write_bytes(other_ca.server().cert_pem)
        for _ in range(3):  # every handshake asks; the log says it once per change
            async with tls_channel(running.port, ca) as channel:
                await call_user_service(channel)
        warnings = [r.getMessage() for r in caplog.records if r.name == "service.tls"]
        assert len(warnings) == 1, warnings
        assert "still serving the previous ones" in warnings[0]
        assert str(cert_file) in warnings[0]

        key_file.write_text("not a key")
        async with tls_channel(running.port, ca) as channel:
            await call_user_service(channel)

        install(other_ca.server(), cert_file, key_file)  # the rotation completes
        async with tls_channel(running.port, other_ca) as channel:
            await call_user_service(channel)


# --- settings and files checked at start -----------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_cert_file": "tls.crt"}, "TLS_CERT_FILE and TLS_KEY_FILE must be set together"),
        ({"tls_key_file": "tls.key"}, "TLS_CERT_FILE and TLS_KEY_FILE must be set together"),
        ({"tls_client_ca_file": "ca.pem"}, "TLS_CLIENT_CA_FILE (mTLS) needs TLS_CERT_FILE"),
        ({"grpc_port": 50051, "health_port": 50051}, "HEALTH_PORT must differ from GRPC_PORT"),
    ],
)
def test_settings_refuse_incomplete_tls(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(**settings)  # type: ignore[arg-type]


def bad_files(
    ca: CertificateAuthority, other_ca: CertificateAuthority, case: str
) -> dict[str, Path | None]:
    issued = ca.server()
    cert, key, client_ca = issued.cert_file, issued.key_file, None
    if case == "missing key":
        key = key.with_name("absent.pem")
    elif case == "key of another certificate":
        key = other_ca.server().key_file
    elif case == "client CA is not PEM":
        client_ca = key.with_name("ca.txt")
        client_ca.write_text("not a certificate")
    return {"tls_cert_file": cert, "tls_key_file": key, "tls_client_ca_file": client_ca}


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("missing key", ["TLS_KEY_FILE", "absent.pem", "No such file"]),
        ("key of another certificate", ["TLS_CERT_FILE", "TLS_KEY_FILE", "KEY_VALUES_MISMATCH"]),
        ("client CA is not PEM", ["TLS_CLIENT_CA_FILE", "ca.txt"]),
    ],
)
def test_unusable_files_are_a_configuration_error(
    ca: CertificateAuthority, other_ca: CertificateAuthority, case: str, names: list[str]
) -> None:
    settings = Settings(**bad_files(ca, other_ca, case))  # type: ignore[arg-type]
    with pytest.raises(TlsFilesError) as raised:
        read_credentials(settings)
    for name in names:
        assert name in str(raised.value)


async def test_service_with_a_mismatched_key_exits_with_one_line_saying_so(
    database_url: str, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    issued = ca.server()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        cwd=PROJECT_ROOT,
        env=subprocess_env(
            DATABASE_URL=database_url,
            GRPC_PORT="0",
            TLS_CERT_FILE=str(issued.cert_file),
            TLS_KEY_FILE=str(other_ca.server().key_file),
        ),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    (line,) = stderr.decode().splitlines()
    assert process.returncode == 2, line
    assert line.startswith("pat-users: configuration error:"), line
    assert "are not a PEM certificate and its private key" in line


# --- HEALTH_PORT -----------------------------------------------------------------------


async def test_health_port_answers_in_plaintext_and_serves_nothing_else(
    database_url: str, ca: CertificateAuthority
) -> None:
    issued = ca.server()
    async with serving(
        database_url,
        tls_cert_file=issued.cert_file,
        tls_key_file=issued.key_file,
        health_port=0,
    ) as running:
        assert running.health_port not in (None, running.port)
        health = f"127.0.0.1:{running.health_port}"
        await eventually(lambda: health_status(health), SERVING)
        assert await health_status(health, "liveness") == SERVING
        assert await health_status(health, "pat.users.v1.UserService") == SERVING

        async with grpc.aio.insecure_channel(health) as channel:
            assert await refused(channel) == grpc.StatusCode.UNIMPLEMENTED
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            listing = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                async for _ in listing:
                    pass
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await health_status(f"127.0.0.1:{running.port}")  # plaintext on the TLS port
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_port_turns_not_serving_at_shutdown_then_closes(database_url: str) -> None:
    # HEALTH_PORT without TLS is allowed too: both ports are plaintext then.
    running = await start(server_settings(database_url, health_port=0), database_url)
    health = f"127.0.0.1:{running.health_port}"
    stopping = None
    try:
        await eventually(lambda: health_status(health), SERVING)
        stopping = asyncio.create_task(running.stop(drain_seconds=1.5, grace_seconds=0))
        await eventually(lambda: health_status(health), NOT_SERVING, within=1)
        assert await health_status(health, "liveness") == NOT_SERVING
    finally:
        await (stopping or running.stop(drain_seconds=0, grace_seconds=0))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health_status(health)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


# --- python -m service.probe -----------------------------------------------------------


async def probe(**env: str) -> subprocess.CompletedProcess[str]:
    """The container's HEALTHCHECK command, with no arguments, in this environment."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service.probe"],
        cwd=PROJECT_ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


async def test_probe_asks_the_health_port_when_tls_is_on(
    database_url: str, ca: CertificateAuthority
) -> None:
    issued = ca.server()
    tls = {"TLS_CERT_FILE": str(issued.cert_file), "TLS_KEY_FILE": str(issued.key_file)}
    async with serving(
        database_url, tls_cert_file=issued.cert_file, tls_key_file=issued.key_file, health_port=0
    ) as running:
        await eventually(lambda: health_status(f"127.0.0.1:{running.health_port}"), SERVING)
        result = await probe(
            GRPC_PORT=str(running.port), HEALTH_PORT=str(running.health_port), **tls
        )
        assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr

        # Files caught half-written in a rotation: the server still serves, so does the probe.
        issued.key_file.write_text("half a key")
        result = await probe(
            GRPC_PORT=str(running.port), HEALTH_PORT=str(running.health_port), **tls
        )
        assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result.stderr

        without_health_port = await probe(GRPC_PORT=str(running.port), **tls)
        assert without_health_port.returncode == 1
        assert "set HEALTH_PORT" in without_health_port.stderr


# --- WORKERS > 1 -----------------------------------------------------------------------


async def test_workers_share_one_health_port_picked_for_them(
    migrated_database: Callable[[], Awaitable[str]], ca: CertificateAuthority
) -> None:
    url = await migrated_database()
    issued = ca.server()
    env = subprocess_env(
        DATABASE_URL=url,
        WORKERS="2",
        GRPC_PORT="0",
        HEALTH_PORT="0",
        TLS_CERT_FILE=str(issued.cert_file),
        TLS_KEY_FILE=str(issued.key_file),
        SHUTDOWN_DRAIN_SECONDS="0",
        HEALTH_CHECK_INTERVAL_SECONDS="0.2",
    )
    service = await ServiceProcess.start(env, until="(2 workers)")
    try:
        ports = set(re.findall(r"worker \d: health \(plaintext.*\) on port (\d+)", service.text))
        assert len(ports) == 1, service.text
        (health_port,) = ports
        assert health_port != str(service.port)
        await eventually(lambda: health_status(f"127.0.0.1:{health_port}"), SERVING)
        service.interrupt()
        assert await service.wait(timeout=15) == 0, service.text
    finally:
        await service.kill()


async def test_log_names_the_served_certificate_by_its_fingerprint(
    ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    issued = ca.server()
    caplog.set_level(logging.INFO, logger="service.tls")
    files = CertificateFiles(issued.cert_file, issued.key_file, None)
    add_port(grpc.aio.server(), "127.0.0.1:0", files)
    der = x509.load_pem_x509_certificate(issued.cert_pem).public_bytes(serialization.Encoding.DER)
    assert f"certificate sha256:{hashlib.sha256(der).hexdigest()}" in caplog.text
