"""WatchUsers' answers: outbox rows as a batch of UserChange messages, and heartbeats.

Every message carries a resume token: each change its own, each answer the
position right after what it holds. The change feed builds a batch once
and every caught-up watch sends it as it is; a watch trims what it has
already had (watch.py).
"""

from dataclasses import dataclass

from pat.users.v1 import user_service_pb2 as pb
from service.convert import to_proto
from service.outbox import ChangeRow, Position
from service.resume_tokens import ResumeTokens

# Changes per read of the outbox, and so at most per answer (about 150 bytes each).
BATCH_LIMIT = 500


@dataclass(frozen=True)
class Batch:
    """Changes read together (or none: a heartbeat), and the one answer that carries them all."""

    changes: list[tuple[Position, pb.UserChange]]
    end: Position
    response: pb.WatchUsersResponse


class ChangeMessages:
    """Builds WatchUsers' answers, signing their resume tokens."""

    def __init__(self, tokens: ResumeTokens) -> None:
        self._tokens = tokens

    def batch(self, rows: list[ChangeRow], end: Position) -> Batch:
        """`rows` as one answer that ends at `end`."""
        positioned = [
            (
                at := Position(row.xid, row.seq),
                pb.UserChange(
                    kind=row.kind,
                    user=to_proto(row),
                    resume_token=self._tokens.issue(at),
                    actor=row.actor,
                ),
            )
            for row in rows
        ]
        return Batch(positioned, end, self.changes([change for _, change in positioned], end))

    def changes(self, changes: list[pb.UserChange], end: Position) -> pb.WatchUsersResponse:
        return pb.WatchUsersResponse(
            changes=pb.ChangeBatch(changes=changes), resume_token=self._tokens.issue(end)
        )

    def heartbeat(self, position: Position) -> Batch:
        """No change, a fresh resume token: quiet watches learn they are still caught up."""
        response = pb.WatchUsersResponse(
            heartbeat=pb.Heartbeat(), resume_token=self._tokens.issue(position)
        )
        return Batch([], position, response)
