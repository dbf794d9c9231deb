"""TON_IoT telemetry CSVs to labeled message streams with a leak-free split.

Follows the protocol in the dataset's SOURCE.md: whitespace is stripped and
`true`/`false` unified with `1`/`0` before anything else (the raw strings
leak the label), exact duplicate rows are dropped, rows are sorted by time,
and neither date, time nor formatting becomes a feature (the payloads are
re-encoded JSON of the readings only).

The split is time-ordered inside each labeled block: normal traffic and each
attack family were recorded on different days, so a single cut in time would
put all normal rows on one side. Every contiguous run of one `type` is cut in
time order into train, validation and test parts, and each split replays its
parts in time order.

Any `Train_Test_IoT_*.csv` works, whatever its device and columns. Both
public variants are read: one has a `ts` column; the other only `date` and
`time`, which are a UTC-7 wall clock (SOURCE.md: `date`+`time` equals `ts`
shifted by -7 h) and are converted back to Unix seconds.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sidecar.stream import Message

__all__ = [
    "FILE_GLOB",
    "SPLITS",
    "LabeledMessage",
    "device_name",
    "load_device_rows",
    "load_splits",
    "split_rows",
]

_LOG = logging.getLogger(__name__)

FILE_GLOB = "Train_Test_IoT_*.csv"
TOPIC_PREFIX = "ton_iot"
SPLITS = ("train", "validation", "test")
# Shares of every labeled block given to train and validation; test gets the
# rest. 60/20/20 keeps a validation part large enough to tune thresholds on.
TRAIN_SHARE = 0.6
VALIDATION_SHARE = 0.2
# SOURCE.md: the `date`/`time` wall clock runs 7 hours behind `ts`.
WALL_CLOCK_OFFSET = timedelta(hours=7)
_META_COLUMNS = frozenset({"ts", "date", "time", "label", "type"})
_BOOLEAN_WORDS = {"true": 1.0, "false": 0.0}
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True, slots=True)
class LabeledMessage:
    """A message of a replayed dataset with its ground truth."""

    device: str
    message: Message
    label: int
    attack_type: str


@dataclass(frozen=True, slots=True)
class _Row:
    ts: float
    fields: tuple[tuple[str, float | str], ...]
    label: int
    attack_type: str


def device_name(path: Path) -> str:
    """Return the device id a file stands for.

    >>> device_name(Path("Train_Test_IoT_GPS_Tracker.csv"))
    'gps_tracker'
    """
    stem = path.stem
    prefix = "Train_Test_IoT_"
    return (stem[len(prefix) :] if stem.startswith(prefix) else stem).lower()


def _timestamp(row: dict[str, str]) -> float:
    if row.get("ts"):
        return float(row["ts"])
    wall = datetime.strptime(f"{row['date']} {row['time']}", "%d-%b-%y %H:%M:%S")
    return (wall.replace(tzinfo=UTC) + WALL_CLOCK_OFFSET).timestamp()


def _field_value(raw: str) -> float | str:
    text = raw.strip()
    lowered = text.lower()
    if lowered in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[lowered]
    if _NUMBER.match(text):
        return float(text)
    return lowered


def load_device_rows(path: Path) -> list[_Row]:
    """Read one file: strip, unify booleans, drop duplicates, sort by time.

    Raises:
        ValueError: If the file lacks a label, a type or any time column.
    """
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        missing = {"label", "type"} - set(header)
        if missing or not ({"ts"} <= set(header) or {"date", "time"} <= set(header)):
            message = (
                f"{path}: needs label, type and ts (or date and time) columns; "
                f"has {header}"
            )
            raise ValueError(message)
        value_columns = [name for name in header if name not in _META_COLUMNS]
        seen: set[_Row] = set()
        rows: list[_Row] = []
        for raw in reader:
            clean = {name: (value or "").strip() for name, value in raw.items() if name}
            row = _Row(
                ts=_timestamp(clean),
                fields=tuple(
                    (name, _field_value(clean[name])) for name in value_columns
                ),
                label=int(clean["label"]),
                attack_type=clean["type"].lower(),
            )
            if row in seen:
                continue
            seen.add(row)
            rows.append(row)
    rows.sort(key=lambda row: row.ts)
    _LOG.info(
        "loaded file=%s device=%s rows=%d columns=%s",
        path.name,
        device_name(path),
        len(rows),
        ",".join(value_columns),
    )
    return rows


def _blocks(rows: Sequence[_Row]) -> Iterator[list[_Row]]:
    block: list[_Row] = []
    for row in rows:
        if block and row.attack_type != block[-1].attack_type:
            yield block
            block = []
        block.append(row)
    if block:
        yield block


def split_rows(rows: Sequence[_Row]) -> dict[str, list[_Row]]:
    """Cut every contiguous block of one type in time order into the splits."""
    parts: dict[str, list[_Row]] = {name: [] for name in SPLITS}
    for block in _blocks(rows):
        first_cut = round(len(block) * TRAIN_SHARE)
        second_cut = round(len(block) * (TRAIN_SHARE + VALIDATION_SHARE))
        parts["train"].extend(block[:first_cut])
        parts["validation"].extend(block[first_cut:second_cut])
        parts["test"].extend(block[second_cut:])
    return parts


def _to_message(device: str, row: _Row) -> LabeledMessage:
    payload = json.dumps(dict(row.fields), separators=(",", ":")).encode()
    message = Message(f"{TOPIC_PREFIX}/{device}", payload, row.ts)
    return LabeledMessage(device, message, row.label, row.attack_type)


def load_splits(folder: Path) -> dict[str, dict[str, list[LabeledMessage]]]:
    """Load every device file of a folder into per-split, per-device streams.

    Returns:
        split name -> device id -> messages in time order.

    Raises:
        FileNotFoundError: If the folder holds no `Train_Test_IoT_*.csv`.
    """
    files = sorted(folder.glob(FILE_GLOB))
    if not files:
        message = f"no {FILE_GLOB} files in {folder}"
        raise FileNotFoundError(message)
    streams: dict[str, dict[str, list[LabeledMessage]]] = {name: {} for name in SPLITS}
    for path in files:
        device = device_name(path)
        for split, rows in split_rows(load_device_rows(path)).items():
            streams[split][device] = [_to_message(device, row) for row in rows]
    return streams
