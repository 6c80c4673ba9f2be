"""What callers saw: a histogram of status codes, with admission's refusals counted apart."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

OVERLOADED = "UNAVAILABLE/OVERLOADED"
# HTTP/2 REFUSED_STREAM (error code 7): grpc turned the stream away before
# any handler saw it, e.g. past the connection's MAX_CONCURRENT_STREAMS.
REFUSED_STREAM = "UNAVAILABLE/REFUSED_STREAM"


@dataclass
class Statuses:
    """A histogram of the status codes callers saw, with a few messages of each.

    An UNAVAILABLE refusal from admission control (ErrorInfo reason OVERLOADED)
    is counted apart from other UNAVAILABLEs: only it says "not started, retry".
    The slowest answer of each kind tells who answered: a refusal comes at
    once, an expired deadline after the deadline.
    """

    counts: Counter[str] = field(default_factory=Counter)
    messages: dict[str, list[str]] = field(default_factory=dict)
    slowest_ms: dict[str, float] = field(default_factory=dict)
    # grpc's debug string of the first error of each kind: whether the status
    # came from the server (its trailers) or was made up by the client's core.
    debug: dict[str, str] = field(default_factory=dict)

    def ok(self, seconds: float = 0.0) -> None:
        self.count("OK", seconds=seconds)

    def failed(self, error: grpc.aio.AioRpcError, seconds: float = 0.0) -> str:
        key = status_key(error)
        self.count(key, seconds=seconds)
        seen = self.messages.setdefault(key, [])
        message = (error.details() or "")[:160]
        if len(seen) < 3 and message not in seen:
            seen.append(message)
        if key not in self.debug:
            self.debug[key] = (error.debug_error_string() or "")[:300]
        return key

    def count(self, key: str, n: int = 1, seconds: float = 0.0) -> None:
        self.counts[key] += n
        self.slowest_ms[key] = round(max(self.slowest_ms.get(key, 0.0), seconds * 1000), 1)

    def as_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts.most_common()),
            "messages": self.messages,
            "slowest_ms": self.slowest_ms,
            "debug": self.debug,
        }

    def add(self, other: Statuses) -> None:
        """Fold `other` into this histogram."""
        self.counts.update(other.counts)
        for key, slowest in other.slowest_ms.items():
            self.slowest_ms[key] = max(self.slowest_ms.get(key, 0.0), slowest)
        for key, messages in other.messages.items():
            self.messages.setdefault(key, messages)
        for key, debug in other.debug.items():
            self.debug.setdefault(key, debug)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Statuses:
        return cls(Counter(data["counts"]), data["messages"], data["slowest_ms"], data["debug"])


def status_key(error: grpc.aio.AioRpcError) -> str:
    """The code's name; UNAVAILABLE is split into OVERLOADED, REFUSED_STREAM and the rest."""
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        if error_reason(error) == "OVERLOADED":
            return OVERLOADED
        if "RST_STREAM with error code 7" in (error.details() or ""):
            return REFUSED_STREAM
    return str(code.name)


def error_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The reason of the google.rpc.ErrorInfo in the error's details, if any."""
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except ValueError:  # trailers disagree with the call's status
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return None
