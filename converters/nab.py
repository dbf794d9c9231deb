"""NAB (Numenta Anomaly Benchmark) series to streams, and the NAB score itself.

Loading follows the dataset's SOURCE.md: all 58 series, each its own device,
replayed once in file order (NAB scores by row; one file steps back in time
and keeps its order), labeled by the official windows of
`labels/combined_windows.json`; the first 15 % of each file (at most 750
rows) is NAB's probationary period: learned from, never scored.

Scoring implements NAB's published definition (Lavin & Ahmad, "Evaluating
Real-time Anomaly Detection Algorithms - the Numenta Anomaly Benchmark",
2015, and the v1.1 scorer):
- A detection inside a window earns the scaled sigmoid of its position in
  the window, rescaled so the window's first row earns exactly A_TP; only the
  best (earliest) detection of a window counts, later ones are ignored.
- A window without a detection costs A_FN.
- A detection outside every window costs A_FP times the scaled sigmoid of its
  distance past the window before it (a little right after a window, the
  full A_FP from three window widths on, and before the first window).
- Detections in the probationary period are not scored; nor are windows that
  end inside it.
- The corpus score is normalised so the null detector (no detections) scores
  0 and the perfect detector (every window caught on its first row) 100.

Known limit: NAB's own runner also optimises each detector's threshold on
the whole corpus before scoring; this project never tunes on a test set, so
detectors are scored at their own thresholds, and a detection here is the
start of an alarm (the row where a detector's flag turns on), which is when
the sidecar publishes a verdict.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from converters.tabular import LabeledStreams, parse_time, safe_device, to_message
from converters.ton_iot import LabeledMessage

__all__ = [
    "PROFILES",
    "CostProfile",
    "FileScore",
    "NabFile",
    "alarm_onsets",
    "corpus_score",
    "load_nab",
    "probation_rows",
    "scaled_sigmoid",
    "score_file",
]

_LOG = logging.getLogger(__name__)

TOPIC_PREFIX = "nab"
WINDOWS_FILE = Path("labels") / "combined_windows.json"
# NAB runner default `probationaryPercent`, capped at 15 % of 5000 rows by
# the v1.1 sweeper (`min(floor(0.15 * n), 0.15 * 5000)`).
PROBATION_SHARE = 0.15
PROBATION_CAP_ROWS = PROBATION_SHARE * 5000
# The scaled sigmoid's steepness and its floor distance, as published: the
# score is 2 * sigmoid(-5 x) - 1, and -1 from three window widths past a
# window on.
SIGMOID_STEEPNESS = 5.0
FAR_PAST_WINDOW = 3.0
# Row index spans [first, last] of each labeled window of a file.
Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class CostProfile:
    """Weights of one NAB application profile (A_TP, A_FP, A_FN)."""

    tp: float
    fp: float
    fn: float


# NAB's three published profiles (paper table 1; config/profiles.json of v1.1).
PROFILES: dict[str, CostProfile] = {
    "standard": CostProfile(tp=1.0, fp=0.11, fn=1.0),
    "reward_low_FP_rate": CostProfile(tp=1.0, fp=0.22, fn=1.0),
    "reward_low_FN_rate": CostProfile(tp=1.0, fp=0.11, fn=2.0),
}
# Keys the evaluation report uses for each profile's normalised score.
REPORT_KEYS = {
    "standard": "nab_standard",
    "reward_low_FP_rate": "nab_low_fp",
    "reward_low_FN_rate": "nab_low_fn",
}


@dataclass(frozen=True, slots=True)
class NabFile:
    """What the scorer needs of one series: its length and its windows."""

    rows: int
    windows: tuple[Span, ...]

    @property
    def probation(self) -> int:
        """Rows at the start that are never scored."""
        return probation_rows(self.rows)


@dataclass(frozen=True, slots=True)
class FileScore:
    """One file's raw score under one profile, with its counts."""

    raw: float
    detected: int
    missed: int
    false_positives: int


def probation_rows(rows: int) -> int:
    """Return the probationary period of a file of `rows` rows.

    >>> probation_rows(4032), probation_rows(22695)
    (604, 750)
    """
    return int(min(math.floor(PROBATION_SHARE * rows), PROBATION_CAP_ROWS))


def scaled_sigmoid(position: float) -> float:
    """NAB's reward for a detection at a relative position to a window.

    -1 is a window's first row, 0 its last, positive values lie past it in
    window widths.

    >>> round(scaled_sigmoid(-1.0), 5), scaled_sigmoid(0.0), scaled_sigmoid(3.0)
    (0.98661, 0.0, -1.0)
    """
    if position >= FAR_PAST_WINDOW:
        return -1.0
    return 2.0 / (1.0 + math.exp(SIGMOID_STEEPNESS * position)) - 1.0


def score_file(
    nab_file: NabFile, detections: Sequence[int], profile: CostProfile
) -> FileScore:
    """Score one file's detections (row indices) under one profile."""
    best_tp = scaled_sigmoid(-1.0)
    probation = nab_file.probation
    scorable = [w for w in nab_file.windows if w[1] >= probation]
    credit = dict.fromkeys(scorable, -profile.fn)
    fp_total = 0.0
    false_positives = 0
    for row in sorted(set(detections)):
        if row < probation or row >= nab_file.rows:
            continue
        inside = next((w for w in scorable if w[0] <= row <= w[1]), None)
        if inside is not None:
            width = inside[1] - inside[0] + 1
            position = -(inside[1] - row + 1) / width
            earned = scaled_sigmoid(position) * profile.tp / best_tp
            credit[inside] = max(credit[inside], earned)
            continue
        before = [w for w in nab_file.windows if w[1] < row]
        if before:
            last = max(before, key=lambda w: w[1])
            width = last[1] - last[0] + 1
            position = (row - last[1]) / max(width - 1, 1)
        else:
            position = FAR_PAST_WINDOW
        fp_total += scaled_sigmoid(position) * profile.fp
        false_positives += 1
    detected = sum(1 for window in scorable if credit[window] > -profile.fn)
    return FileScore(
        raw=sum(credit.values()) + fp_total,
        detected=detected,
        missed=len(scorable) - detected,
        false_positives=false_positives,
    )


def corpus_score(
    files: Mapping[str, NabFile],
    detections: Mapping[str, Sequence[int]],
    profile: CostProfile,
) -> float:
    """Return the normalised NAB score, 0 = null detector, 100 = perfect.

    The perfect score is A_TP for every labeled window, as NAB's runner
    counts it; the null score is what no detection at all earns.
    """
    raw = sum(
        score_file(nab_file, detections.get(name, ()), profile).raw
        for name, nab_file in files.items()
    )
    null = sum(score_file(nab_file, (), profile).raw for nab_file in files.values())
    perfect = profile.tp * sum(len(nab_file.windows) for nab_file in files.values())
    if perfect == null:
        return float("nan")
    return 100.0 * (raw - null) / (perfect - null)


def alarm_onsets(
    seqs: npt.NDArray[np.int64], flags: npt.NDArray[np.bool_]
) -> list[int]:
    """Rows where a flag turns on: the start of each run of flagged rows.

    `seqs` are one device's row positions in order; a gap in them (rows
    without a window) ends a run.

    >>> alarm_onsets(np.array([5, 6, 7, 9, 10]), np.array([1, 1, 0, 1, 1], bool))
    [5, 9]
    """
    onsets = []
    previous_row = -2
    previous_flag = False
    for row, flag in zip(seqs.tolist(), flags.tolist(), strict=True):
        if flag and not (previous_flag and row == previous_row + 1):
            onsets.append(int(row))
        previous_row, previous_flag = row, flag
    return onsets


def _load_series(path: Path) -> list[tuple[float, float]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"timestamp", "value"} <= set(
            reader.fieldnames
        ):
            message = f"{path}: needs timestamp and value columns"
            raise ValueError(message)
        return [(parse_time(row["timestamp"]), float(row["value"])) for row in reader]


def load_nab(folder: Path) -> tuple[LabeledStreams, dict[str, NabFile]]:
    """Load every series with its windows; the probation is learned, not scored.

    Returns:
        The streams, and per device what the NAB scorer needs.

    Raises:
        FileNotFoundError: If the data or the windows file is missing.
    """
    windows_path = folder / WINDOWS_FILE
    if not windows_path.is_file():
        message = f"no NAB windows file at {windows_path}"
        raise FileNotFoundError(message)
    labels: dict[str, list[list[str]]] = json.loads(windows_path.read_text("utf-8"))
    files = sorted((folder / "data").glob("*/*.csv"))
    if not files:
        message = f"no NAB series in {folder / 'data'}/*/*.csv"
        raise FileNotFoundError(message)

    streams: dict[str, list[LabeledMessage]] = {}
    nab_files: dict[str, NabFile] = {}
    for path in files:
        key = f"{path.parent.name}/{path.name}"
        device = safe_device(key)
        series = _load_series(path)
        times = np.array([time for time, _ in series])
        limits = [(parse_time(a), parse_time(b)) for a, b in labels.get(key, [])]
        spans = []
        inside = np.zeros(len(series), dtype=bool)
        for start, end in limits:
            rows = np.flatnonzero((times >= start) & (times <= end))
            if len(rows):
                spans.append((int(rows[0]), int(rows[-1])))
                inside[rows] = True
        streams[device] = [
            to_message(
                TOPIC_PREFIX,
                device,
                time,
                {"value": value},
                int(flag),
                "window" if flag else "normal",
            )
            for (time, value), flag in zip(series, inside.tolist(), strict=True)
        ]
        nab_files[device] = NabFile(rows=len(series), windows=tuple(spans))

    scored_from = {device: f.probation for device, f in nab_files.items()}
    _LOG.info(
        "nab loaded files=%d rows=%d windows=%d",
        len(files),
        sum(f.rows for f in nab_files.values()),
        sum(len(f.windows) for f in nab_files.values()),
    )
    data = LabeledStreams(
        dataset="nab",
        streams=streams,
        fit_streams={d: s[: scored_from[d]] for d, s in streams.items()},
        scored_from=scored_from,
        protocol=(
            "NAB v1.1, all 58 series, each one device replayed once in file "
            "order; windows from labels/combined_windows.json (a row is labeled "
            "anomalous inside a window); probationary period min(15 %, 750 rows) "
            "per file learned from and never scored; NAB score per published "
            "definition with the standard, reward_low_FP_rate and "
            "reward_low_FN_rate profiles, normalised null = 0, perfect = 100; "
            "a detection is an alarm onset; thresholds are each detector's own, "
            "not optimised on the corpus"
        ),
        windows={d: list(f.windows) for d, f in nab_files.items()},
    )
    return data, nab_files
