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

Health and reflection are not logged: probes would flood the log.
"""

import itertools
import logging
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

LOGGER_NAME = "service.access"
logger = logging.getLogger(LOGGER_NAME)

REQUEST_ID = "x-request-id"
_ACCEPTED_REQUEST_ID = re.compile(r"[!-~]{1,128}")
_TEXT = "method=%s code=%s duration_ms=%.1f peer=%s caller=%s request_id=%s"

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(slots=True)
class Entry:
    """One RPC's line, from its start."""

    request_id: str
    peer: str  # taken at the start: a cancelled call has none any more
    json: bool
    started: float = field(default_factory=time.perf_counter)

    @property
    def echo(self) -> tuple[tuple[str, str], ...]:
        """The trailing metadata that hands the request id back."""
        return ((REQUEST_ID, self.request_id),)

    def write(self, context: Context, method: str, caller: str, returned: bool) -> None:
        """Log the RPC's line; `returned`: the handler returned (else it was cancelled)."""
        milliseconds = (time.perf_counter() - self.started) * 1000
        code = _code_name(context, returned)
        peer = self.peer
        fields = {
            "method": method,
            "code": code,
            "duration_ms": round(milliseconds, 1),
            "peer": peer,
            "caller": caller,
            "request_id": self.request_id,
        }
        if self.json:
            logger.info("%s %s", method, code, extra=fields)
        else:
            logger.info(
                _TEXT, method, code, milliseconds, peer, caller, self.request_id, extra=fields
            )


class AccessLog:
    def __init__(self, json: bool) -> None:
        # Generated ids: random per process, then a counter. Cheaper than a
        # uuid4 per call (no system call) and as unique across replicas.
        self._prefix = secrets.token_hex(8)
        self._sequence = itertools.count(1)
        self._json = json

    def begin(self, context: Context) -> Entry:
        """Start an RPC's entry and send its request id back (with any status)."""
        entry = Entry(self._request_id(context), context.peer(), self._json)
        context.set_trailing_metadata(entry.echo)
        return entry

    def _request_id(self, context: Context) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID:
                if isinstance(value, str) and _ACCEPTED_REQUEST_ID.fullmatch(value):
                    return value
                break  # a hostile or broken id never reaches the log
        return f"{self._prefix}-{next(self._sequence):x}"


def _code_name(context: Context, returned: bool) -> str:
    """The status the caller gets: the one aborted with, else OK or how it was cut short."""
    code = context.code()
    if code is not None:
        return str(code.name)
    if returned:
        return "OK"
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def new_access_log(enabled: bool, log_format: str) -> AccessLog | None:
    """The access log, or None when ACCESS_LOG=false or INFO is not logged (no cost per call)."""
    if not enabled or not logger.isEnabledFor(logging.INFO):
        return None
    return AccessLog(json=log_format == "json")
