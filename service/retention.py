"""Changes retention: the outbox keeps CHANGE_RETENTION of changes, deleted in batches.

Every CHANGE_RETENTION_INTERVAL_SECONDS each server process tries; one at a
time deletes (outbox.expire takes an advisory lock), and a resume token from
before what was deleted is then refused with OUT_OF_RANGE, never served
with a gap.
"""

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import db, outbox

logger = logging.getLogger(__name__)

# Changes deleted per transaction.
BATCH = 5000


async def expire_forever(
    sessions: async_sessionmaker[AsyncSession], retention: timedelta, interval_seconds: float
) -> None:
    """Delete changes older than `retention`, in batches, every `interval_seconds`."""
    while True:
        try:
            cutoff = datetime.now(UTC) - retention
            while await db.write(sessions, outbox.expire, cutoff, BATCH) >= BATCH:
                pass
        except Exception as error:
            logger.warning("deleting old changes failed: %s: %s", type(error).__name__, error)
        await asyncio.sleep(interval_seconds)
