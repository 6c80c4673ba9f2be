"""ListUsers page tokens: opaque to callers, signed so that none can be forged.

A token carries the cursor of the page it continues and the `show_deleted`
of the call that issued it, signed with HMAC by itsdangerous. `page_size` is
deliberately left out: callers may change it between pages (AIP-158).
"""

import uuid
from datetime import datetime

from itsdangerous import BadData, URLSafeSerializer

from service.users import Cursor

_SALT = "pat.users.v1.UserService.ListUsers"
# Issued tokens are about 136 characters; the headroom leaves room for a
# cursor that grows. A longer token is refused before HMAC or decoding.
MAX_PAGE_TOKEN_LENGTH = 512


class InvalidPageToken(ValueError):
    """The token was not issued by this service or belongs to other parameters."""


class PageTokens:
    def __init__(self, secret: bytes) -> None:
        self._serializer = URLSafeSerializer(secret, salt=_SALT)

    def issue(self, cursor: Cursor, *, show_deleted: bool) -> str:
        return self._serializer.dumps(
            [cursor.create_time.isoformat(), str(cursor.id), show_deleted]
        )

    def read(self, token: str, *, show_deleted: bool) -> Cursor:
        if len(token) > MAX_PAGE_TOKEN_LENGTH:
            raise InvalidPageToken(f"must be at most {MAX_PAGE_TOKEN_LENGTH} characters")
        try:
            create_time, user_id, issued_for_deleted = self._serializer.loads(token)
            cursor = Cursor(datetime.fromisoformat(create_time), uuid.UUID(user_id))
        except (BadData, TypeError, ValueError):
            raise InvalidPageToken("is not a page token issued by this service") from None
        if issued_for_deleted is not show_deleted:
            raise InvalidPageToken("was issued for a different show_deleted")
        return cursor
