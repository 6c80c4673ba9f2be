"""WatchUsers' fan-out: one reader of the outbox per process, broadcasting to every watch.

The reader follows the outbox (outbox.py) from its `head`: woken by the
trigger's NOTIFY (on a connection of its own, outside the pool), or by a
timer when a notification is lost (nobody listened, PgBouncer in between).
Each batch it reads becomes one answer (change_messages.py), offered to
every subscription. The feed never looks at what a watch does with it:
watch.py builds each call's answers from its subscription.

Memory stays bounded whatever the watchers do: each subscription holds at
most WATCH_BUFFER_BATCHES batches not yet taken; one that falls further
behind (its caller does not read) is ended with UNAVAILABLE
(WATCHER_TOO_SLOW) and dropped, and its caller resumes from its last token.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import db, outbox
from service.change_messages import BATCH_LIMIT, Batch, ChangeMessages
from service.errors import Overloaded, ResumeTokenExpired, WatchEnded, draining, watcher_too_slow
from service.outbox import Position

logger = logging.getLogger(__name__)

CHANNEL = "user_changes"  # what the trigger of migration 0002 notifies
# Under a write load every commit notifies; reads are spaced at least this
# far apart, so the reader costs at most a few queries per interval.
MIN_READ_INTERVAL_SECONDS = 0.01
LISTEN_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class FeedSettings:
    poll_seconds: float
    heartbeat_seconds: float
    buffer_batches: int
    max_watchers: int


class Subscription:
    """What the feed hands one watch: batches in order, or the reason it ended."""

    def __init__(self, after: Position, start: Position, limit: int) -> None:
        self.after = after  # where the watch begins: its resume token, or now
        self.start = start  # the feed's head when it joined: batches follow on from here
        self._limit = limit
        self._batches: deque[Batch] = deque()
        self._ready = asyncio.Event()
        self._ended: WatchEnded | None = None

    def offer(self, batch: Batch) -> bool:
        """Queue `batch`; False once this subscription has ended (now, if it is too far behind)."""
        if self._ended is not None:
            return False
        if len(self._batches) >= self._limit:
            self.end(watcher_too_slow())
            return False
        self._batches.append(batch)
        self._ready.set()
        return True

    def end(self, reason: WatchEnded) -> None:
        if self._ended is None:
            self._ended = reason
        self._batches.clear()
        self._ready.set()

    async def next(self) -> Batch:
        """The next batch; raises why the subscription ended, once it has."""
        while not self._batches:
            if self._ended is not None:
                raise self._ended
            self._ready.clear()
            await self._ready.wait()
        return self._batches.popleft()


class ChangeFeed:
    """Reads the outbox and broadcasts what it reads to every subscription."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        messages: ChangeMessages,
        listen_dsn: str,
        settings: FeedSettings,
    ) -> None:
        self._sessions = sessions
        self._messages = messages
        self._listen_dsn = listen_dsn
        self._settings = settings
        self._subscriptions: set[Subscription] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.head = Position(0, 0)
        self._head_known = asyncio.Event()

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)

    def start(self) -> None:
        """Follow the outbox from now on (from when the database first answers)."""
        self._tasks = [
            asyncio.create_task(self._follow(), name="change-feed"),
            asyncio.create_task(self._listen_forever(), name="change-feed-listen"),
        ]

    async def close(self) -> None:
        """End every subscription (DRAINING) and refuse new ones; stop reading."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.end(draining())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.asynccontextmanager
    async def subscribe(self, after: Position | None) -> AsyncIterator[Subscription]:
        """Batches for a watch from `after` (None: from now), for the length of the call.

        Refused with OVERLOADED past MAX_WATCHERS, DRAINING once closed, and
        OUT_OF_RANGE when retention has deleted changes after `after`.
        """
        if self._closed:
            raise draining()
        if len(self._subscriptions) >= self._settings.max_watchers:
            raise Overloaded()
        if after is None:  # the reader's head may be a poll interval old: ask
            after = await db.read(self._sessions, outbox.now)
        else:
            await db.read(self._sessions, outbox.require_retained, after)
        await self._head_known.wait()  # only until the database first answered
        subscription = Subscription(after, self.head, self._settings.buffer_batches)
        self._subscriptions.add(subscription)
        try:
            yield subscription
        finally:
            self._subscriptions.discard(subscription)

    def _broadcast(self, batch: Batch) -> None:
        for subscription in list(self._subscriptions):
            if not subscription.offer(batch):
                self._subscriptions.discard(subscription)  # ended: its slot is free now

    async def _follow(self) -> None:
        """Read whatever committed, whenever woken or the timer fires; heartbeat when quiet."""
        await self._find_head()
        loop = asyncio.get_running_loop()
        last_sent = loop.time()
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow
            # the cancellation close() sends, and close() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if await self._read_all():
                    last_sent = loop.time()
            except ResumeTokenExpired:
                self.head = await db.read(self._sessions, outbox.now)
            except Exception as error:  # the database is away: the timer retries
                logger.warning("reading changes failed: %s: %s", type(error).__name__, error)
            if loop.time() - last_sent >= self._settings.heartbeat_seconds:
                self._broadcast(self._messages.heartbeat(self.head))
                last_sent = loop.time()
            await asyncio.sleep(MIN_READ_INTERVAL_SECONDS)

    async def _find_head(self) -> None:
        while True:
            try:
                self.head = await db.read(self._sessions, outbox.now)
                self._head_known.set()
                return
            except Exception as error:  # the database is away: retry
                logger.warning("reading changes failed: %s: %s", type(error).__name__, error)
                await asyncio.sleep(self._settings.poll_seconds)

    async def _read_all(self) -> bool:
        """Read from the head until caught up; True if any change was sent.

        With nobody watching, the head moves straight to now: changes nobody
        would receive are not read. A watch that joins during that query
        starts at the old head, so then they are read after all.
        """
        if not self._subscriptions:
            now = await db.read(self._sessions, outbox.now)
            if not self._subscriptions:
                self.head = max(self.head, now)
                return False
        sent = False
        while True:
            rows, end = await db.read(self._sessions, outbox.read_after, self.head, BATCH_LIMIT)
            if rows and self._subscriptions:
                self._broadcast(self._messages.batch(rows, end))
                sent = True
            self.head = end
            if len(rows) < BATCH_LIMIT:
                return sent

    async def _listen_forever(self) -> None:
        """LISTEN on a direct connection of its own; reconnect when it is lost."""
        warned = False
        while True:
            try:
                connection = await asyncpg.connect(self._listen_dsn)
            except (OSError, asyncpg.PostgresError) as error:
                if not warned:
                    logger.warning("LISTEN %s failed (%s); polling meanwhile", CHANNEL, error)
                    warned = True
                await asyncio.sleep(LISTEN_RETRY_SECONDS)
                continue
            warned = False
            await self._listen_until_lost(connection)

    async def _listen_until_lost(self, connection: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _: lost.set())
        try:
            await connection.add_listener(CHANNEL, self._notified)
            self._wake.set()  # whatever committed while nobody listened
            await lost.wait()
        finally:
            await connection.close(timeout=1)

    def _notified(self, *_: object) -> None:
        if self._subscriptions:
            self._wake.set()
