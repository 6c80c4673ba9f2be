"""Alembic: round trips, no drift from the models, one URL for app and Alembic."""

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from service.db import normalize_url
from service.migrations import MIGRATION_LOCK_KEY, head_revision
from service.models import Base
from tests.support import PROJECT_ROOT, asyncpg_dsn, eventually, run_sql, subprocess_env


async def _schema_differences(url: str) -> list[Any]:
    engine = create_async_engine(normalize_url(url))
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(
                lambda sync: compare_metadata(
                    MigrationContext.configure(
                        sync, opts={"compare_type": True, "compare_server_default": True}
                    ),
                    Base.metadata,
                )
            )
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    rows = await run_sql(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row["tablename"] for row in rows}


def alembic(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    """The `alembic` command line, as docker-compose and operators run it."""
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=PROJECT_ROOT,
        env=subprocess_env(DATABASE_URL=database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_models_and_migrations_do_not_drift(
    migrated_database: Callable[[], Awaitable[str]],
) -> None:
    url = await migrated_database()
    assert await _schema_differences(url) == []


async def test_drift_would_be_detected(migrated_database: Callable[[], Awaitable[str]]) -> None:
    url = await migrated_database()
    await run_sql(url, "DROP INDEX ix_users_create_time_id")
    assert await _schema_differences(url) != []


@pytest.mark.parametrize("scheme", ["postgresql", "postgresql+asyncpg"])
async def test_cli_upgrade_downgrade_upgrade_round_trips(
    new_database: Callable[[], str], scheme: str
) -> None:
    url = normalize_url(new_database()).set(drivername=scheme).render_as_string(hide_password=False)

    upgraded = await asyncio.to_thread(alembic, "upgrade", "head", database_url=url)
    assert upgraded.returncode == 0, upgraded.stderr
    assert await _tables(url) == {
        "users",
        "user_changes",
        "user_changes_horizon",
        "user_changes_timelines",
        "alembic_version",
    }

    downgraded = await asyncio.to_thread(alembic, "downgrade", "base", database_url=url)
    assert downgraded.returncode == 0, downgraded.stderr
    assert await _tables(url) == {"alembic_version"}

    again = await asyncio.to_thread(alembic, "upgrade", "head", database_url=url)
    assert again.returncode == 0, again.stderr
    current = await asyncio.to_thread(alembic, "current", database_url=url)
    assert head_revision() in current.stdout
    assert await _schema_differences(url) == []


async def test_alembic_without_database_url_says_what_to_set() -> None:
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=PROJECT_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "DATABASE_URL is not set" in result.stderr


async def test_alembic_refuses_other_schemes() -> None:
    result = await asyncio.to_thread(
        alembic, "upgrade", "head", database_url="mysql://u:secret@h/db"
    )
    assert result.returncode != 0
    assert "DATABASE_URL has scheme 'mysql'" in result.stderr
    assert "secret" not in result.stderr


async def test_psycopg_is_not_needed() -> None:
    import importlib.util

    assert importlib.util.find_spec("psycopg") is None
    assert importlib.util.find_spec("psycopg2") is None


async def waiting_for_migration_lock(url: str) -> int:
    rows = await run_sql(
        url,
        "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
    )
    return int(rows[0]["n"])


async def test_replicas_migrating_at_once_leave_one_correct_schema(
    new_database: Callable[[], str],
) -> None:
    url = new_database()
    env = subprocess_env(DATABASE_URL=url)

    async def upgrade() -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "alembic", "upgrade", "head"),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        return await process.wait(), output.decode()

    # Hold the migration lock so that all three replicas queue up behind it,
    # then let go: they are released at the same instant and race for real.
    gate = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await gate.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        upgrades = asyncio.gather(upgrade(), upgrade(), upgrade())
        await eventually(lambda: waiting_for_migration_lock(url), 3, within=30)
        await gate.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
        results = await upgrades
    finally:
        await gate.close()

    assert [code for code, _ in results] == [0, 0, 0], [out for _, out in results]
    migrated = [out for _, out in results if "Running upgrade" in out]
    assert len(migrated) == 1  # one process migrated; the others found head
    versions = await run_sql(url, "SELECT version_num FROM alembic_version")
    assert [row["version_num"] for row in versions] == [head_revision()]
    assert await _schema_differences(url) == []
