"""Conversions between database rows and wire messages: users, etags."""

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from pat.users.v1 import user_pb2
from service.users import UserRow

_MAX_VERSION = 2**63 - 1  # the version column is a BIGINT


def format_etag(version: int) -> str:
    return str(version)


def parse_etag(etag: str) -> int | None:
    """The version an etag names, or None if the server could not have issued it."""
    # Length first: a hostile etag may be 64 KiB long.
    if len(etag) > len(str(_MAX_VERSION)) or not etag.isascii() or not etag.isdigit():
        return None
    version = int(etag)
    return version if 0 < version <= _MAX_VERSION else None


def to_proto(user: UserRow) -> user_pb2.User:
    message = user_pb2.User(
        id=str(user.id),
        email=user.email,
        display_name=user.display_name,
        create_time=_timestamp(user.create_time),
        update_time=_timestamp(user.update_time),
        etag=format_etag(user.version),
    )
    if user.delete_time is not None:
        message.delete_time.CopyFrom(_timestamp(user.delete_time))
    return message


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _timestamp(value: datetime) -> Timestamp:
    # Integer arithmetic on the aware datetime PostgreSQL returns: exact to the
    # microsecond, and a quarter of Timestamp.FromDatetime's cost (every RPC
    # converts three of these).
    since_epoch = value - _EPOCH
    return Timestamp(
        seconds=since_epoch.days * 86_400 + since_epoch.seconds,
        nanos=since_epoch.microseconds * 1000,
    )
