"""WatchUsers resume tokens: a feed position and where it came from, opaque to callers and signed.

A token names its position (xid, seq) and its origin: the cluster's system
identifier, the database's OID and the WAL timeline it was issued on
(outbox.Origin). A token of another database, or of a history this one does
not have, is refused as expired (outbox.require_resumable), never resumed
from a position that means nothing here.

Signed with the page tokens' secret (PAGE_TOKEN_SECRET) under a salt of its
own, so neither kind of token passes for the other.
"""

from itsdangerous import BadData, URLSafeSerializer

from service.outbox import Origin, Position

_SALT = "pat.users.v1.UserService.WatchUsers"
# Issued tokens are under 120 characters. A longer one is refused before HMAC.
MAX_RESUME_TOKEN_LENGTH = 256


class InvalidResumeToken(ValueError):
    """The token was not issued by this service."""


class ResumeTokens:
    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeSerializer(secret, salt=_SALT)
        # Where positions come from now: set by the change feed once the
        # database first answers (before any token is issued), and again when
        # its timeline changes.
        self.origin: Origin | None = None

    def issue(self, position: Position) -> str:
        origin = self.origin
        assert origin is not None, "the change feed sets the origin before any token is issued"
        return self._serializer.dumps(
            [
                origin.system_identifier,
                origin.database_oid,
                origin.timeline,
                position.xid,
                position.seq,
            ]
        )

    def read(self, token: str) -> tuple[Origin | None, Position]:
        """The origin and position `token` names; origin None for a token of an older
        release, which named no database (it is honoured nowhere: expired)."""
        if len(token) > MAX_RESUME_TOKEN_LENGTH:
            raise InvalidResumeToken(f"must be at most {MAX_RESUME_TOKEN_LENGTH} characters")
        try:
            fields = self._serializer.loads(token)
        except BadData:
            raise InvalidResumeToken("is not a resume token issued by this service") from None
        if not (
            isinstance(fields, list)
            and len(fields) in (2, 5)
            and all(type(field) is int and field >= 0 for field in fields)
        ):
            raise InvalidResumeToken("is not a resume token issued by this service")
        if len(fields) == 2:
            return None, Position(fields[0], fields[1])
        system_identifier, database_oid, timeline, xid, seq = fields
        return Origin(system_identifier, database_oid, timeline), Position(xid, seq)
