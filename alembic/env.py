"""Alembic's async environment: migrates over asyncpg, the app's own driver.

The database comes from `config.attributes["database_url"]` when the service
or a test calls Alembic, else from MIGRATION_DATABASE_URL, else DATABASE_URL
(postgresql:// or postgresql+asyncpg://, normalised by service.db exactly as
the app does). No psycopg is needed.
"""

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from service.config import Settings
from service.db import EXPECTED_FORM, normalize_url
from service.migrations import MIGRATION_LOCK_KEY, migration_database_url
from service.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def _database_url() -> str:
    if explicit := config.attributes.get("database_url"):
        return normalize_url(explicit).render_as_string(hide_password=False)
    variable, raw = migration_database_url(Settings())
    if not raw:
        raise SystemExit(
            f"DATABASE_URL is not set (nor MIGRATION_DATABASE_URL); expected {EXPECTED_FORM}"
        )
    return normalize_url(raw, variable).render_as_string(hide_password=False)


def run_migrations_offline() -> None:
    """`alembic upgrade head --sql`: print the SQL instead of running it."""
    context.configure(url=_database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        # Replicas often start together and all run `alembic upgrade head`. The
        # first to take this lock migrates; the others wait for its commit, then
        # find the schema at head (alembic reads it only after this) and do nothing.
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = create_async_engine(_database_url(), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_migrate)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
