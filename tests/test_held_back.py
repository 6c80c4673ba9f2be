"""A long transaction holds the change feed back: visibly, and without delivering out of order.

The feed reads only changes of transactions older than every one still
running (service/outbox.py), so an open transaction anywhere in the cluster
holds back every change committed after it began. The service shows how long
(`held_back_seconds`, exported as pat_users_change_feed_held_back_seconds)
and logs the transaction's pid and application_name once it passes
CHANGE_FEED_HOLD_WARNING_SECONDS.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from tests.support import asyncpg_dsn, create_user, eventually, serving, user_service
from tests.test_metrics import scrape, value
from tests.test_watch import watching

HOLD_WARNING_SECONDS = 1.0


async def test_a_long_transaction_holds_the_feed_back_visibly_and_nothing_comes_out_of_order(
    migrated_database: Callable[[], Awaitable[str]], caplog: pytest.LogCaptureFixture
) -> None:
    url = await migrated_database()
    caplog.set_level(logging.WARNING, logger="service.change_feed")
    settings = {
        "change_feed_hold_warning_seconds": HOLD_WARNING_SECONDS,
        "change_poll_seconds": 0.1,
        "metrics_port": 0,
    }
    holder = await asyncpg.connect(
        asyncpg_dsn(url), server_settings={"application_name": "held-by-test"}
    )
    try:
        async with (
            serving(url, **settings) as running,
            user_service(running) as stub,
            watching(stub) as watcher,
        ):
            feed = running.feed
            await holder.execute("BEGIN")
            await holder.execute("INSERT INTO users (email) VALUES ('held@example.com')")
            later = await create_user(stub)  # committed after the holder began

            # Past the warning: the feed has polled many times meanwhile.
            await eventually(lambda: asyncio.sleep(0, feed.held_back_seconds > 1.5), True, 15)
            warnings = [r.getMessage() for r in caplog.records if "held back" in r.getMessage()]
            assert len(warnings) == 1, warnings
            assert f"pid {holder.get_server_pid()}" in warnings[0]
            assert "'held-by-test'" in warnings[0]
            assert watcher.changes == [], "a change committed after the holder began came early"
            assert running.metrics is not None
            scraped = await asyncio.to_thread(scrape, running.metrics.port)
            assert (value(scraped, "pat_users_change_feed_held_back_seconds") or 0) > 1.5

            await holder.execute("COMMIT")
            changes = await watcher.changes_at_least(2)
            # Feed order: the older transaction's change first, though it committed last.
            assert [c.user.email for c in changes] == ["held@example.com", later.email]
            await eventually(lambda: asyncio.sleep(0, feed.held_back_seconds), 0.0)
    finally:
        await holder.close()
