"""Time-stamped tables (CSV, JSON lines) to labeled per-device message streams.

This is how a user brings their own history: an InfluxDB or Home Assistant
export, or any table with a time column, an optional device column, numeric
columns and an optional 0/1 label column. Each row becomes one message whose
payload is the JSON object of that row's numeric readings, published on
`<prefix>/<device>` as the sidecar would receive it live.

The module also holds `LabeledStreams`, the shape every evaluation loader
(SKAB, NAB, MQTTset, this one) returns: the streams the detectors replay,
the part of each stream they may learn from, and the protocol in words.

Known limits, in plain words:
- Text states (`on`/`off`, `open`) in a table are not readings here; only
  numbers and the sidecar's missing-reading words (`unavailable`, `nan`...)
  are. Map states to numbers before exporting.
- A device's rows must fit in memory; the whole table is read at once.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from converters.ton_iot import LabeledMessage
from sidecar.config import Settings, TopicRule
from sidecar.stream import Message
from sidecar.topics import RouteKind, TopicRouter

__all__ = [
    "DEFAULT_FIT_SHARE",
    "LabeledStreams",
    "TableError",
    "check_routing",
    "load_table",
    "parse_time",
    "safe_device",
    "to_message",
]

_LOG = logging.getLogger(__name__)

TOPIC_PREFIX = "table"
# Share of each device's rows the detectors may learn from before scoring
# starts, when the user names none: a fifth leaves most of a history to judge
# while giving the 128-message warm-up of the shipped models room to finish.
DEFAULT_FIT_SHARE = 0.2
# Words that stand for a failed reading, as the sidecar's payload parser reads
# them (sidecar/payload.py), plus the empty cell.
MISSING_WORDS = frozenset({"", "nan", "-nan", "none", "null", "unavailable", "unknown"})
# Column names tried, in order, when no time column is named: the usual names
# in InfluxDB (`_time`), Home Assistant (`last_changed`) and generic exports.
TIME_COLUMN_GUESSES = ("time", "timestamp", "datetime", "_time", "last_changed", "ts")
# Epoch numbers above this are milliseconds, not seconds (1e11 s is the year
# 5138; 1e11 ms is 1973).
EPOCH_MS_ABOVE = 1e11
_JSON_SUFFIXES = frozenset({".jsonl", ".ndjson", ".json"})


class TableError(ValueError):
    """A table cannot be read as asked; the message names the file and place."""


@dataclass(frozen=True)
class LabeledStreams:
    """Labeled per-device streams and the protocol that scores them.

    Attributes:
        dataset: Short dataset name (`skab`, `nab`, `csv`...).
        streams: Device id -> messages in time order; the detectors replay
            all of each and are scored from `scored_from` on.
        fit_streams: Device id -> messages the baselines may learn from,
            never scored. For datasets fitted on a stream's own start this is
            that start; for split datasets it is the training split.
        scored_from: Device id -> position of the first message whose window
            counts in the metrics (0 when the whole stream is scored).
        protocol: The protocol in words, written into every report.
        fit_normal_only: Whether the fit part's labels may be used to keep
            only its normal messages (true for a labeled training split).
        topic_rules: Extra topic rules the streams' topics need, appended to
            the sidecar's defaults.
        windows: Device id -> row spans [first, last] of labeled anomaly
            windows, where the dataset defines them apart from row labels.
        notes: Facts about this load worth reporting (counts left out...).
    """

    dataset: str
    streams: dict[str, list[LabeledMessage]]
    fit_streams: dict[str, list[LabeledMessage]]
    scored_from: dict[str, int]
    protocol: str
    fit_normal_only: bool = False
    topic_rules: tuple[TopicRule, ...] = ()
    windows: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    def settings_for(self, settings: Settings) -> Settings:
        """Return the settings with this dataset's topic rules appended."""
        if not self.topic_rules:
            return settings
        return settings.model_copy(
            update={"topics": [*settings.topics, *self.topic_rules]}
        )


def safe_device(name: str) -> str:
    """Turn a name into a device id that is one topic level.

    >>> safe_device("valve1/0.csv")
    'valve1.0'
    """
    stem = name[: -len(".csv")] if name.endswith(".csv") else name
    cleaned = stem.replace("/", ".").replace("+", "_").replace("#", "_").strip()
    return cleaned.lstrip("$") or "device"


def to_message(
    prefix: str,
    device: str,
    time: float,
    readings: Mapping[str, float | None],
    label: int,
    kind: str,
) -> LabeledMessage:
    """Build one labeled message whose payload is the readings as JSON."""
    payload = json.dumps(dict(readings), separators=(",", ":")).encode()
    message = Message(f"{prefix}/{device}", payload, time)
    return LabeledMessage(device, message, label, kind)


def parse_time(text: str | float) -> float:
    """Read epoch seconds or milliseconds, or an ISO 8601 time (naive = UTC).

    >>> parse_time("2020-03-09 10:14:33")
    1583748873.0
    >>> parse_time("1583748873000")
    1583748873.0

    Raises:
        ValueError: If the text is neither.
    """
    stripped = str(text).strip()
    try:
        number = float(stripped)
    except ValueError:
        moment = datetime.fromisoformat(stripped)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    if not math.isfinite(number):
        message = f"not a finite time: {text!r}"
        raise ValueError(message)
    return number / 1000.0 if abs(number) > EPOCH_MS_ABOVE else number


def _cell_number(text: Any) -> float | None:
    """Return a reading, None for a missing one; raise ValueError otherwise."""
    if isinstance(text, bool):
        return float(text)
    if isinstance(text, int | float):
        return float(text) if math.isfinite(float(text)) else None
    if text is None or str(text).strip().lower() in MISSING_WORDS:
        return None
    number = float(str(text).strip())
    return number if math.isfinite(number) else None


def _read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, row) from a CSV or JSON-lines file."""
    if path.suffix.lower() in _JSON_SUFFIXES:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as err:
                    message = f"{path}:{number}: not a JSON object ({err})"
                    raise TableError(message) from err
                if not isinstance(row, dict):
                    message = f"{path}:{number}: not a JSON object"
                    raise TableError(message)
                yield number, row
        return
    with path.open(encoding="utf-8-sig", newline="") as handle:
        sample = handle.read(4096)
        handle.seek(0)
        delimiter = ";" if sample.count(";") > sample.count(",") else ","
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None:
            message = f"{path}: empty file, no header row"
            raise TableError(message)
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        for row in reader:
            # The header is line 1, so data row k sits on line k + 1.
            yield reader.line_num, row


def _require(path: Path, columns: Sequence[str], row: Mapping[str, Any]) -> None:
    missing = [name for name in columns if name not in row]
    if missing:
        message = (
            f"{path}: no column named {', '.join(map(repr, missing))}; "
            f"columns are {sorted(row)}"
        )
        raise TableError(message)


def _guess_time_column(path: Path, row: Mapping[str, Any]) -> str:
    for name in TIME_COLUMN_GUESSES:
        if name in row:
            return name
    message = (
        f"{path}: no time column found (tried {', '.join(TIME_COLUMN_GUESSES)}); "
        f"name one with --time-column; columns are {sorted(row)}"
    )
    raise TableError(message)


def _numeric_columns(
    rows: Sequence[tuple[int, dict[str, Any]]], candidates: Sequence[str]
) -> list[str]:
    """Keep the candidate columns whose every non-missing cell is a number."""
    numeric = []
    for name in candidates:
        try:
            for _, row in rows:
                _cell_number(row.get(name))
        except (TypeError, ValueError):
            _LOG.info("column skipped column=%s reason=not_numeric", name)
            continue
        numeric.append(name)
    return numeric


def load_table(
    path: Path,
    *,
    time_column: str | None = None,
    device_column: str | None = None,
    label_column: str | None = None,
    value_columns: Sequence[str] | None = None,
    fit_share: float = DEFAULT_FIT_SHARE,
) -> LabeledStreams:
    """Read a CSV or JSON-lines table into labeled per-device streams.

    Args:
        path: The file; `.jsonl`, `.ndjson` and `.json` are read as one JSON
            object per line, anything else as CSV (`,` or `;`).
        time_column: Column of epoch seconds/milliseconds or ISO 8601 times;
            guessed from the usual names when None.
        device_column: Column naming each row's device; when None the whole
            file is one device named after the file.
        label_column: Column of 0/1 ground truth; when None every row is
            taken as normal (the metrics then only say how often it alarms).
        value_columns: The readings; when None, every other column whose
            cells are all numbers or missing-reading words.
        fit_share: Share of each device's rows, from its start, the
            detectors may learn from; the rest is scored.

    Raises:
        TableError: Naming the column, or the line and column, of the first
            problem: a missing column, an unparsable time, label or reading.
    """
    if not 0.0 <= fit_share < 1.0:
        message = f"fit share must be in [0, 1), got {fit_share}"
        raise TableError(message)
    rows = list(_read_rows(path))
    if not rows:
        message = f"{path}: no data rows"
        raise TableError(message)
    first = rows[0][1]
    time_name = time_column or _guess_time_column(path, first)
    named = [time_name, *(c for c in (device_column, label_column) if c)]
    _require(path, [*named, *(value_columns or ())], first)
    candidates = [name for name in first if name not in named]
    values = (
        list(value_columns)
        if value_columns is not None
        else _numeric_columns(rows, candidates)
    )
    if not values:
        message = f"{path}: no numeric value columns among {candidates}"
        raise TableError(message)

    default_device = safe_device(path.stem)
    per_device: dict[str, list[tuple[float, int, dict[str, float | None], int]]] = {}
    for line, row in rows:
        _require(path, [*named, *values], row)
        time = _cell(path, line, time_name, row, parse_time)
        label = _cell(path, line, label_column, row, _label) if label_column else 0
        readings = {name: _cell(path, line, name, row, _cell_number) for name in values}
        device = (
            safe_device(str(row[device_column])) if device_column else default_device
        )
        per_device.setdefault(device, []).append((time, line, readings, label))

    streams: dict[str, list[LabeledMessage]] = {}
    for device, items in per_device.items():
        items.sort(key=lambda item: (item[0], item[1]))
        streams[device] = [
            to_message(
                TOPIC_PREFIX,
                device,
                time,
                readings,
                label,
                "anomaly" if label else "normal",
            )
            for time, _, readings, label in items
        ]
    scored_from = {d: int(len(s) * fit_share) for d, s in streams.items()}
    _LOG.info(
        "table loaded path=%s devices=%d rows=%d values=%s",
        path,
        len(streams),
        len(rows),
        ",".join(values),
    )
    return LabeledStreams(
        dataset="csv",
        streams=streams,
        fit_streams={d: s[: scored_from[d]] for d, s in streams.items()},
        scored_from=scored_from,
        protocol=(
            f"user table {path.name}: rows sorted by time per device; the first "
            f"{fit_share:.0%} of each device's rows are learned from and never "
            "scored, the rest is scored; "
            + (
                f"labels from column {label_column!r}"
                if label_column
                else "no label column: every row counts as normal"
            )
        ),
    )


def _label(text: Any) -> int:
    number = float(str(text).strip())
    if number not in (0.0, 1.0):
        message = f"label must be 0 or 1, got {text!r}"
        raise ValueError(message)
    return int(number)


def _cell(
    path: Path,
    line: int,
    column: str,
    row: Mapping[str, Any],
    read: Callable[[Any], Any],
) -> Any:
    try:
        return read(row[column])
    except (TypeError, ValueError) as err:
        message = (
            f"{path}:{line}: column {column!r}: cannot read {row[column]!r} ({err})"
        )
        raise TableError(message) from err


def check_routing(
    streams: Mapping[str, Sequence[LabeledMessage]], settings: Settings
) -> None:
    """Check that every stream's topic routes to its own device id.

    The hybrid is scored through the live pipeline, which finds devices by
    topic; a stream whose topic routed elsewhere would silently lose scores.

    Raises:
        TableError: Naming the first device whose topic routes elsewhere.
    """
    router = TopicRouter(settings.topics, settings.output.prefix)
    for device, messages in streams.items():
        if not messages:
            continue
        route = router.route(messages[0].message.topic)
        if route.kind is not RouteKind.TELEMETRY or route.device != device:
            message = (
                f"device {device!r}: topic {messages[0].message.topic!r} routes to "
                f"{route.kind.value} {route.device!r}; rename the device"
            )
            raise TableError(message)
