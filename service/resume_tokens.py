"""WatchUsers resume tokens: a feed position, opaque to callers and signed.

Signed with the page tokens' secret (PAGE_TOKEN_SECRET) under a salt of its
own, so neither kind of token passes for the other.
"""

from itsdangerous import BadData, URLSafeSerializer

from service.outbox import Position

_SALT = "pat.users.v1.UserService.WatchUsers"
# Issued tokens are under 80 characters. A longer one is refused before HMAC.
MAX_RESUME_TOKEN_LENGTH = 256


class InvalidResumeToken(ValueError):
    """The token was not issued by this service."""


class ResumeTokens:
    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeSerializer(secret, salt=_SALT)

    def issue(self, position: Position) -> str:
        return self._serializer.dumps([position.xid, position.seq])

    def read(self, token: str) -> Position:
        if len(token) > MAX_RESUME_TOKEN_LENGTH:
            raise InvalidResumeToken(f"must be at most {MAX_RESUME_TOKEN_LENGTH} characters")
        try:
            xid, seq = self._serializer.loads(token)
        except (BadData, TypeError, ValueError):
            raise InvalidResumeToken("is not a resume token issued by this service") from None
        if not (type(xid) is int and type(seq) is int and xid >= 0 and seq >= 0):
            raise InvalidResumeToken("is not a resume token issued by this service")
        return Position(xid, seq)
