"""The package other services install: the stubs import without path tweaks."""

import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import PROJECT_ROOT, subprocess_env

STUB_MODULES = [
    "pat/users/v1/user_pb2.py",
    "pat/users/v1/user_pb2.pyi",
    "pat/users/v1/user_service_pb2.py",
    "pat/users/v1/user_service_pb2.pyi",
    "pat/users/v1/user_service_pb2_grpc.py",
    "pat/users/v1/user_service_pb2_grpc.pyi",
]


def test_stubs_import_from_anywhere_after_install(tmp_path: Path) -> None:
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from pat.users.v1 import user_service_pb2_grpc as g; print(g.UserServiceStub.__name__)",
        ],
        cwd=tmp_path,  # not the checkout: only the installed package can answer
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "UserServiceStub"


def test_wheel_ships_stubs_and_service_but_no_tests(tmp_path: Path) -> None:
    build = ("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir")
    subprocess.run(
        [sys.executable, "-m", "pip", *build, str(tmp_path), str(PROJECT_ROOT)],
        check=True,
        capture_output=True,
        env=subprocess_env(),
    )
    (wheel,) = tmp_path.glob("pat_users-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(STUB_MODULES) <= names
    assert {"service/__main__.py", "service/py.typed"} <= names
    # Callers' service config, next to the stubs, as protos/ holds it.
    shipped = zipfile.ZipFile(wheel).read("pat/users/v1/service_config.json")
    source = PROJECT_ROOT / "protos" / "pat" / "users" / "v1" / "service_config.json"
    assert shipped == source.read_bytes()
    not_shipped = ("tests/", "bench/", "toolkit/", "generated/")
    assert not any(name.startswith(not_shipped) for name in names)
