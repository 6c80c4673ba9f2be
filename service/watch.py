"""One WatchUsers call: its answers, built from the feed's batches it subscribed to.

A watch first sends a heartbeat (its starting resume token). When it starts
behind the feed (it resumes from an older token) it reads the outbox on its
own until it reaches where its subscription starts, then sends each batch
the feed offers, trimmed to what it has not had yet.
"""

from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from pat.users.v1 import user_service_pb2 as pb
from service import db, outbox
from service.change_feed import Subscription
from service.change_messages import BATCH_LIMIT, Batch, ChangeMessages


class Watch:
    """Iterate it for the call's answers, in feed order, none twice."""

    def __init__(
        self,
        subscription: Subscription,
        sessions: async_sessionmaker[AsyncSession],
        messages: ChangeMessages,
    ) -> None:
        self._subscription = subscription
        self._sessions = sessions
        self._messages = messages
        self.position = subscription.after  # right after the last change sent

    def __aiter__(self) -> AsyncIterator[pb.WatchUsersResponse]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[pb.WatchUsersResponse]:
        yield self._messages.heartbeat(self.position).response
        while self.position < self._subscription.start:  # catching up, on our own
            rows, end = await db.read(self._sessions, outbox.read_after, self.position, BATCH_LIMIT)
            if rows:
                yield self._messages.batch(rows, end).response
            self.position = end
        while True:
            unseen = self._unseen(await self._subscription.next())
            if unseen is not None:
                yield unseen

    def _unseen(self, batch: Batch) -> pb.WatchUsersResponse | None:
        """What of `batch` this watch has not had yet (None: nothing); moves its position."""
        position = self.position
        if not batch.changes:  # a heartbeat: the shared one, unless the watch is ahead
            if batch.end < position:
                return self._messages.heartbeat(position).response
            self.position = batch.end
            return batch.response
        if batch.end <= position:
            return None
        self.position = batch.end
        if batch.changes[0][0] > position:
            return batch.response
        return self._messages.changes([c for at, c in batch.changes if at > position], batch.end)
