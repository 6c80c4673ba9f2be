"""`make lint`'s drift check: generated/ must be exactly what protos/ produce."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support import PROJECT_ROOT, subprocess_env

VENV = Path(sys.executable).parent.parent


def check_generated(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        # --old-file: never reinstall the shared virtualenv from this copy, even
        # when pyproject.toml is newer than its stamp (that would repoint the
        # editable install here).
        [
            "make",
            "--no-print-directory",
            f"--old-file={VENV}/.installed",
            "check-generated",
            f"VENV={VENV}",
        ],
        cwd=root,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def copy_project(destination: Path) -> Path:
    # copy2 keeps modification times, so make sees the virtualenv as up to date.
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy2(PROJECT_ROOT / name, destination / name)
    for folder in ("protos", "generated"):
        shutil.copytree(PROJECT_ROOT / folder, destination / folder, copy_function=shutil.copy2)
    return destination


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    result = check_generated(copy_project(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_proto_change_without_make_proto_fails_lint(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    proto = root / "protos/pat/users/v1/user.proto"
    proto.write_text(
        proto.read_text().replace("string etag = 7;", "string etag = 7;\n  string nickname = 8;")
    )
    result = check_generated(root)
    assert result.returncode != 0
    assert "generated/ is stale: run 'make proto'" in result.stderr
