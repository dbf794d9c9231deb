"""Payload bytes to numeric readings: numbers, JSON, words and missing markers."""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_IGNORED_KEYS",
    "PayloadKind",
    "Readings",
    "parse_payload",
]

# Words that stand for a binary state. From the payload survey
# (shared/reference/payloads.md, "Parsing rules distilled", rule 3).
_TRUE_WORDS = frozenset(
    {"on", "true", "open", "yes", "high", "online", "active", "detected"}
)
_FALSE_WORDS = frozenset(
    {"off", "false", "closed", "no", "low", "offline", "inactive", "clear"}
)
# Failed-reading markers: ESPHome publishes `nan` or `None`, Home Assistant
# `unavailable` and `unknown` (payloads.md rule 3; pitfalls 10 and 11).
_MISSING_WORDS = frozenset({"nan", "-nan", "none", "null", "unavailable", "unknown"})
# Device clocks are not trusted for anything and never become features: the
# datasets leak labels through time, and Tasmota reports 1970 before NTP sync.
DEFAULT_IGNORED_KEYS = frozenset(
    {
        "time",
        "ts",
        "tst",
        "timestamp",
        "last_seen",
        "frame_time",
        "start_time",
        "end_time",
        "minute_ts",
        "uptime",
        "uptimesec",
    }
)
# A number, optionally followed by a unit glued on (`273600 seconds`, `21.5 °C`).
# Written so that no two parts can match the same digits: an ambiguous
# `\d+\.?\d*` backtracks quadratically on a long digit run.
_NUMBER_WITH_UNIT = re.compile(
    r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*[^\d\s]{0,12}\s*$"
)
# No reading needs more characters than this (a float64 prints in 24);
# anything longer is text, and the regex never sees it.
MAX_NUMBER_CHARS = 64
# Small numeric arrays (Shelly `aenergy.by_minute`) become indexed keys; longer
# ones (OwnTracks waypoints, bounding boxes of lists) are not telemetry levels.
MAX_ARRAY_ITEMS = 8
# json.loads recurses per nesting level; a hostile payload of nested brackets
# would hit Python's recursion limit, so nesting is checked before parsing.
MAX_JSON_DEPTH = 32
# Failed readings written as bare words inside JSON (ESPHome and Tasmota
# sensors print C's `nan`, `-nan`, `inf`; esphome-core #272): not valid JSON,
# so a payload that fails to parse is retried with them read as null. Only
# words standing where a value stands (after `:`, `[` or `,`) are touched.
_BARE_FAILED_WORDS = re.compile(
    r"(?<=[:\[,])(\s*)(?:-?nan|-?inf(?:inity)?|none|undefined)(\s*)(?=[,}\]])",
    re.IGNORECASE,
)


class PayloadKind(enum.StrEnum):
    """What a payload turned out to be."""

    EMPTY = "empty"
    NUMBER = "number"
    WORD = "word"
    TEXT = "text"
    JSON = "json"
    MISSING = "missing"
    UNPARSABLE = "unparsable"
    BINARY = "binary"
    OVERSIZED = "oversized"


@dataclass(frozen=True, slots=True)
class Readings:
    """The numeric content of one payload.

    Attributes:
        kind: What the payload was.
        values: Finite numeric readings by key (dotted for nested JSON).
        missing: Keys that reported a failed reading (`nan`, `unavailable`...).
        dropped_keys: How many numeric keys were dropped by the key limit.
    """

    kind: PayloadKind
    values: dict[str, float] = field(default_factory=dict)
    missing: frozenset[str] = frozenset()
    dropped_keys: int = 0

    @property
    def usable(self) -> bool:
        """Whether the payload carried readings or missing markers at all."""
        return bool(self.values or self.missing)


def parse_payload(
    payload: bytes,
    *,
    key: str = "value",
    max_bytes: int = 65536,
    max_keys: int = 64,
    ignored_keys: frozenset[str] = DEFAULT_IGNORED_KEYS,
) -> Readings:
    """Turn raw payload bytes into readings without ever raising.

    Args:
        payload: The undecoded MQTT payload.
        key: The key a scalar payload is stored under (the topic's channel).
        max_bytes: Payloads larger than this are not decoded at all.
        max_keys: At most this many numeric keys are kept from one payload.
        ignored_keys: Leaf names (case-insensitive) that are never readings.

    Returns:
        The readings; unusable payloads come back with an explanatory kind.

    >>> parse_payload(b'{"temperature": 21.5, "state": "ON"}').values
    {'temperature': 21.5, 'state': 1.0}
    >>> parse_payload(b"nan", key="temp").missing
    frozenset({'temp'})
    """
    if not payload:
        return Readings(PayloadKind.EMPTY)
    if len(payload) > max_bytes:
        return Readings(PayloadKind.OVERSIZED)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return Readings(PayloadKind.BINARY)
    if "\x00" in text:
        return Readings(PayloadKind.BINARY)

    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        return _parse_json(stripped, max_keys, ignored_keys)
    return _parse_scalar(stripped, key)


def _parse_scalar(text: str, key: str) -> Readings:
    unquoted = text.strip().strip("\"'")
    word = unquoted.lower()
    if word in _MISSING_WORDS or not word:
        return Readings(PayloadKind.MISSING, missing=frozenset({key}))
    if word in _TRUE_WORDS:
        return Readings(PayloadKind.WORD, {key: 1.0})
    if word in _FALSE_WORDS:
        return Readings(PayloadKind.WORD, {key: 0.0})
    number = _to_number(unquoted)
    if number is None:
        return Readings(PayloadKind.TEXT)
    if not math.isfinite(number):
        return Readings(PayloadKind.MISSING, missing=frozenset({key}))
    return Readings(PayloadKind.NUMBER, {key: number})


def _to_number(text: str) -> float | None:
    if len(text) > MAX_NUMBER_CHARS:
        return None
    match = _NUMBER_WITH_UNIT.match(text)
    if match is None:
        return None
    try:
        return float(match.group(1))
    except (ValueError, OverflowError):
        return None


def _nesting_depth_exceeds(text: str, limit: int) -> bool:
    # Counting brackets outside strings is enough to refuse hostile nesting
    # before json.loads recurses into it. Nesting can never be deeper than the
    # number of opening brackets, and counting those runs in C: the
    # character-by-character walk below is only needed for the rare payload
    # with more brackets than the limit.
    if text.count("{") + text.count("[") <= limit:
        return False
    depth = 0
    in_string = False
    escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _parse_json(text: str, max_keys: int, ignored_keys: frozenset[str]) -> Readings:
    if _nesting_depth_exceeds(text, MAX_JSON_DEPTH):
        return Readings(PayloadKind.UNPARSABLE)
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        repaired = _BARE_FAILED_WORDS.sub(r"\1null\2", text)
        if repaired == text:
            return Readings(PayloadKind.UNPARSABLE)
        try:
            document = json.loads(repaired)
        except (ValueError, RecursionError):
            return Readings(PayloadKind.UNPARSABLE)

    values: dict[str, float] = {}
    missing: set[str] = set()
    dropped = _flatten(document, "", values, missing, max_keys, ignored_keys)
    return Readings(PayloadKind.JSON, values, frozenset(missing), dropped)


def _flatten(
    node: Any,
    prefix: str,
    values: dict[str, float],
    missing: set[str],
    max_keys: int,
    ignored_keys: frozenset[str],
) -> int:
    """Collect numeric leaves under dotted keys; return how many were dropped."""
    dropped = 0
    if isinstance(node, dict):
        for name, child in node.items():
            name_text = str(name)
            if name_text.lower() in ignored_keys:
                continue
            child_key = f"{prefix}.{name_text}" if prefix else name_text
            dropped += _flatten(
                child, child_key, values, missing, max_keys, ignored_keys
            )
        return dropped
    if isinstance(node, list):
        if len(node) > MAX_ARRAY_ITEMS:
            return 0
        for index, child in enumerate(node):
            if isinstance(child, bool | int | float):
                child_key = f"{prefix}.{index}" if prefix else str(index)
                dropped += _flatten(
                    child, child_key, values, missing, max_keys, ignored_keys
                )
        return dropped

    key = prefix or "value"
    reading = _leaf_value(node)
    if reading is None:
        return 0
    if math.isnan(reading):
        missing.add(key)
        return 0
    if key not in values and len(values) >= max_keys:
        return 1
    values[key] = reading
    return 0


def _leaf_value(node: Any) -> float | None:
    """Return a leaf's number, NaN for a failed reading, None for non-numbers."""
    if node is None:
        return math.nan
    if isinstance(node, bool):
        return 1.0 if node else 0.0
    if isinstance(node, int | float):
        try:
            number = float(node)
        except OverflowError:
            return math.nan
        return number if math.isfinite(number) else math.nan
    if isinstance(node, str):
        scalar = _parse_scalar(node, "value")
        if scalar.missing:
            return math.nan
        return scalar.values.get("value")
    return None
