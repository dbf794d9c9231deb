"""Per-device windows, learned baselines and the features both models read.

This module is the one feature path: the live sidecar, training and
evaluation all turn messages into windows and features through it.

Each device keeps a rolling window of its last `window` messages (merged
readings per key, receive times, payload sizes, bad-payload flags) and a
baseline learned from its own history: per key a mean, spread and range; the
usual gap between messages and the usual payload size. Features are the
window measured against that baseline, so one model serves devices it has
never seen, and a quiet battery sensor is judged against its own rhythm.

How the baseline learns: every message of the first `warmup` is learned;
after that a message is learned only while all its readings lie within
`learn_z` spreads of the baseline, so an attack or a fault does not teach the
baseline that it is normal. The running statistics forget with a horizon of
`memory` messages, so slow drift is followed.

Known limits, in plain words:
- A key whose warm-up saw a single value (a door that stayed closed) has a
  spread of almost zero; its first change scores as far off as possible until
  the change has been seen often enough to be learned... which the gate above
  prevents when the change is rare. Such keys raise alarms on their first
  genuine change.
- A device that sends more keys than `max_keys` has the extra keys ignored
  (counted in `DeviceState.dropped_keys`).
- Only the `cnn_value_channels` keys that stray furthest in a window reach the
  CNN; the RandomForest sees every key through max and mean aggregates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from sidecar.payload import PayloadKind, Readings

__all__ = [
    "CNN_CHANNELS",
    "CNN_CHANNEL_GROUPS",
    "FEATURE_GROUPS",
    "FEATURE_NAMES",
    "DeviceState",
    "FeatureSpec",
    "KeyDeviation",
    "WindowFeatures",
]

FloatArray = npt.NDArray[np.float32]

# Per-key features; each is aggregated over a device's keys by max and mean.
_KEY_FEATURES = (
    "abs_z_last",  # |last reading - baseline mean| / baseline spread
    "abs_z_mean",  # |window mean - baseline mean| / baseline spread
    "z_max",  # largest |z| in the window
    "log_spread_ratio",  # log(window spread / baseline spread)
    "out_of_range",  # share of window readings outside the learned range
    "change_rate_diff",  # share of changing readings minus the learned share
    "missing_share",  # share of rows where the key reported a failed reading
    "jump_z",  # |last - previous| / baseline spread
    "log_step_ratio",  # log(window mean step / learned mean step)
    # Shape of the window itself, free of any baseline or unit:
    "change_share",  # share of consecutive readings that differ
    "distinct_share",  # distinct readings / readings
    "lag1_autocorrelation",  # smooth signals near 1, noise near 0
    "step_to_range",  # mean step / window range: jumpy near 1, smooth near 0
    "longest_run_share",  # longest run of one repeated reading / readings
)
_SHAPE_KEY_FEATURES = frozenset(
    {
        "missing_share",
        "change_share",
        "distinct_share",
        "lag1_autocorrelation",
        "step_to_range",
        "longest_run_share",
    }
)
_GLOBAL_FEATURES = (("bad_payload_share", "shape"), ("new_key_share", "level"))
_TIMING_FEATURES = ("gap_z_last", "gap_z_mean", "log_rate_ratio")
_SIZE_FEATURES = ("size_z_last", "size_z_mean")

FEATURE_NAMES: tuple[str, ...] = (
    tuple(f"max_{name}" for name in _KEY_FEATURES)
    + tuple(f"mean_{name}" for name in _KEY_FEATURES)
    + tuple(name for name, _ in _GLOBAL_FEATURES)
    + _TIMING_FEATURES
    + _SIZE_FEATURES
)
# Groups a model can be trained without: `level` compares readings with the
# learned baseline, `shape` describes the window itself, `timing` the gaps
# between messages and `size` the payload sizes.
FEATURE_GROUPS: dict[str, str] = {
    **{
        f"{agg}_{name}": "shape" if name in _SHAPE_KEY_FEATURES else "level"
        for agg in ("max", "mean")
        for name in _KEY_FEATURES
    },
    **dict(_GLOBAL_FEATURES),
    **dict.fromkeys(_TIMING_FEATURES, "timing"),
    **dict.fromkeys(_SIZE_FEATURES, "size"),
}
CNN_CHANNELS: tuple[str, ...] = (
    "value_dev_0",
    "value_dev_1",
    "value_dev_2",
    "value_dev_3",
    "missing",
    "bad_payload",
    "gap_z",
    "size_z",
)
CNN_CHANNEL_GROUPS: dict[str, str] = {
    **dict.fromkeys(CNN_CHANNELS[:6], "shape"),
    "gap_z": "timing",
    "size_z": "size",
}
_CNN_VALUE_CHANNELS = 4

# Bounds that keep every model input finite and on a comparable scale. 50
# spreads is far beyond anything normal; the CNN sees a tighter clip because
# its convolutions sum neighbouring values.
FEATURE_CLIP = 50.0
CNN_CLIP = 10.0
# A spread is never taken as smaller than this share of the learned range or
# of the mean's magnitude, so quantised sensors (ESPHome rounds to the
# configured decimals) do not turn one step into a huge deviation.
RANGE_SPREAD_FLOOR = 0.01
MEAN_SPREAD_FLOOR = 1e-3
ABSOLUTE_SPREAD_FLOOR = 1e-6
# Readings within this share of the learned range beyond its ends still count
# as in range.
RANGE_MARGIN = 0.05
# Readings are clipped to this magnitude before they are stored or learned,
# so squares and products stay finite in float64 (a hostile 1e300 would
# otherwise make a key's spread infinite for good). No sensor reading in the
# payload survey comes near it; energy counters reach about 1e9.
MAX_READING = 1e12
# Message gaps below a millisecond are one burst; the log needs a floor.
MIN_GAP_S = 1e-3
_BAD_KINDS = frozenset(
    {PayloadKind.UNPARSABLE, PayloadKind.BINARY, PayloadKind.OVERSIZED}
)


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    """How windows and baselines are built; fixed when a model is trained.

    Attributes:
        window: Messages per window.
        warmup: Messages learned unconditionally before any scoring.
        memory: Horizon, in messages, of the baseline's running statistics.
        learn_z: After warm-up, a message is learned only within this many
            spreads of the baseline.
        max_keys: Numeric keys tracked per device.
        disabled_groups: Feature groups (`level`, `shape`, `timing`, `size`)
            zeroed for models trained on data where that group leaks the label
            or does not carry over to new data.
    """

    window: int = 32
    warmup: int = 128
    memory: int = 2000
    learn_z: float = 4.0
    max_keys: int = 32
    disabled_groups: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as a JSON-ready mapping for a model card."""
        return {
            "window": self.window,
            "warmup": self.warmup,
            "memory": self.memory,
            "learn_z": self.learn_z,
            "max_keys": self.max_keys,
            "disabled_groups": list(self.disabled_groups),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureSpec:
        """Build a spec from a model card's mapping."""
        return cls(
            window=int(data["window"]),
            warmup=int(data["warmup"]),
            memory=int(data["memory"]),
            learn_z=float(data["learn_z"]),
            max_keys=int(data["max_keys"]),
            disabled_groups=tuple(data.get("disabled_groups", ())),
        )

    def feature_mask(self) -> FloatArray:
        """Return 1 for each enabled RandomForest feature and 0 otherwise."""
        return np.array(
            [
                FEATURE_GROUPS[name] not in self.disabled_groups
                for name in FEATURE_NAMES
            ],
            dtype=np.float32,
        )

    def channel_mask(self) -> FloatArray:
        """Return 1 for each enabled CNN channel and 0 otherwise."""
        return np.array(
            [
                CNN_CHANNEL_GROUPS[name] not in self.disabled_groups
                for name in CNN_CHANNELS
            ],
            dtype=np.float32,
        )


@dataclass(frozen=True, slots=True)
class KeyDeviation:
    """How far one key's latest reading is from its device's baseline."""

    key: str
    value: float
    mean: float
    spread: float
    z: float


@dataclass(frozen=True, slots=True)
class WindowFeatures:
    """The model inputs for one updated window.

    Attributes:
        vector: RandomForest features, float32, in `FEATURE_NAMES` order.
        window: CNN input, float32, shape (len(CNN_CHANNELS), spec.window).
    """

    vector: FloatArray
    window: FloatArray


class _Stats:
    """Exponentially forgetting mean and variance (West's weighted update)."""

    __slots__ = ("hi", "lo", "m2", "mean", "n")

    def __init__(self) -> None:
        self.n = 0.0
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf

    def learn(self, value: float, memory: int) -> None:
        self.n = min(self.n + 1.0, float(memory))
        delta = value - self.mean
        self.mean += delta / self.n
        self.m2 = self.m2 * (1.0 - 1.0 / self.n) + delta * (value - self.mean)
        self.m2 = max(self.m2, 0.0)
        self.lo = min(self.lo, value)
        self.hi = max(self.hi, value)

    def spread(self) -> float:
        variance = self.m2 / max(self.n - 1.0, 1.0) if self.n > 1 else 0.0
        floor = max(
            RANGE_SPREAD_FLOOR * (self.hi - self.lo) if self.n else 0.0,
            MEAN_SPREAD_FLOOR * abs(self.mean),
            ABSOLUTE_SPREAD_FLOOR,
        )
        return max(math.sqrt(variance), floor)


@dataclass(slots=True)
class _KeyBaseline:
    stats: _Stats = field(default_factory=_Stats)
    steps: _Stats = field(default_factory=_Stats)
    change_rate: float = 0.0


class DeviceState:
    """One device's rolling window and learned baseline.

    >>> from sidecar.payload import parse_payload
    >>> state = DeviceState(FeatureSpec(window=4, warmup=4))
    >>> for second, temp in enumerate([20.0, 20.5, 20.2, 20.4, 20.1, 35.0]):
    ...     state.update(parse_payload(str(temp).encode()), 3, float(second))
    >>> state.ready
    True
    >>> features = state.features()
    >>> features.vector.shape, features.window.shape
    ((35,), (8, 4))
    >>> round(state.deviations()[0].z)
    97
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self.seen = 0
        self.dropped_keys = 0
        self._keys: dict[str, int] = {}
        self._names: list[str] = []
        self._current = np.empty(0)
        self._values = np.empty((spec.window, 0))
        self._missing = np.zeros((spec.window, 0), dtype=bool)
        self._times = np.zeros(spec.window)
        self._sizes = np.zeros(spec.window)
        self._bad = np.zeros(spec.window, dtype=bool)
        self._pos = 0
        self._key_baselines: list[_KeyBaseline] = []
        self._gap = _Stats()
        self._size = _Stats()
        self._last_time: float | None = None

    @property
    def ready(self) -> bool:
        """Whether warm-up is over and the window is full, so it can be scored."""
        return self.seen > max(self.spec.warmup, self.spec.window)

    def update(self, readings: Readings, size: int, received_at: float) -> None:
        """Add one message to the window, then learn from it if it looks usual."""
        for key, value in readings.values.items():
            index = self._key_index(key)
            if index is not None:
                self._current[index] = min(max(value, -MAX_READING), MAX_READING)
        for key in readings.missing:
            index = self._key_index(key)
            if index is not None:
                self._current[index] = np.nan
        missing_now = np.zeros(len(self._names), dtype=bool)
        for key in readings.missing:
            index = self._keys.get(key)
            if index is not None:
                missing_now[index] = True

        gap = received_at - self._last_time if self._last_time is not None else math.nan
        self._last_time = received_at
        slot = self._pos
        self._values[slot] = self._current
        self._missing[slot] = missing_now
        self._times[slot] = received_at
        self._sizes[slot] = float(size)
        self._bad[slot] = readings.kind in _BAD_KINDS
        self._pos = (slot + 1) % self.spec.window
        self.seen += 1
        self._learn(readings, size, gap)

    def _key_index(self, key: str) -> int | None:
        index = self._keys.get(key)
        if index is not None:
            return index
        if len(self._names) >= self.spec.max_keys:
            self.dropped_keys += 1
            return None
        index = len(self._names)
        self._keys[key] = index
        self._names.append(key)
        self._current = np.append(self._current, np.nan)
        self._values = np.hstack([self._values, np.full((self.spec.window, 1), np.nan)])
        self._missing = np.hstack(
            [self._missing, np.zeros((self.spec.window, 1), dtype=bool)]
        )
        self._key_baselines.append(_KeyBaseline())
        return index

    def _learn(self, readings: Readings, size: int, gap: float) -> None:
        spec = self.spec
        warming = self.seen <= spec.warmup
        if not warming and not self._usual(readings, size, gap):
            return
        previous = self._values[(self._pos - 2) % spec.window]
        for key in readings.values:
            index = self._keys.get(key)
            if index is None:
                continue
            value = float(self._current[index])
            baseline = self._key_baselines[index]
            baseline.stats.learn(value, spec.memory)
            if math.isnan(previous[index]):
                continue
            step = abs(value - previous[index])
            baseline.steps.learn(step, spec.memory)
            weight = 1.0 / baseline.steps.n
            baseline.change_rate += weight * (float(step > 0) - baseline.change_rate)
        if not math.isnan(gap):
            self._gap.learn(math.log(max(gap, MIN_GAP_S)), spec.memory)
        self._size.learn(float(size), spec.memory)

    def _usual(self, readings: Readings, size: int, gap: float) -> bool:
        # A reading is usual when its level or its step from the previous
        # reading is within `learn_z` spreads: slow drift (a tracker moving, a
        # room warming) is followed, while jumps and far-off levels are not.
        limit = self.spec.learn_z
        if limit <= 0:
            return False
        previous = self._values[(self._pos - 2) % self.spec.window]
        for key in readings.values:
            index = self._keys.get(key)
            if index is None:
                continue
            value = float(self._current[index])
            baseline = self._key_baselines[index]
            stats = baseline.stats
            if stats.n < 2:
                return False
            if abs(value - stats.mean) <= limit * stats.spread():
                continue
            step = abs(value - previous[index])
            steps = baseline.steps
            if math.isnan(step) or steps.n < 2:
                return False
            if abs(step - steps.mean) > limit * steps.spread():
                return False
        # A disabled group must not steer learning either: a model trained
        # without timing would otherwise still depend on when messages came.
        disabled = self.spec.disabled_groups
        size_off = abs(size - self._size.mean) > limit * self._size.spread()
        if "size" not in disabled and size_off:
            return False
        if math.isnan(gap) or "timing" in disabled:
            return True
        log_gap = math.log(max(gap, MIN_GAP_S))
        return abs(log_gap - self._gap.mean) <= limit * self._gap.spread()

    def _ordered(self) -> tuple[npt.NDArray[np.float64], ...]:
        order = (np.arange(self.spec.window) + self._pos) % self.spec.window
        return (
            self._values[order],
            self._missing[order].astype(np.float64),
            self._times[order],
            self._sizes[order],
            self._bad[order].astype(np.float64),
        )

    def features(self) -> WindowFeatures:
        """Compute both models' inputs for the window as it stands now."""
        spec = self.spec
        values, missing, times, sizes, bad = self._ordered()
        learned = np.array([b.stats.n >= 2 for b in self._key_baselines], dtype=bool)
        present = learned & ~np.all(np.isnan(values), axis=0)
        per_key = self._per_key_features(
            values[:, present], missing[:, present], present
        )

        vector = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
        n_key = len(_KEY_FEATURES)
        if per_key.shape[0]:
            vector[:n_key] = per_key.max(axis=0)
            vector[n_key : 2 * n_key] = per_key.mean(axis=0)
        vector[2 * n_key] = bad.mean()
        reporting = ~np.isnan(values[-1])
        vector[2 * n_key + 1] = (
            float(np.mean(~learned[reporting])) if reporting.any() else 0.0
        )

        gap_z = self._gap_z(times)
        size_z = (sizes - self._size.mean) / self._size.spread()
        base = 2 * n_key + 2
        vector[base] = gap_z[-1]
        vector[base + 1] = gap_z[1:].mean()
        mean_gap = max(float(np.mean(np.diff(times))), MIN_GAP_S)
        vector[base + 2] = self._gap.mean - math.log(mean_gap)
        vector[base + 3] = size_z[-1]
        vector[base + 4] = size_z.mean()
        vector = np.clip(np.nan_to_num(vector), -FEATURE_CLIP, FEATURE_CLIP)

        window = np.zeros((len(CNN_CHANNELS), spec.window), dtype=np.float64)
        if present.any():
            z = _window_standardised(values[:, present])
            strongest = np.argsort(-np.abs(z).max(axis=0), kind="stable")
            top = strongest[:_CNN_VALUE_CHANNELS]
            window[: len(top)] = z[:, top].T
        window[4] = missing.any(axis=1) if missing.shape[1] else 0.0
        window[5] = bad
        window[6] = gap_z
        window[7] = size_z
        window = np.clip(np.nan_to_num(window), -CNN_CLIP, CNN_CLIP)

        return WindowFeatures(
            (vector * spec.feature_mask()).astype(np.float32),
            (window * spec.channel_mask()[:, None]).astype(np.float32),
        )

    def _gap_z(self, times: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        gaps = np.diff(times, prepend=times[0])
        log_gaps = np.log(np.maximum(gaps, MIN_GAP_S))
        z = (log_gaps - self._gap.mean) / self._gap.spread()
        z[0] = 0.0
        return z

    def _per_key_features(
        self,
        values: npt.NDArray[np.float64],
        missing: npt.NDArray[np.float64],
        present: npt.NDArray[np.bool_],
    ) -> npt.NDArray[np.float64]:
        baselines = [
            b for b, keep in zip(self._key_baselines, present, strict=True) if keep
        ]
        if not baselines:
            return np.zeros((0, len(_KEY_FEATURES)))
        means = np.array([b.stats.mean for b in baselines])
        spreads = np.array([b.stats.spread() for b in baselines])
        lows = np.array([b.stats.lo for b in baselines])
        highs = np.array([b.stats.hi for b in baselines])
        change_rates = np.array([b.change_rate for b in baselines])
        step_means = np.array([b.steps.mean for b in baselines])

        z = (values - means) / spreads
        abs_z = np.abs(z)
        observed = ~np.isnan(values)
        counts = np.maximum(observed.sum(axis=0), 1)
        last = np.nan_to_num(abs_z[-1])
        mean_z = np.abs(np.nansum(np.where(observed, z, 0.0), axis=0) / counts)
        max_z = np.nanmax(np.where(observed, abs_z, 0.0), axis=0)
        window_spread = np.sqrt(
            np.nansum(
                np.where(observed, (values - np.nanmean(values, axis=0)) ** 2, 0.0),
                axis=0,
            )
            / counts
        )
        spread_ratio = np.log((window_spread + spreads) / (2.0 * spreads))
        margin = RANGE_MARGIN * (highs - lows) + spreads
        outside = observed & ((values < lows - margin) | (values > highs + margin))
        out_of_range = outside.sum(axis=0) / counts
        steps = observed[1:] & observed[:-1]
        changed = steps & (values[1:] != values[:-1])
        change_share = changed.sum(axis=0) / np.maximum(steps.sum(axis=0), 1)
        jump = np.nan_to_num(np.abs(values[-1] - values[-2]) / spreads)
        step_sizes = np.where(steps, np.abs(values[1:] - values[:-1]), 0.0)
        mean_step = step_sizes.sum(axis=0) / np.maximum(steps.sum(axis=0), 1)
        step_ratio = np.log((mean_step + spreads) / (step_means + spreads))
        shape = np.array([_window_shape(values[:, k]) for k in range(values.shape[1])])

        base = np.stack(
            [
                last,
                mean_z,
                max_z,
                spread_ratio,
                out_of_range,
                change_share - change_rates,
                missing.mean(axis=0),
                jump,
                step_ratio,
                change_share,
            ],
            axis=1,
        )
        return np.hstack([base, shape])

    def deviations(self, limit: int = 3) -> list[KeyDeviation]:
        """Return the keys whose latest readings stray furthest from baseline."""
        latest = self._values[(self._pos - 1) % self.spec.window]
        found = []
        for index, key in enumerate(self._names):
            stats = self._key_baselines[index].stats
            value = float(latest[index])
            if stats.n < 2 or math.isnan(value):
                continue
            spread = stats.spread()
            z = (value - stats.mean) / spread
            found.append(KeyDeviation(key, value, stats.mean, spread, z))
        found.sort(key=lambda deviation: -abs(deviation.z))
        return found[:limit]

    def cadence(self) -> tuple[float, float]:
        """Return the latest message gap and the learned typical gap, seconds."""
        order = (self._pos - 1) % self.spec.window
        previous = (self._pos - 2) % self.spec.window
        latest_gap = float(self._times[order] - self._times[previous])
        return latest_gap, math.exp(self._gap.mean) if self._gap.n else math.nan


def _window_shape(column: npt.NDArray[np.float64]) -> tuple[float, float, float, float]:
    """Distinct share, lag-1 autocorrelation, step-to-range and longest run."""
    observed = column[~np.isnan(column)]
    count = len(observed)
    if count < 2:
        return (1.0, 0.0, 0.0, 1.0)
    distinct = len(np.unique(observed)) / count
    value_range = float(observed.max() - observed.min())
    steps = np.abs(np.diff(observed))
    step_to_range = float(steps.mean()) / value_range if value_range > 0 else 0.0
    centred = observed - observed.mean()
    energy = float(centred @ centred)
    autocorrelation = float(centred[1:] @ centred[:-1]) / energy if energy > 0 else 1.0
    run = longest = 1
    for step in steps:
        run = run + 1 if step == 0 else 1
        longest = max(longest, run)
    return (distinct, autocorrelation, step_to_range, longest / count)


def _window_standardised(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Centre each key on the window's median and scale by the window's spread.

    The CNN then sees the shape of the window (a spike, a step, a flat run,
    chatter) in the same units on every device, whatever the baseline.
    """
    centred = values - np.nanmedian(values, axis=0)
    spread = np.nanstd(values, axis=0)
    scaled: npt.NDArray[np.float64] = np.nan_to_num(
        centred / np.maximum(spread, ABSOLUTE_SPREAD_FLOOR)
    )
    return scaled
