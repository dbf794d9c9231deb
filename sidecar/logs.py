"""Logging set-up for the command line: key=value lines or JSON objects.

Only the CLI calls this; library modules just log through their own logger.
"""

from __future__ import annotations

import logging
import sys

from pythonjsonlogger.json import JsonFormatter

__all__ = ["configure_logging"]

KEYVALUE_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Third-party loggers that are chatty at INFO; they speak at WARNING and up.
QUIET_LOGGERS = ("amqtt", "transitions", "onnxruntime")


def configure_logging(level: str, log_format: str) -> None:
    """Send log records to stderr at `level`, as key=value text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS))
    else:
        handler.setFormatter(logging.Formatter(KEYVALUE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
