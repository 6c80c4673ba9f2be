"""The access log: one line per UserService RPC, on the logger `service.access` at INFO.

Each line has the method, the status code's name, the duration in ms, the
peer, the authenticated caller ("-" when authentication is off or failed)
and a request id: the caller's `x-request-id` metadata when it is at most
128 printable ASCII characters without spaces, else one made here. The id is
sent back in the trailing metadata, on errors too. Request fields are never
logged: emails are personal data.

Text logs get `method=GetUser code=OK duration_ms=1.3 peer=… caller=… request_id=…`;
JSON logs (LOG_FORMAT=json) an object with those keys. Either way the
record carries them as attributes, for any other handler.

A line costs the event loop a few µs: while the service's own handler alone
would receive it, its time, message and arguments are queued for that
handler, which makes the text when it writes its batch (logs.DirectLines:
byte for byte what logging would write); otherwise it is logged the
ordinary way, so a handler someone added (pytest's caplog) gets its record.

Health and reflection are not logged: probes would flood the log.
"""

import itertools
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

LOGGER_NAME = "service.access"
logger = logging.getLogger(LOGGER_NAME)

REQUEST_ID = "x-request-id"
_ACCEPTED_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_TEXT = "method=%s code=%s duration_ms=%.1f peer=%s caller=%s request_id=%s"

Context = grpc.aio.ServicerContext[Any, Any]


class Lines(Protocol):
    """Where access lines can go without a LogRecord (logs.DirectLines), when they may."""

    def write(
        self,
        message: str,
        args: tuple[object, ...] = (),
        fields: Mapping[str, object] | None = None,
    ) -> bool:
        """Write `message` % `args` at INFO, or nothing (False: log it the ordinary way)."""
        ...


@dataclass(slots=True)
class Entry:
    """One RPC's line, from its start."""

    request_id: str
    peer: str  # taken at the start: a cancelled call has none any more
    json: bool
    lines: Lines | None
    started: float = field(default_factory=time.perf_counter)

    def write(self, context: Context, method: str, caller: str, returned: bool) -> None:
        """Log the RPC's line; `returned`: the handler returned (else it was cancelled)."""
        milliseconds = (time.perf_counter() - self.started) * 1000
        status = context.code()  # the one aborted with, if any
        code = str(status.name) if status is not None else _unaborted(context, returned)
        peer, request_id = self.peer, self.request_id
        lines = self.lines
        if not self.json:
            args = (method, code, milliseconds, peer, caller, request_id)
            if lines is not None and lines.write(_TEXT, args):
                return
        fields = {
            "method": method,
            "code": code,
            "duration_ms": round(milliseconds, 1),
            "peer": peer,
            "caller": caller,
            "request_id": request_id,
        }
        if not self.json:
            logger.info(_TEXT, method, code, milliseconds, peer, caller, request_id, extra=fields)
        elif lines is None or not lines.write("%s %s", (method, code), fields):
            logger.info("%s %s", method, code, extra=fields)


class AccessLog:
    def __init__(self, json: bool, lines: Lines | None = None) -> None:
        # Generated ids: random per process, then a counter. Cheaper than a
        # uuid4 per call (no system call) and as unique across replicas.
        self._prefix = f"{secrets.token_hex(8)}-"
        self._sequence = itertools.count(1)
        self._json = json
        self._lines = lines

    def begin(self, context: Context) -> Entry:
        """Start an RPC's entry and send its request id back (with any status)."""
        request_id = self._request_id(context)
        context.set_trailing_metadata(((REQUEST_ID, request_id),))
        return Entry(request_id, context.peer(), self._json, self._lines, time.perf_counter())

    def _request_id(self, context: Context) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID:
                if isinstance(value, str) and _ACCEPTED_REQUEST_ID.fullmatch(value):
                    return value
                break  # a hostile or broken id never reaches the log
        return f"{self._prefix}{next(self._sequence):x}"


def _unaborted(context: Context, returned: bool) -> str:
    """The status of a call not aborted: OK, or how it was cut short."""
    if returned:
        return "OK"
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def new_access_log(enabled: bool, log_format: str, lines: Lines | None = None) -> AccessLog | None:
    """The access log, or None when ACCESS_LOG=false or INFO is not logged (no cost per call).

    `lines`: where its lines may go without a LogRecord (logs.direct_lines).
    """
    if not enabled or not logger.isEnabledFor(logging.INFO):
        return None
    return AccessLog(json=log_format == "json", lines=lines)
