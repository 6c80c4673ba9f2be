"""The tests' helpers, under one name: `from tests.support import ...`.

Each lives in a module of its own idea (failures, calls, timing, databases,
servers, pgbouncer); what the tests share with bench/ (the service launcher,
the database helpers, PgBouncer) comes from the toolkit and is named here too.
"""

from tests.support.calls import (
    USER_SERVICE_RPCS,
    create_user,
    unique_email,
    update_held_on_a_row_lock,
)
from tests.support.databases import (
    UNREACHABLE_DATABASE_URL,
    hold_row_lock,
    migrated,
    service_queries_waiting_for_locks,
    table_rows,
)
from tests.support.failures import Failure, fails, failure_of
from tests.support.pgbouncer import (
    PGBOUNCER_POOL_SIZE,
    prepared_statements_per_server_connection,
    serving_through,
    set_database_statement_timeout,
    start_test_pgbouncer,
)
from tests.support.servers import (
    TEST_PAGE_TOKEN_SECRET,
    WORKER_RSS_CEILING_MB,
    health_status,
    more_health_checks,
    server_settings,
    serving,
    user_service,
)
from tests.support.timing import eventually, hog_the_loop
from toolkit import PROJECT_ROOT
from toolkit.databases import asyncpg_dsn, create_database, drop_database, run_sql
from toolkit.pgbouncer import PGBOUNCER_MISSING, PgBouncer, pgbouncer_binary
from toolkit.service_process import ServiceProcess, subprocess_env, wait_until_serving

__all__ = [
    "PGBOUNCER_MISSING",
    "PGBOUNCER_POOL_SIZE",
    "PROJECT_ROOT",
    "TEST_PAGE_TOKEN_SECRET",
    "UNREACHABLE_DATABASE_URL",
    "USER_SERVICE_RPCS",
    "WORKER_RSS_CEILING_MB",
    "Failure",
    "PgBouncer",
    "ServiceProcess",
    "asyncpg_dsn",
    "create_database",
    "create_user",
    "drop_database",
    "eventually",
    "fails",
    "failure_of",
    "health_status",
    "hog_the_loop",
    "hold_row_lock",
    "migrated",
    "more_health_checks",
    "pgbouncer_binary",
    "prepared_statements_per_server_connection",
    "run_sql",
    "server_settings",
    "service_queries_waiting_for_locks",
    "serving",
    "serving_through",
    "set_database_statement_timeout",
    "start_test_pgbouncer",
    "subprocess_env",
    "table_rows",
    "unique_email",
    "update_held_on_a_row_lock",
    "user_service",
    "wait_until_serving",
]
