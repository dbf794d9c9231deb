"""Logging set-up for the command line: key=value lines or JSON objects.

Only the CLI calls this; library modules just log through their own logger.
"""

from __future__ import annotations

import ast
import logging
import re
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter

__all__ = ["PairsJsonFormatter", "configure_logging"]

KEYVALUE_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The `key=value` pairs our log lines carry; a value is a Python repr of a
# string (quoted, as %r writes it) or a bare token.
_PAIR = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")
# Third-party loggers that are chatty at INFO; they speak at WARNING and up.
QUIET_LOGGERS = ("amqtt", "transitions", "onnxruntime")


class PairsJsonFormatter(JsonFormatter):
    """JSON lines whose `key=value` pairs are fields of their own.

    The message stays whole under `message`; the words before the first pair
    go under `event`, and each pair becomes a field (numbers as numbers),
    unless a field of that name is already there.

    >>> import json, logging
    >>> record = logging.makeLogRecord(
    ...     {"msg": "verdict device=%r score=%.3f", "args": ("fridge", 0.93)}
    ... )
    >>> fields = json.loads(PairsJsonFormatter("%(message)s").format(record))
    >>> fields["event"], fields["device"], fields["score"]
    ('verdict', 'fridge', 0.93)
    """

    def add_fields(  # noqa: D102 - python-json-logger's hook, documented there
        self,
        log_data: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        message = record.getMessage()
        first = _PAIR.search(message)
        if first is None:
            return
        log_data.setdefault("event", message[: first.start()].strip())
        for key, raw in _PAIR.findall(message):
            log_data.setdefault(key, _value(raw))


def _value(raw: str) -> Any:
    """A pair's value: the string a repr stands for, a number, or the text."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw
    return value if isinstance(value, str | int | float | bool) else raw


def configure_logging(level: str, log_format: str) -> None:
    """Send log records to stderr at `level`, as key=value text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(PairsJsonFormatter(JSON_FIELDS))
    else:
        handler.setFormatter(logging.Formatter(KEYVALUE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
