"""Request field checks: each bad field becomes one FieldViolation.

Checks run before any database work. They find every violation of a request,
so a caller fixes all of them in one round trip; the first few are listed and
the rest counted (see `InvalidArgument`). Every check bounds a value's length,
or a repeated field's size, before it looks at characters or elements: no
request, however absurd, costs more than milliseconds to refuse.
"""

import unicodedata
import uuid
from collections.abc import Sequence

from email_validator import EmailNotValidError, validate_email

from pat.users.v1 import user_pb2
from service.convert import parse_etag
from service.errors import MAX_LISTED_VIOLATIONS, FieldViolation, InvalidArgument
from service.models import MAX_DISPLAY_NAME_LENGTH, MAX_EMAIL_LENGTH
from service.users import MUTABLE_FIELDS

OUTPUT_ONLY_FIELDS = ("id", "create_time", "update_time", "delete_time", "etag")

# A UUID's canonical text is 36 characters; anything longer is refused before parsing.
_UUID_TEXT_LENGTH = 36

# A mask can only usefully name "email", "display_name" or "*"; a few
# repeats are harmless, a longer mask is refused before any path is read.
MAX_MASK_PATHS = 8


class Violations:
    """Collects a request's field violations; `raise_if_any` ends validation.

    Past MAX_LISTED_VIOLATIONS a violation is only counted, never built.
    """

    def __init__(self) -> None:
        self._listed: list[FieldViolation] = []
        self._unlisted = 0

    def add(self, field: str, description: str) -> None:
        if len(self._listed) < MAX_LISTED_VIOLATIONS:
            self._listed.append(FieldViolation(field, description))
        else:
            self._unlisted += 1

    def raise_if_any(self) -> None:
        if self._listed:
            raise InvalidArgument(self._listed, unlisted=self._unlisted)

    def id(self, field: str, value: str) -> uuid.UUID:
        """A required UUID. On a violation the nil UUID stands in until `raise_if_any`."""
        if not value:
            self.add(field, "is required")
        return self.optional_id(field, value) or uuid.UUID(int=0)

    def optional_id(self, field: str, value: str) -> uuid.UUID | None:
        """A canonical UUID ("xxxxxxxx-xxxx-..."; upper-case hex is accepted) or empty."""
        if not value:
            return None
        parsed = _parse_uuid(value)
        if parsed is None:
            self.add(field, "must be a UUID such as 0b7c4d7e-8d3c-4f59-9a57-3f1f0b0f8a11")
        return parsed

    def email(self, field: str, value: str) -> str:
        if not value:
            self.add(field, "is required")
        elif len(value) > MAX_EMAIL_LENGTH:
            self.add(field, f"must be at most {MAX_EMAIL_LENGTH} characters")
        elif _has_control_characters(value):
            self.add(field, "must not contain control characters")
        else:
            try:
                validate_email(value, check_deliverability=False)
            except EmailNotValidError as error:
                self.add(field, f"is not a valid email address: {error}")
        return value

    def display_name(self, field: str, value: str) -> str:
        if len(value) > MAX_DISPLAY_NAME_LENGTH:
            self.add(field, f"must be at most {MAX_DISPLAY_NAME_LENGTH} characters")
        elif _has_control_characters(value):
            self.add(field, "must not contain control characters")
        return value

    def etag(self, field: str, value: str) -> int | None:
        """The version an etag names; empty means "no condition"."""
        if not value:
            return None
        version = parse_etag(value)
        if version is None:
            self.add(field, "is not an etag issued by this service")
        return version

    def updated_fields(self, user: user_pb2.User, mask_paths: Sequence[str]) -> dict[str, str]:
        """The mutable fields UpdateUser should set, from the user and its update_mask.

        No paths: every mutable field with a non-empty value. "*": all of them.
        More than MAX_MASK_PATHS: one violation, and no path is looked at.
        """
        if len(mask_paths) > MAX_MASK_PATHS:
            self.add("update_mask.paths", f"must hold at most {MAX_MASK_PATHS} paths")
            return {}
        paths = list(mask_paths)
        if not paths:
            chosen = [name for name in MUTABLE_FIELDS if getattr(user, name)]
        elif paths == ["*"]:
            chosen = list(MUTABLE_FIELDS)
        else:
            chosen = [name for name in MUTABLE_FIELDS if name in paths]
            for index, path in enumerate(paths):
                self._check_mask_path(f"update_mask.paths[{index}]", path)
        fields = {}
        if "email" in chosen:
            fields["email"] = self.email("user.email", user.email)
        if "display_name" in chosen:
            fields["display_name"] = self.display_name("user.display_name", user.display_name)
        return fields

    def _check_mask_path(self, field: str, path: str) -> None:
        if path in MUTABLE_FIELDS:
            return
        if path == "*":
            self.add(field, 'is "*", which must be the only path')
        elif path in OUTPUT_ONLY_FIELDS:
            self.add(field, f"names {path!r}, which is output only")
        else:
            self.add(
                field, f"is not a field of User; mutable fields are {', '.join(MUTABLE_FIELDS)}"
            )


def _parse_uuid(value: str) -> uuid.UUID | None:
    if len(value) != _UUID_TEXT_LENGTH:
        return None
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    # uuid.UUID also takes braces and "urn:uuid:"; only the canonical form is an id.
    return parsed if str(parsed) == value.lower() else None


def _has_control_characters(value: str) -> bool:
    # Cc covers C0 (NUL, tab, new line, ESC, ...), DEL and C1. PostgreSQL cannot
    # store NUL, and the rest only ever arrive by mistake or with ill intent.
    return any(unicodedata.category(char) == "Cc" for char in value)
