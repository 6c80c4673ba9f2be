"""Alembic, called from the service: the head revision, and upgrading to it."""

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from service.config import PROJECT_ROOT, Settings

# The advisory lock alembic/env.py holds while migrating (any fixed bigint;
# this one spells "patusers").
MIGRATION_LOCK_KEY = 0x7061747573657273


def alembic_ini() -> Path:
    """ALEMBIC_CONFIG (Alembic's own variable) or the checkout's alembic.ini."""
    return Path(os.environ.get("ALEMBIC_CONFIG") or PROJECT_ROOT / "alembic.ini")


def alembic_config(database_url: str | None = None) -> Config:
    config = Config(str(alembic_ini()))
    # The service has configured logging already; env.py must not redo it.
    config.attributes["configure_logger"] = False
    if database_url is not None:
        config.attributes["database_url"] = database_url
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "alembic/versions holds no migration"
    return head


def migration_database_url(settings: Settings) -> tuple[str, str | None]:
    """The variable migrations connect by, and its value.

    MIGRATION_DATABASE_URL if set, else DATABASE_URL. Behind PgBouncer in
    transaction mode DATABASE_URL lends each transaction whichever server
    session is free; migrations (their lock, DDL that must run outside a
    transaction) need PostgreSQL directly.
    """
    if settings.migration_database_url:
        return "MIGRATION_DATABASE_URL", settings.migration_database_url
    return "DATABASE_URL", settings.database_url


def upgrade_to_head(database_url: str) -> None:
    """Migrate to head. Blocking, and alembic/env.py runs an event loop of its own:
    call it where no event loop runs (from async code: asyncio.to_thread)."""
    command.upgrade(alembic_config(database_url), "head")
