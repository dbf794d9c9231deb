"""Baselines scored beside the hybrid, on the same windows and the same split.

- `iforest`: scikit-learn's IsolationForest over the RandomForest's window
  features (the vectors the shipped RF reads), one forest per device.
- `hst`: River's HalfSpaceTrees on each message's readings, one per device,
  learned on the stream's start (River's default size: 10 trees of height 8,
  reference window of 250 messages, or half the fit part when shorter).
- `zscore`: a rule: per key, the reading's distance from the mean of that
  key's previous 128 readings, in their standard deviations; a message scores
  the largest over its keys.

Every baseline learns only from the dataset's fit part (`fit_streams`: a
stream's start, or a training split), and its threshold is chosen there too,
never on scored labels: the 0.99 quantile of its own scores on the fit part,
per device when the device has at least 32 fit windows, else pooled over all
devices (a device with so short a fit part is also judged by a forest or
trees learned on every device's fit part). Where the fit part is a labeled
training split, only its normal messages are learned from.

Known limits, in plain words:
- IsolationForest and the z-score rule see values only through the shipped
  RF's features and raw readings respectively; neither uses timing.
- HalfSpaceTrees is frozen after its fit part, like the shipped models; it
  does not follow drift in the scored part.
- Thresholds from in-sample fit scores are optimistic: more than 1 % of
  normal scored windows usually exceed them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt
from river import anomaly
from sklearn.ensemble import IsolationForest

from converters.dataset import WindowSet
from converters.tabular import LabeledStreams
from converters.ton_iot import LabeledMessage
from sidecar.payload import parse_payload

__all__ = [
    "BASELINES",
    "FIT_QUANTILE",
    "BaselineResult",
    "run_baselines",
    "zscore_scores",
]

_LOG = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
BASELINES = ("iforest", "hst", "zscore")
# The threshold of every baseline: this quantile of its own scores on the fit
# part, i.e. a false-alarm budget of 1 % of fit windows, the usual control
# limit of SKAB's leaderboard baselines. Fixed, never tuned on scored data.
FIT_QUANTILE = 0.99
# A device needs this many fit windows (one window length of the shipped
# models) for a model and a threshold of its own; fewer use pooled ones.
MIN_FIT = 32
# Readings a z-score is measured against: as many as the sidecar's warm-up.
ZSCORE_HISTORY = 128
# A spread needs two readings.
ZSCORE_MIN_HISTORY = 2
# A key's spread is never taken below this share of its mean's magnitude, or
# below the absolute floor, so a constant key does not divide by zero (the
# same floors as sidecar/features.py).
ZSCORE_MEAN_FLOOR = 1e-3
ZSCORE_ABSOLUTE_FLOOR = 1e-6
# HalfSpaceTrees splits inside per-key limits: the fit part's range widened by
# this share on each side, so readings a little outside it still split.
HST_LIMIT_MARGIN = 0.1
IFOREST_TREES = 100
# River's default reference window of HalfSpaceTrees, in messages.
HST_WINDOW = 250


@dataclass(frozen=True)
class BaselineResult:
    """One baseline's view of every window: scores, flags, how it decided."""

    scores: FloatArray
    flags: npt.NDArray[np.bool_]
    threshold: str


def _readings(messages: Sequence[LabeledMessage]) -> list[dict[str, float]]:
    return [parse_payload(item.message.payload).values for item in messages]


def _fit_part(
    data: LabeledStreams, device: str
) -> tuple[list[LabeledMessage], list[LabeledMessage]]:
    """Return (messages learned from, messages whose scores set the threshold)."""
    fit = data.fit_streams.get(device, [])
    learned = [item for item in fit if item.label == 0] if data.fit_normal_only else fit
    return learned, fit


def _quantile(scores: FloatArray) -> float:
    return float(np.quantile(scores, FIT_QUANTILE)) if len(scores) else np.inf


def _per_window(windows: WindowSet, per_device: Mapping[str, FloatArray]) -> FloatArray:
    """Pick each window's score from its device's per-message scores."""
    scores = np.zeros(len(windows))
    for device, values in per_device.items():
        rows = np.flatnonzero(windows.devices == device)
        scores[rows] = values[windows.seqs[rows]]
    return scores


def _thresholds(
    fit_scores: Mapping[str, FloatArray], pooled: FloatArray | None = None
) -> tuple[dict[str, float], float]:
    everything = (
        pooled
        if pooled is not None
        else np.concatenate([*fit_scores.values(), np.zeros(0)])
    )
    shared = _quantile(everything)
    own = {
        device: _quantile(scores)
        for device, scores in fit_scores.items()
        if len(scores) >= MIN_FIT
    }
    return own, shared


def _decide(
    windows: WindowSet,
    scores: FloatArray,
    own: Mapping[str, float],
    shared: float,
) -> npt.NDArray[np.bool_]:
    limits = np.array([own.get(str(device), shared) for device in windows.devices])
    return np.asarray(scores > limits) if len(scores) else np.zeros(0, dtype=bool)


def _iforest(
    data: LabeledStreams, windows: WindowSet, fit: WindowSet, seed: int
) -> BaselineResult:
    learnable = (fit.labels == 0) if data.fit_normal_only else np.ones(len(fit), bool)

    def forest(rows: npt.NDArray[np.bool_]) -> IsolationForest | None:
        if not rows.any():
            return None
        model = IsolationForest(n_estimators=IFOREST_TREES, random_state=seed)
        return model.fit(fit.vectors[rows])

    pooled = forest(learnable)
    scores = np.zeros(len(windows))
    fit_scores: dict[str, FloatArray] = {}
    pooled_fit = (
        -pooled.score_samples(fit.vectors[learnable]) if pooled else np.zeros(0)
    )
    for device in np.unique(windows.devices).tolist():
        own_rows = learnable & (fit.devices == device)
        model = forest(own_rows) if own_rows.sum() >= MIN_FIT else pooled
        rows = windows.devices == device
        if model is None:
            continue
        scores[rows] = -model.score_samples(windows.vectors[rows])
        if model is not pooled:
            fit_scores[device] = -model.score_samples(fit.vectors[own_rows])
    own, shared = _thresholds(fit_scores, pooled_fit)
    return BaselineResult(
        scores,
        _decide(windows, scores, own, shared),
        f"{FIT_QUANTILE} quantile of in-sample scores on the fit part "
        f"({len(own)} devices own, others pooled)",
    )


def _limits(
    readings: Sequence[dict[str, float]],
) -> dict[Hashable, tuple[float, float]]:
    keys = {key for values in readings for key in values}
    limits: dict[Hashable, tuple[float, float]] = {}
    for key in keys:
        column = [values[key] for values in readings if key in values]
        low, high = min(column), max(column)
        margin = HST_LIMIT_MARGIN * max(high - low, abs(high), 1.0)
        limits[key] = (low - margin, high + margin)
    return limits


class _Trees(Protocol):
    """The part of River's HalfSpaceTrees used here (River ships no stubs)."""

    def learn_one(self, x: dict[str, float]) -> None: ...

    def score_one(self, x: dict[str, float]) -> float: ...


def _trees(readings: Sequence[dict[str, float]], seed: int) -> _Trees:
    # The trees score 0 until a full reference window has been learned, so a
    # short fit part gets a shorter window (at least two fit in it).
    size = max(1, min(HST_WINDOW, len(readings) // 2))
    trees = anomaly.HalfSpaceTrees(
        window_size=size, limits=_limits(readings), seed=seed
    )
    model = cast(_Trees, trees)
    for values in readings:
        if values:
            model.learn_one(values)
    return model


def _score_all(model: _Trees, readings: Sequence[dict[str, float]]) -> FloatArray:
    return np.array([model.score_one(v) if v else 0.0 for v in readings])


def _hst(
    data: LabeledStreams, windows: WindowSet, warmup: int, seed: int
) -> BaselineResult:
    learned = {d: _readings(_fit_part(data, d)[0]) for d in data.streams}
    pooled_readings = [values for part in learned.values() for values in part]
    pooled = _trees(pooled_readings, seed) if pooled_readings else None
    per_message: dict[str, FloatArray] = {}
    fit_scores: dict[str, FloatArray] = {}
    pooled_fit: list[FloatArray] = []
    for device, stream in data.streams.items():
        own = len(learned[device]) - warmup >= MIN_FIT
        model = _trees(learned[device], seed) if own else pooled
        if model is None:
            per_message[device] = np.zeros(len(stream))
            continue
        per_message[device] = _score_all(model, _readings(stream))
        fit_part = _score_all(model, _readings(_fit_part(data, device)[1]))[warmup:]
        if own:
            fit_scores[device] = fit_part
        else:
            pooled_fit.append(fit_part)
    scores = _per_window(windows, per_message)
    own_limits, shared = _thresholds(
        fit_scores, np.concatenate(pooled_fit) if pooled_fit else None
    )
    return BaselineResult(
        scores,
        _decide(windows, scores, own_limits, shared),
        f"{FIT_QUANTILE} quantile of in-sample scores on the fit part "
        f"({len(own_limits)} devices own, others pooled)",
    )


def zscore_scores(readings: Sequence[dict[str, float]]) -> FloatArray:
    """Score each message: its largest per-key z against the previous readings.

    >>> zscore_scores([{"t": 1.0}, {"t": 3.0}, {"t": 5.0}]).tolist()
    [0.0, 0.0, 3.0]
    """
    history: dict[str, deque[float]] = {}
    scores = np.zeros(len(readings))
    for position, values in enumerate(readings):
        worst = 0.0
        for key, value in values.items():
            past = history.setdefault(key, deque(maxlen=ZSCORE_HISTORY))
            if len(past) >= ZSCORE_MIN_HISTORY:
                mean = float(np.mean(past))
                spread = max(
                    float(np.std(past)),
                    ZSCORE_MEAN_FLOOR * abs(mean),
                    ZSCORE_ABSOLUTE_FLOOR,
                )
                worst = max(worst, abs(value - mean) / spread)
            past.append(value)
        scores[position] = worst
    return scores


def _zscore(data: LabeledStreams, windows: WindowSet, warmup: int) -> BaselineResult:
    per_message = {d: zscore_scores(_readings(s)) for d, s in data.streams.items()}
    fit_scores = {
        device: zscore_scores(_readings(fit))[warmup:]
        for device, fit in data.fit_streams.items()
    }
    scores = _per_window(windows, per_message)
    own, shared = _thresholds(fit_scores)
    return BaselineResult(
        scores,
        _decide(windows, scores, own, shared),
        f"{FIT_QUANTILE} quantile of scores on the fit part "
        f"({len(own)} devices own, others pooled)",
    )


def run_baselines(
    data: LabeledStreams,
    windows: WindowSet,
    fit_windows: WindowSet,
    warmup: int,
    seed: int = 0,
) -> dict[str, BaselineResult]:
    """Score every baseline on `windows`, learning only from the fit part.

    Args:
        data: The dataset's streams, fit part and protocol flags.
        windows: The windows every detector is scored on (all of `streams`).
        fit_windows: The windows of `data.fit_streams`.
        warmup: Messages of a stream before its first window; fit scores of
            per-message baselines start there, as the windowed ones do.
        seed: Seed of the forests and trees.
    """
    results = {
        "iforest": _iforest(data, windows, fit_windows, seed),
        "hst": _hst(data, windows, warmup, seed),
        "zscore": _zscore(data, windows, warmup),
    }
    for name, result in results.items():
        _LOG.info(
            "baseline scored name=%s windows=%d flagged=%d",
            name,
            len(result.scores),
            int(result.flags.sum()),
        )
    return results
