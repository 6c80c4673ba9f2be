"""The deployment files: docker-compose.yml, the Dockerfile and deploy/k8s/.

Most tests read the files and check what a container runtime or Kubernetes
would do with them; one runs the api container's command line for real,
against a fresh database, and stops it the way `docker stop` does.
"""

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from service.config import Settings
from tests.support import (
    PROJECT_ROOT,
    TEST_PAGE_TOKEN_SECRET,
    WORKER_RSS_CEILING_MB,
    subprocess_env,
)
from tests.support.environment import missing

COMPOSE_FILE = PROJECT_ROOT / "docker-compose.yml"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
DOCKERIGNORE = PROJECT_ROOT / ".dockerignore"
K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"

GRPC_PORT = 50051
COMPOSE_DATABASE_URL = "postgresql+asyncpg://pat_user:pat_password@db:5432/pat_db"
PROBE = ["python", "-m", "service.probe"]


# --- docker-compose.yml ---------------------------------------------------------------


def compose() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return config


def api_script() -> str:
    """The shell script the api service runs: the argument of its `sh -c`."""
    command = compose()["services"]["api"]["command"]
    argv = shlex.split(command) if isinstance(command, str) else command
    assert argv[:2] == ["sh", "-c"], f"api command is not `sh -c ...`: {argv}"
    assert len(argv) == 3, f"api command should be one `sh -c` script: {argv}"
    return str(argv[2])


def test_compose_declares_db_and_api_and_the_named_volume() -> None:
    config = compose()
    assert set(config["services"]) == {"db", "api"}
    db = config["services"]["db"]
    assert re.fullmatch(r"postgres:1[56](\.\d+)?(-\w+)?", db["image"]), db["image"]
    assert db["environment"] == {
        "POSTGRES_USER": "pat_user",
        "POSTGRES_PASSWORD": "pat_password",
        "POSTGRES_DB": "pat_db",
    }
    volume, _, target = next(
        v for v in db["volumes"] if v.endswith(":/var/lib/postgresql/data")
    ).partition(":")
    assert target == "/var/lib/postgresql/data"
    assert volume in (config.get("volumes") or {}), f"volume {volume!r} is not declared"


def test_compose_db_healthcheck_uses_pg_isready() -> None:
    test = compose()["services"]["db"]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert "pg_isready -U pat_user -d pat_db" in " ".join(test[1:])


def test_compose_api_connects_migrates_and_waits_for_a_healthy_db() -> None:
    api = compose()["services"]["api"]
    assert api["build"] in (".", {"context": "."})
    environment = api["environment"]
    assert environment["DATABASE_URL"] == COMPOSE_DATABASE_URL
    assert str(environment["GRPC_PORT"]) == str(GRPC_PORT)
    assert environment["LOG_FORMAT"] == "json"
    # Required, with no default: `${VAR:?message}` stops compose when it is unset or empty.
    assert environment["PAGE_TOKEN_SECRET"].startswith("${PAGE_TOKEN_SECRET:?")
    # `exec`: the server becomes the container's PID 1 and receives SIGTERM itself.
    assert api_script() == "alembic upgrade head && exec python -m service"
    assert api["depends_on"] == {"db": {"condition": "service_healthy"}}
    assert api["ports"] == [f"127.0.0.1:{GRPC_PORT}:{GRPC_PORT}"]


def test_compose_publishes_ports_on_the_loopback_interface_only() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_compose_file_holds_no_default_secret() -> None:
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"\$\{PAGE_TOKEN_SECRET:?-", text), "PAGE_TOKEN_SECRET has a default"
    assert "change-me" not in text.lower()


def test_the_service_refuses_a_placeholder_page_token_secret() -> None:
    # What earlier compose files and the Kubernetes example carried.
    for placeholder in ("change-me-in-production", "CHANGE-ME", ""):
        with pytest.raises(ValidationError, match="page_token_secret"):
            Settings(page_token_secret=placeholder)  # type: ignore[arg-type]
    assert Settings(page_token_secret=TEST_PAGE_TOKEN_SECRET)  # type: ignore[arg-type]


def test_compose_api_healthcheck_is_the_grpc_probe() -> None:
    services = compose()["services"]
    assert services["api"]["healthcheck"]["test"] == ["CMD", *PROBE]
    for name, service in services.items():
        check = " ".join(service["healthcheck"]["test"])
        assert not re.search(r"http|curl|wget", check), f"{name}: {check}"
    assert "/health" not in COMPOSE_FILE.read_text()


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1, Debian's package), if either runs."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def compose_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config` with only `env` for variables (no .env file, no outer secret)."""
    command = compose_command()
    if command is None:
        missing("neither docker compose nor docker-compose is installed (.ci/run installs it)")
    no_env_file = tmp_path / "empty.env"
    no_env_file.write_text("")
    outer = {k: v for k, v in subprocess_env().items() if k != "PAGE_TOKEN_SECRET"}
    return subprocess.run(
        [*command, "--env-file", str(no_env_file), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        check=False,
        env={**outer, **env},
    )


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    result = compose_config(tmp_path, PAGE_TOKEN_SECRET=TEST_PAGE_TOKEN_SECRET)
    assert result.returncode == 0, result.stderr
    api = yaml.safe_load(result.stdout)["services"]["api"]
    assert api["environment"]["PAGE_TOKEN_SECRET"] == TEST_PAGE_TOKEN_SECRET
    # v1 renders "127.0.0.1:50051:50051/tcp", v2 the long syntax.
    (port,) = api["ports"]
    host_ip = port["host_ip"] if isinstance(port, dict) else str(port).split(":")[0]
    assert host_ip == "127.0.0.1", port


def test_docker_compose_refuses_to_start_without_a_page_token_secret(tmp_path: Path) -> None:
    for unset in ({}, {"PAGE_TOKEN_SECRET": ""}):
        result = compose_config(tmp_path, **unset)
        assert result.returncode != 0, result.stdout
        assert "set PAGE_TOKEN_SECRET" in result.stderr, result.stderr


# --- the api container's command, run for real ---------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def probe(port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.probe", "--addr", f"127.0.0.1:{port}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def test_probe_fails_when_nothing_serves() -> None:
    result = probe(free_port())
    assert result.returncode == 1
    assert "health check failed: UNAVAILABLE" in result.stderr


def test_api_command_migrates_serves_and_stops_on_sigterm(
    new_database: Callable[[], str], tmp_path: Path
) -> None:
    port = free_port()
    env = subprocess_env(
        DATABASE_URL=new_database(),  # empty: the command must migrate it
        GRPC_PORT=str(port),
        SHUTDOWN_DRAIN_SECONDS="0",
        LOG_FORMAT=str(compose()["services"]["api"]["environment"]["LOG_FORMAT"]),
        PAGE_TOKEN_SECRET=TEST_PAGE_TOKEN_SECRET,
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    log_path = tmp_path / "api.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["sh", "-c", api_script()],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as one below
        )

    def output() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    try:
        deadline = time.monotonic() + 30
        result = probe(port)
        while result.returncode != 0:
            assert process.poll() is None, f"the api exited early:\n{output()}"
            assert time.monotonic() < deadline, (
                f"never SERVING: {result.stdout}{result.stderr}\n{output()}"
            )
            time.sleep(0.3)
            result = probe(port)
        assert result.stdout.strip() == "SERVING"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, f"SIGTERM did not stop it cleanly:\n{output()}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


# --- Dockerfile ----------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not (line or pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def arguments_of(keyword: str) -> list[str]:
    return [arguments for instruction, arguments in dockerfile() if instruction == keyword]


def dockerfile_uid() -> str:
    return arguments_of("USER")[-1].partition(":")[0]


def test_dockerfile_uses_a_slim_python_base() -> None:
    runtime_base = arguments_of("FROM")[-1].split()[0]
    assert re.fullmatch(r"python:3\.1[12]-slim", runtime_base), runtime_base


def test_dockerfile_runs_as_a_non_root_user() -> None:
    keywords = [instruction for instruction, _ in dockerfile()]
    assert "USER" in keywords
    assert dockerfile_uid() not in ("root", "0")
    # Kubernetes' runAsNonRoot can only verify a numeric user.
    assert dockerfile_uid().isdigit()
    assert keywords.index("CMD") > max(i for i, k in enumerate(keywords) if k == "USER")


def test_dockerfile_installs_runtime_dependencies_only() -> None:
    installs = [run for run in arguments_of("RUN") if "pip install" in run]
    assert installs, "no pip install in the Dockerfile"
    for run in installs:
        assert "--constraint constraints.txt" in run or "-c constraints.txt" in run
        assert "[dev]" not in run
        assert "[embedded]" not in run
        assert "--editable" not in run
        assert " -e " not in run


def test_dockerfile_copies_what_the_runtime_needs() -> None:
    copied = " ".join(arguments_of("COPY"))
    for needed in ("service/", "generated/", "alembic/", "alembic.ini", "constraints.txt"):
        assert needed in copied, f"{needed} is not copied"
    for not_needed in ("tests", "bench", "toolkit", ".venv"):
        assert not_needed not in copied
    ignored = DOCKERIGNORE.read_text().split()
    for excluded in (".venv/", ".data/", ".git/", "tests/", "bench/", "toolkit/"):
        assert excluded in ignored, f".dockerignore does not exclude {excluded}"


def test_dockerfile_exposes_grpc_and_checks_health_through_it() -> None:
    assert str(GRPC_PORT) in " ".join(arguments_of("EXPOSE")).split()
    (healthcheck,) = arguments_of("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + len("CMD") :])
    assert command == PROBE
    assert json.loads(arguments_of("CMD")[-1]) == ["python", "-m", "service"]
    assert "/health" not in DOCKERFILE.read_text()


# --- deploy/k8s ----------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted([*K8S_DIR.glob("*.yaml"), *K8S_DIR.glob("*.yml")]):
        documents.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return documents


def one(kind: str) -> dict[str, Any]:
    found = [m for m in manifests() if m.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} under deploy/k8s, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment")["spec"]["template"]["spec"]
    return spec


def container() -> dict[str, Any]:
    main: dict[str, Any]
    (main,) = pod_spec()["containers"]
    return main


def env_of(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in spec.get("env", [])}


def grpc_container_port() -> dict[str, Any]:
    port: dict[str, Any]
    (port,) = [p for p in container()["ports"] if p["containerPort"] == GRPC_PORT]
    return port


def probed_port() -> int:
    """Where the kubelet's probes must go: the plaintext HEALTH_PORT once GRPC_PORT is TLS."""
    env = env_of(container())
    if "TLS_CERT_FILE" not in env:
        return GRPC_PORT
    assert "HEALTH_PORT" in env, "with TLS on, the kubelet's plaintext probes need HEALTH_PORT"
    return int(env["HEALTH_PORT"]["value"])


@pytest.mark.parametrize("probe_name", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_deployment_probes_are_native_grpc(probe_name: str) -> None:
    probe = container()[probe_name]
    assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
    assert probe["grpc"]["port"] == probed_port()
    assert probed_port() in [port["containerPort"] for port in container()["ports"]]
    expected = "" if probe_name == "readinessProbe" else "liveness"
    assert probe["grpc"].get("service", "") == expected


def test_deployment_serves_tls_from_a_mounted_tls_secret_that_can_rotate() -> None:
    env = env_of(container())
    files = [Path(env[name]["value"]) for name in ("TLS_CERT_FILE", "TLS_KEY_FILE")]
    assert [file.name for file in files] == ["tls.crt", "tls.key"]  # kubernetes.io/tls keys
    (mount,) = [m for m in container()["volumeMounts"] if Path(m["mountPath"]) == files[0].parent]
    assert files[1].parent == Path(mount["mountPath"])
    assert mount.get("readOnly") is True
    # A subPath mount is never updated by the kubelet: rotation would need a restart.
    assert not {"subPath", "subPathExpr"} & set(mount)
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"]
    assert "items" not in volume["secret"]  # the Secret's own key names are the file names


def test_deployment_termination_grace_outlasts_the_graceful_stop() -> None:
    env = env_of(container())
    drain = float(env["SHUTDOWN_DRAIN_SECONDS"]["value"])
    grace = float(env["SHUTDOWN_GRACE_SECONDS"]["value"])
    assert pod_spec()["terminationGracePeriodSeconds"] > drain + grace


def test_deployment_sets_resources() -> None:
    for spec in [container(), *pod_spec().get("initContainers", [])]:
        resources = spec["resources"]
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources[bound]), f"{spec['name']}: {bound}"


def test_memory_limit_leaves_room_above_what_floods_hold_a_worker_to() -> None:
    limit = container()["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    mebibytes = int(limit.removesuffix("Mi"))
    # MB in the ceiling, MiB in the manifest: 400 MB is about 381 MiB.
    assert mebibytes * 1.048576 >= WORKER_RSS_CEILING_MB * 1.25, limit


def test_deployment_runs_as_the_images_non_root_user() -> None:
    pod = pod_spec()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert str(pod["runAsUser"]) == dockerfile_uid()
    for spec in [container(), *pod_spec().get("initContainers", [])]:
        context = spec["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, spec["name"]
        assert context["readOnlyRootFilesystem"] is True, spec["name"]
        assert context["capabilities"]["drop"] == ["ALL"], spec["name"]


def test_deployment_reads_secrets_from_a_secret() -> None:
    env = env_of(container())
    for name in ("DATABASE_URL", "PAGE_TOKEN_SECRET"):
        assert "value" not in env[name], f"{name} is written in the manifest"
        assert env[name]["valueFrom"]["secretKeyRef"]["key"], name
    assert str(env["GRPC_PORT"]["value"]) == str(GRPC_PORT)


def test_deployment_migrates_in_an_init_container() -> None:
    (migrate,) = pod_spec()["initContainers"]
    assert migrate["image"] == container()["image"]
    assert " ".join(migrate.get("command", []) + migrate.get("args", [])).endswith(
        "alembic upgrade head"
    )
    assert env_of(migrate)["DATABASE_URL"] == env_of(container())["DATABASE_URL"]


def test_service_exposes_the_grpc_port() -> None:
    service = one("Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == GRPC_PORT
    assert port["name"] == "grpc"
    assert port["appProtocol"] == "grpc"
    container_port = grpc_container_port()
    assert port.get("targetPort", port["port"]) in (
        container_port["containerPort"],
        container_port.get("name"),
    )
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_k8s_manifests_have_no_http_health_check() -> None:
    for path in (p for p in K8S_DIR.rglob("*") if p.is_file()):
        text = path.read_text()
        assert "httpGet" not in text, path.name
        assert "/health" not in text, path.name


def test_kustomization_applies_the_manifests_but_not_the_example_secret() -> None:
    resources = one("Kustomization")["resources"]
    assert {"deployment.yaml", "service.yaml"} <= set(resources)
    assert all((K8S_DIR / name).is_file() for name in resources)
    assert not any("example" in name for name in resources)


OVERLAY_DIR = K8S_DIR / "overlays" / "read-replicas"


def test_the_read_replicas_overlay_adds_the_standbys_to_the_base_container() -> None:
    (kustomization,) = yaml.safe_load_all((OVERLAY_DIR / "kustomization.yaml").read_text())
    assert (OVERLAY_DIR / kustomization["resources"][0]).resolve() == K8S_DIR.resolve()
    ((patch_file,),) = [[p["path"]] for p in kustomization["patches"]]
    (patch,) = yaml.safe_load_all((OVERLAY_DIR / patch_file).read_text())
    # A strategic merge patch: the base's Deployment and container, by name.
    assert (patch["kind"], patch["metadata"]["name"]) == (
        "Deployment",
        one("Deployment")["metadata"]["name"],
    )
    (patched,) = patch["spec"]["template"]["spec"]["containers"]
    assert patched["name"] == container()["name"]
    env = {e["name"]: e for e in patched["env"]}
    assert env["DATABASE_REPLICA_URLS"]["valueFrom"]["secretKeyRef"] == {
        "name": "pat-users",
        "key": "DATABASE_REPLICA_URLS",
    }
    assert {name.lower() for name in env} <= set(Settings.model_fields)
    example = one("Secret")
    assert "DATABASE_REPLICA_URLS" in example["stringData"]
