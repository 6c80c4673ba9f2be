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
import dataclasses
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import db, outbox
from service.change_messages import BATCH_LIMIT, Batch, ChangeMessages
from service.errors import Overloaded, ResumeTokenExpired, WatchEnded, draining, watcher_too_slow
from service.outbox import Origin, Position, Snapshot
from service.resume_tokens import ResumeTokens

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
    hold_warning_seconds: float


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
        tokens: ResumeTokens,
        listen_dsn: str,
        settings: FeedSettings,
    ) -> None:
        self._sessions = sessions
        self._messages = messages
        self._tokens = tokens
        self._listen_dsn = listen_dsn
        self._settings = settings
        self._subscriptions: set[Subscription] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.head = Position(0, 0)
        self._head_known = asyncio.Event()
        # How long the oldest running transaction has held the feed's horizon
        # (0: none runs); METRICS_PORT exports it.
        self.held_back_seconds = 0.0
        self._holder: _Holder | None = None

    @property
    def watchers(self) -> int:
        return len(self._subscriptions)

    def start(self) -> None:
        """Follow the outbox from now on (from when the database first answers)."""
        self._tasks = [
            asyncio.create_task(self._follow(), name="change-feed"),
            asyncio.create_task(self._listen_forever(), name="change-feed-listen"),
            asyncio.create_task(self._watch_horizon(), name="change-feed-horizon"),
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
    async def subscribe(
        self, after: Position | None, origin: Origin | None = None
    ) -> AsyncIterator[Subscription]:
        """Batches for a watch from `after` (None: from now), for the length of the call.

        `origin`: where `after` was read (its resume token's). Refused with
        OVERLOADED past MAX_WATCHERS, DRAINING once closed, and OUT_OF_RANGE
        (RESUME_TOKEN_EXPIRED) when this database does not have the history up
        to `after`: another database's token, one of a history a failover or
        a restore undid, or one older than retention.
        """
        if self._closed:
            raise draining()
        if len(self._subscriptions) >= self._settings.max_watchers:
            raise Overloaded()
        if after is None:  # the reader's head may be a poll interval old: ask
            after = await db.read(self._sessions, outbox.now)
        else:  # once the feed knows this database and has noted its timeline
            await self._head_known.wait()
            if origin is None or not origin.same_database(self._origin()):
                raise ResumeTokenExpired()  # another database's, or an older release's
            await db.read(self._sessions, outbox.require_resumable, after, origin.timeline)
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

    def _origin(self) -> Origin:
        origin = self._tokens.origin
        assert origin is not None, "set before the head is known"
        return origin

    async def _find_head(self) -> None:
        while True:
            try:
                self._tokens.origin = await db.write(self._sessions, outbox.origin)
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

    async def _watch_horizon(self) -> None:
        """Every poll interval: whether a transaction holds the feed back, and the WAL timeline.

        The feed reads only changes of transactions older than every one still
        running (outbox.py), so one long transaction, anywhere in the cluster,
        holds every later change back until it ends. That is inherent; it is
        made visible here: `held_back_seconds`, and one WARNING naming the
        transaction once it passes CHANGE_FEED_HOLD_WARNING_SECONDS.
        """
        await self._head_known.wait()
        while True:
            try:
                await self._observe(await db.read(self._sessions, outbox.snapshot))
            except Exception as error:  # the database is away: the reader says so
                logger.debug("observing the horizon failed: %r", error)
            await asyncio.sleep(self._settings.poll_seconds)

    async def _observe(self, now: Snapshot) -> None:
        origin = self._origin()
        if now.timeline != origin.timeline:
            await db.write(self._sessions, outbox.note_timeline, now)
            self._tokens.origin = dataclasses.replace(origin, timeline=now.timeline)
            logger.warning(
                "the database now writes WAL timeline %d (was %d: a failover or a restore); "
                "resume tokens of the old one are honoured up to transaction %d",
                now.timeline,
                origin.timeline,
                now.xmin,
            )
        if now.xmin >= now.xmax:  # no transaction runs: nothing holds the feed
            self._holder, self.held_back_seconds = None, 0.0
            return
        clock = time.monotonic()
        if self._holder is None or self._holder.xid != now.xmin:
            self._holder = _Holder(now.xmin, clock)
        self.held_back_seconds = clock - self._holder.since
        limit = self._settings.hold_warning_seconds
        if self.held_back_seconds >= limit and not self._holder.warned:
            self._holder.warned = True
            pid, name = await db.read(self._sessions, outbox.transaction_owner, now.xmin)
            logger.warning(
                "the change feed is held back %.0f s by transaction %d (pid %s, application_name "
                "%r): changes committed since it began wait until it ends",
                self.held_back_seconds,
                now.xmin,
                pid if pid is not None else "unknown",
                name or "",
            )


@dataclass
class _Holder:
    """The transaction holding the feed's horizon, and since when it has been seen to."""

    xid: int
    since: float  # time.monotonic()
    warned: bool = False
