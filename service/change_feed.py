"""WatchUsers' fan-out: one reader per process feeds every open watch.

The reader follows the outbox (changes.py) from its `head`: woken by the
trigger's NOTIFY (on a connection of its own, outside the pool), or by a
timer when a notification is lost (nobody listened, PgBouncer in between).
Each batch it reads becomes one response, shared by every watch that is
caught up. A watch that resumes from an older token reads the database on
its own until it reaches the reader, then joins it.

Memory stays bounded whatever the watchers do: each watch holds at most
WATCH_BUFFER_BATCHES responses it has not written yet; one that falls
further behind (its caller does not read) is ended with UNAVAILABLE
(WATCHER_TOO_SLOW), and resumes from its last token.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pat.users.v1 import user_service_pb2 as pb
from service import changes, db
from service.changes import ChangeRow, Position
from service.convert import to_proto
from service.errors import Overloaded, ResumeTokenExpired, WatchEnded, draining, watcher_too_slow
from service.resume_tokens import ResumeTokens

logger = logging.getLogger(__name__)

CHANNEL = "user_changes"  # what the trigger of migration 0002 notifies
# Changes per read, and so at most per response (about 150 bytes each).
BATCH_LIMIT = 500
# Under a write load every commit notifies; reads are spaced at least this
# far apart, so the reader costs at most a few queries per interval.
MIN_READ_INTERVAL_SECONDS = 0.01
# Retention deletes this many changes per transaction.
RETENTION_BATCH = 5000
LISTEN_RETRY_SECONDS = 1.0

T = TypeVar("T")


@dataclass(frozen=True)
class FeedSettings:
    poll_seconds: float
    heartbeat_seconds: float
    buffer_batches: int
    max_watchers: int
    retention: timedelta
    retention_interval_seconds: float


@dataclass(frozen=True)
class Batch:
    """Changes read together (or none: a heartbeat), as one shared response."""

    changes: list[tuple[Position, pb.UserChange]]
    end: Position
    response: pb.WatchUsersResponse


class Subscription:
    """What the reader hands one watch: batches in order, or the reason it ended."""

    def __init__(self, start: Position, limit: int) -> None:
        self.start = start  # the reader's head when the watch joined
        self._limit = limit
        self._batches: deque[Batch] = deque()
        self._ready = asyncio.Event()
        self.ended: asyncio.Future[WatchEnded] = asyncio.get_running_loop().create_future()

    def offer(self, batch: Batch) -> None:
        if self.ended.done():
            return
        if len(self._batches) >= self._limit:
            self.end(watcher_too_slow())
            return
        self._batches.append(batch)
        self._ready.set()

    def end(self, reason: WatchEnded) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)
        self._batches.clear()
        self._ready.set()

    async def next(self) -> Batch:
        while not self._batches:
            if self.ended.done():
                raise self.ended.result()
            self._ready.clear()
            await self._ready.wait()
        return self._batches.popleft()


@dataclass
class Watch:
    """One open WatchUsers call: iterate its responses, `deliver` each write."""

    feed: "ChangeFeed"
    subscription: Subscription
    position: Position

    def __aiter__(self) -> AsyncIterator[pb.WatchUsersResponse]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[pb.WatchUsersResponse]:
        feed = self.feed
        yield feed.heartbeat(self.position)
        while self.position < self.subscription.start:  # catching up, on our own
            rows, end = await feed.read_after(self.position)
            if rows:
                yield feed.response(rows, end)
            self.position = end
        while True:
            response = feed.after(await self.subscription.next(), self.position)
            if response is not None:
                yield response[0]
                self.position = max(self.position, response[1])

    async def deliver(self, write: Awaitable[T]) -> T:
        """`write`, unless the watch ends first: then raise why it ended.

        A caller that stops reading blocks its writes (HTTP/2 flow control);
        this is what cuts it off once its buffer overflows.
        """
        writing = asyncio.ensure_future(write)
        either: set[asyncio.Future[Any]] = {writing, self.subscription.ended}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if writing in done:
            return writing.result()
        writing.cancel()
        raise self.subscription.ended.result()


class ChangeFeed:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        tokens: ResumeTokens,
        listen_dsn: str,
        settings: FeedSettings,
    ) -> None:
        self._sessions = sessions
        self._tokens = tokens
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
            asyncio.create_task(self._expire_forever(), name="change-retention"),
        ]

    async def close(self) -> None:
        """End every watch (DRAINING) and refuse new ones; stop reading."""
        self._closed = True
        for subscription in self._subscriptions:
            subscription.end(draining())
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @contextlib.asynccontextmanager
    async def watch(self, after: Position | None) -> AsyncIterator[Watch]:
        """A watch from `after` (None: from now), for the length of the call."""
        if self._closed:
            raise draining()
        if len(self._subscriptions) >= self._settings.max_watchers:
            raise Overloaded()
        if after is None:  # the reader's head may be a poll interval old: ask
            after = await db.read(self._sessions, changes.now)
        else:
            await db.read(self._sessions, changes.require_retained, after)
        await self._head_known.wait()  # only until the database first answered
        subscription = Subscription(self.head, self._settings.buffer_batches)
        self._subscriptions.add(subscription)
        try:
            yield Watch(self, subscription, after)
        finally:
            self._subscriptions.discard(subscription)

    def heartbeat(self, position: Position) -> pb.WatchUsersResponse:
        return pb.WatchUsersResponse(
            heartbeat=pb.Heartbeat(), resume_token=self._tokens.issue(position)
        )

    def response(self, rows: list[ChangeRow], end: Position) -> pb.WatchUsersResponse:
        return self._batch(rows, end).response

    def after(
        self, batch: Batch, position: Position
    ) -> tuple[pb.WatchUsersResponse, Position] | None:
        """What of `batch` a watch at `position` has not had yet, and where it ends."""
        if not batch.changes:  # a heartbeat: the shared one, unless the watch is ahead
            if batch.end >= position:
                return batch.response, batch.end
            return self.heartbeat(position), position
        if batch.end <= position:
            return None
        if batch.changes[0][0] > position:
            return batch.response, batch.end
        unseen = [change for at, change in batch.changes if at > position]
        response = pb.WatchUsersResponse(
            changes=pb.ChangeBatch(changes=unseen), resume_token=self._tokens.issue(batch.end)
        )
        return response, batch.end

    async def read_after(self, position: Position) -> tuple[list[ChangeRow], Position]:
        return await db.read(self._sessions, changes.read_after, position, BATCH_LIMIT)

    def _batch(self, rows: list[ChangeRow], end: Position) -> Batch:
        positioned = [
            (
                at := Position(row.xid, row.seq),
                pb.UserChange(
                    kind=row.kind, user=to_proto(row), resume_token=self._tokens.issue(at)
                ),
            )
            for row in rows
        ]
        response = pb.WatchUsersResponse(
            changes=pb.ChangeBatch(changes=[change for _, change in positioned]),
            resume_token=self._tokens.issue(end),
        )
        return Batch(positioned, end, response)

    def _broadcast(self, batch: Batch) -> None:
        for subscription in list(self._subscriptions):
            subscription.offer(batch)

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
                self.head = await db.read(self._sessions, changes.now)
            except Exception as error:  # the database is away: the timer retries
                logger.warning("reading changes failed: %s: %s", type(error).__name__, error)
            if loop.time() - last_sent >= self._settings.heartbeat_seconds:
                self._broadcast(Batch([], self.head, self.heartbeat(self.head)))
                last_sent = loop.time()
            await asyncio.sleep(MIN_READ_INTERVAL_SECONDS)

    async def _find_head(self) -> None:
        while True:
            try:
                self.head = await db.read(self._sessions, changes.now)
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
            now = await db.read(self._sessions, changes.now)
            if not self._subscriptions:
                self.head = max(self.head, now)
                return False
        sent = False
        while True:
            rows, end = await self.read_after(self.head)
            if rows and self._subscriptions:
                self._broadcast(self._batch(rows, end))
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

    async def _expire_forever(self) -> None:
        """Delete changes older than CHANGE_RETENTION, in batches, now and then."""
        while True:
            try:
                cutoff = datetime.now(UTC) - self._settings.retention
                while (
                    await db.write(self._sessions, changes.expire, cutoff, RETENTION_BATCH)
                    >= RETENTION_BATCH
                ):
                    pass
            except Exception as error:
                logger.warning("deleting old changes failed: %s: %s", type(error).__name__, error)
            await asyncio.sleep(self._settings.retention_interval_seconds)
