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
from collections.abc import Sequence
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
    "WindowSnapshot",
    "batch_features",
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
# Columns of a snapshot's key table: the learned statistics features read.
_TABLE_COLUMNS = ("n", "mean", "m2", "lo", "hi", "change_rate", "step_mean")
_N, _MEAN, _M2, _LO, _HI, _CHANGE_RATE, _STEP_MEAN = range(len(_TABLE_COLUMNS))
# Shape features of a key with fewer than two readings in its window: one
# distinct reading, no correlation, no steps, one run covering it all.
_SHORT_WINDOW_SHAPE = (1.0, 0.0, 0.0, 1.0)

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


@dataclass(frozen=True, slots=True)
class WindowSnapshot:
    """One device's window and baseline, frozen when its message arrived.

    A batch can hold several messages of one device; each is scored on the
    window that ended with it, so the window is copied, not referenced.
    Arrays are the device's ring buffers as stored: row `start` is the oldest.

    Attributes:
        spec: The device's feature spec.
        start: Ring position of the oldest row.
        values: Readings per row and key, NaN where a key has none yet.
        missing: Where a key reported a failed reading.
        times: Receive time per row, seconds.
        sizes: Payload size per row, bytes.
        bad: Where the payload was unusable.
        key_table: Per key the learned statistics, columns `_TABLE_COLUMNS`.
        gap_mean: Learned mean of log message gaps.
        gap_spread: Learned spread of log message gaps.
        size_mean: Learned mean payload size.
        size_spread: Learned spread of payload sizes.
    """

    spec: FeatureSpec
    start: int
    values: npt.NDArray[np.float64]
    missing: npt.NDArray[np.bool_]
    times: npt.NDArray[np.float64]
    sizes: npt.NDArray[np.float64]
    bad: npt.NDArray[np.bool_]
    key_table: npt.NDArray[np.float64]
    gap_mean: float
    gap_spread: float
    size_mean: float
    size_spread: float


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
        # Comparisons instead of the min and max builtins: the same results
        # (NaN included) at a fraction of the cost on this per-message path.
        n = self.n + 1.0
        if memory < n:
            n = float(memory)
        self.n = n
        delta = value - self.mean
        self.mean += delta / n
        m2 = self.m2 * (1.0 - 1.0 / n) + delta * (value - self.mean)
        self.m2 = 0.0 if m2 < 0.0 else m2
        if value < self.lo:
            self.lo = value
        if value > self.hi:
            self.hi = value

    def spread(self) -> float:
        n = self.n
        variance = 0.0
        if n > 1:
            divisor = n - 1.0
            variance = self.m2 / (1.0 if divisor < 1.0 else divisor)
        floor = RANGE_SPREAD_FLOOR * (self.hi - self.lo) if n else 0.0
        by_mean = MEAN_SPREAD_FLOOR * abs(self.mean)
        if by_mean > floor:
            floor = by_mean
        if floor < ABSOLUTE_SPREAD_FLOOR:
            floor = ABSOLUTE_SPREAD_FLOOR
        spread = math.sqrt(variance)
        return floor if floor > spread else spread


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
        # Whether a snapshot shares the ring buffers (see `snapshot`).
        self._lent = False
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
        if self._lent:
            self._unlend()
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
        # Python floats, not numpy scalars: the arithmetic below is the same
        # IEEE double arithmetic either way, and several times faster on floats.
        current: list[float] = self._current.tolist()
        previous: list[float] = self._values[(self._pos - 2) % spec.window].tolist()
        warming = self.seen <= spec.warmup
        if not warming and not self._usual(readings, size, gap, current, previous):
            return
        for key in readings.values:
            index = self._keys.get(key)
            if index is None:
                continue
            value = current[index]
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

    def _usual(
        self,
        readings: Readings,
        size: int,
        gap: float,
        current: list[float],
        previous: list[float],
    ) -> bool:
        # A reading is usual when its level or its step from the previous
        # reading is within `learn_z` spreads: slow drift (a tracker moving, a
        # room warming) is followed, while jumps and far-off levels are not.
        limit = self.spec.learn_z
        if limit <= 0:
            return False
        for key in readings.values:
            index = self._keys.get(key)
            if index is None:
                continue
            value = current[index]
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

    def _unlend(self) -> None:
        """Give the state its own ring buffers; a snapshot keeps the old ones."""
        self._values = self._values.copy()
        self._missing = self._missing.copy()
        self._times = self._times.copy()
        self._sizes = self._sizes.copy()
        self._bad = self._bad.copy()
        self._lent = False

    def release(self) -> None:
        """Say that no snapshot taken so far is read any more.

        The next `update` then writes the ring buffers in place instead of
        copying them first. Only the caller that took the snapshots knows
        when they are done with (the pipeline, after scoring a batch).
        """
        self._lent = False

    def snapshot(self) -> WindowSnapshot:
        """Capture the window and baseline as they stand, for `batch_features`.

        The snapshot shares the ring buffers instead of copying them; the
        next `update` copies them before it writes (copy on write) unless
        `release` was called, so a snapshot never changes after it is taken.
        """
        self._lent = True
        baselines = self._key_baselines
        table = np.array(
            [
                (
                    b.stats.n,
                    b.stats.mean,
                    b.stats.m2,
                    b.stats.lo,
                    b.stats.hi,
                    b.change_rate,
                    b.steps.mean,
                )
                for b in baselines
            ],
            dtype=np.float64,
        ).reshape(len(baselines), len(_TABLE_COLUMNS))
        return WindowSnapshot(
            spec=self.spec,
            start=self._pos,
            values=self._values,
            missing=self._missing,
            times=self._times,
            sizes=self._sizes,
            bad=self._bad,
            key_table=table,
            gap_mean=self._gap.mean,
            gap_spread=self._gap.spread(),
            size_mean=self._size.mean,
            size_spread=self._size.spread(),
        )

    def features(self) -> WindowFeatures:
        """Compute both models' inputs for the window as it stands now."""
        vectors, windows = batch_features([self.snapshot()])
        return WindowFeatures(vectors[0], windows[0])

    def deviations(self, limit: int = 3) -> list[KeyDeviation]:
        """Return the keys whose readings in the window stray furthest from baseline.

        Each key is judged by its furthest reading in the window, not only
        its latest: a plug flipping between 0 and 3000 W is as likely to be
        at 0 when its alarm is raised, and a verdict whose reason then names
        a key that merely wobbled (`linkquality`) misleads whoever reads it.
        """
        found = []
        for index, key in enumerate(self._names):
            stats = self._key_baselines[index].stats
            column = self._values[:, index]
            column = column[~np.isnan(column)]
            if stats.n < 2 or column.size == 0:
                continue
            spread = stats.spread()
            value = float(column[np.argmax(np.abs(column - stats.mean))])
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


def batch_features(
    snapshots: Sequence[WindowSnapshot],
) -> tuple[FloatArray, FloatArray]:
    """Compute both models' inputs for many windows in one set of array passes.

    Every window of a batch is computed at once, keys of all devices side by
    side, so the cost per window falls with the batch. Row i of each output
    is what `DeviceState.features` gives for the state `snapshots[i]` saw.

    Returns:
        RandomForest vectors, shape (n, len(FEATURE_NAMES)), and CNN windows,
        shape (n, len(CNN_CHANNELS), spec.window), both float32.

    Raises:
        ValueError: If the snapshots were taken under different specs.
    """
    spec = snapshots[0].spec if snapshots else FeatureSpec()
    if any(snapshot.spec != spec for snapshot in snapshots):
        message = f"batch_features needs one spec for the whole batch; got {spec}"
        raise ValueError(message)
    count = len(snapshots)
    length = spec.window
    if not count:
        return (
            np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32),
            np.zeros((0, len(CNN_CHANNELS), length), dtype=np.float32),
        )

    # Ring buffers to time order: row `start` of each buffer is the oldest.
    starts = np.array([snapshot.start for snapshot in snapshots])
    order = (np.arange(length) + starts[:, None]) % length
    times = _in_order([snapshot.times for snapshot in snapshots], order)
    sizes = _in_order([snapshot.sizes for snapshot in snapshots], order)
    bad = _in_order([snapshot.bad for snapshot in snapshots], order).astype(np.float64)
    keys = _KeyColumns.gather(snapshots, order)

    vector = np.zeros((count, len(FEATURE_NAMES)))
    n_key = len(_KEY_FEATURES)
    scored = np.flatnonzero(keys.per_device)
    if len(scored):
        per_key = _per_key_features(keys.values, keys.missing, keys.table)
        first = keys.first[scored]
        vector[scored, :n_key] = np.maximum.reduceat(per_key, first, axis=0)
        key_sums = np.add.reduceat(per_key, first, axis=0)
        vector[scored, n_key : 2 * n_key] = key_sums / keys.per_device[scored, None]
    vector[:, 2 * n_key] = bad.mean(axis=1)
    vector[:, 2 * n_key + 1] = keys.new_key_share

    gap_mean = np.array([snapshot.gap_mean for snapshot in snapshots])
    gap_spread = np.array([snapshot.gap_spread for snapshot in snapshots])
    size_mean = np.array([snapshot.size_mean for snapshot in snapshots])
    size_spread = np.array([snapshot.size_spread for snapshot in snapshots])
    gap_z = _gap_z(times, gap_mean, gap_spread)
    size_z = (sizes - size_mean[:, None]) / size_spread[:, None]
    base = 2 * n_key + 2
    vector[:, base] = gap_z[:, -1]
    vector[:, base + 1] = gap_z[:, 1:].mean(axis=1)
    mean_gap = np.maximum(np.diff(times, axis=1).mean(axis=1), MIN_GAP_S)
    vector[:, base + 2] = gap_mean - np.log(mean_gap)
    vector[:, base + 3] = size_z[:, -1]
    vector[:, base + 4] = size_z.mean(axis=1)
    vector = np.clip(np.nan_to_num(vector), -FEATURE_CLIP, FEATURE_CLIP)

    window = np.zeros((count, len(CNN_CHANNELS), length))
    if len(scored):
        _place_strongest_keys(window, keys)
        any_missing = np.add.reduceat(keys.missing, keys.first[scored], axis=1)
        window[scored, 4] = (any_missing > 0).T
    window[:, 5] = bad
    window[:, 6] = gap_z
    window[:, 7] = size_z
    window = np.clip(np.nan_to_num(window), -CNN_CLIP, CNN_CLIP)

    return (
        (vector * spec.feature_mask()).astype(np.float32),
        (window * spec.channel_mask()[:, None]).astype(np.float32),
    )


def _in_order(
    rings: Sequence[npt.NDArray[Any]], order: npt.NDArray[np.intp]
) -> npt.NDArray[Any]:
    """Stack one ring buffer per window and put each in time order."""
    stacked: npt.NDArray[Any] = np.take_along_axis(np.array(rings), order, axis=1)
    return stacked


@dataclass(frozen=True, slots=True)
class _KeyColumns:
    """The keys of a batch side by side: one column per key features read.

    Only keys that are learned and reported in their window (`present`) get
    a column; a device's columns are contiguous, in the device's key order.
    """

    values: npt.NDArray[np.float64]  # (window, keys), time order
    missing: npt.NDArray[np.float64]  # (window, keys), 1 where a read failed
    table: npt.NDArray[np.float64]  # (keys, len(_TABLE_COLUMNS))
    owner: npt.NDArray[np.intp]  # (keys,) the window each column belongs to
    per_device: npt.NDArray[np.intp]  # (windows,) columns per window
    first: npt.NDArray[np.intp]  # (windows,) each window's first column
    new_key_share: npt.NDArray[np.float64]  # (windows,)

    @classmethod
    def gather(
        cls, snapshots: Sequence[WindowSnapshot], order: npt.NDArray[np.intp]
    ) -> _KeyColumns:
        count = len(snapshots)
        key_counts = [snapshot.values.shape[1] for snapshot in snapshots]
        owner = np.repeat(np.arange(count), key_counts)
        column_order = order[owner].T
        values = np.take_along_axis(
            np.concatenate([snapshot.values for snapshot in snapshots], axis=1),
            column_order,
            axis=0,
        )
        missing = np.take_along_axis(
            np.concatenate([snapshot.missing for snapshot in snapshots], axis=1),
            column_order,
            axis=0,
        )
        table = np.concatenate([snapshot.key_table for snapshot in snapshots])

        learned = table[:, _N] >= 2
        reporting = ~np.isnan(values[-1])
        reporting_keys = np.bincount(owner, weights=reporting, minlength=count)
        new_keys = np.bincount(owner, weights=reporting & ~learned, minlength=count)
        new_key_share = np.divide(
            new_keys,
            reporting_keys,
            out=np.zeros(count),
            where=reporting_keys > 0,
        )

        present = learned & ~np.all(np.isnan(values), axis=0)
        per_device = np.bincount(owner[present], minlength=count)
        return cls(
            values=values[:, present],
            missing=missing[:, present].astype(np.float64),
            table=table[present],
            owner=owner[present],
            per_device=per_device,
            first=np.cumsum(per_device) - per_device,
            new_key_share=new_key_share,
        )


def _gap_z(
    times: npt.NDArray[np.float64],
    gap_mean: npt.NDArray[np.float64],
    gap_spread: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """Each message gap of each window in learned spreads; 0 for the first."""
    gaps = np.diff(times, axis=1, prepend=times[:, :1])
    log_gaps = np.log(np.maximum(gaps, MIN_GAP_S))
    z: npt.NDArray[np.float64] = (log_gaps - gap_mean[:, None]) / gap_spread[:, None]
    z[:, 0] = 0.0
    return z


def _first_max(
    first: npt.NDArray[np.float64], second: npt.NDArray[np.float64] | float
) -> npt.NDArray[np.float64]:
    """Python's `max(first, second)` elementwise, NaN handling included."""
    larger: npt.NDArray[np.float64] = np.where(second > first, second, first)
    return larger


def _spreads(table: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """`_Stats.spread` for every row of a key table, to the last bit."""
    n = table[:, _N]
    variance = np.where(n > 1, table[:, _M2] / np.maximum(n - 1.0, 1.0), 0.0)
    range_floor = np.where(
        n != 0, RANGE_SPREAD_FLOOR * (table[:, _HI] - table[:, _LO]), 0.0
    )
    floor = _first_max(
        _first_max(range_floor, MEAN_SPREAD_FLOOR * np.abs(table[:, _MEAN])),
        ABSOLUTE_SPREAD_FLOOR,
    )
    return _first_max(np.sqrt(variance), floor)


def _per_key_features(
    values: npt.NDArray[np.float64],
    missing: npt.NDArray[np.float64],
    table: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    """One row of `_KEY_FEATURES` per key column."""
    means = table[:, _MEAN]
    spreads = _spreads(table)
    lows = table[:, _LO]
    highs = table[:, _HI]

    z = (values - means) / spreads
    abs_z = np.abs(z)
    observed = ~np.isnan(values)
    observed_counts = observed.sum(axis=0)
    counts = np.maximum(observed_counts, 1)
    last = np.nan_to_num(abs_z[-1])
    mean_z = np.abs(_column_sums(np.where(observed, z, 0.0), skip_nan=True) / counts)
    max_z = np.nanmax(np.where(observed, abs_z, 0.0), axis=0)
    window_mean = _column_sums(np.where(observed, values, 0.0)) / observed_counts
    window_spread = np.sqrt(
        _column_sums(
            np.where(observed, (values - window_mean) ** 2, 0.0), skip_nan=True
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
    mean_step = _column_sums(step_sizes) / np.maximum(steps.sum(axis=0), 1)
    step_means = table[:, _STEP_MEAN]
    step_ratio = np.log((mean_step + spreads) / (step_means + spreads))

    base = np.stack(
        [
            last,
            mean_z,
            max_z,
            spread_ratio,
            out_of_range,
            change_share - table[:, _CHANGE_RATE],
            missing.mean(axis=0),
            jump,
            step_ratio,
            change_share,
        ],
        axis=1,
    )
    return np.hstack([base, _window_shapes(values)])


def _column_sums(
    columns: npt.NDArray[np.float64], skip_nan: bool = False
) -> npt.NDArray[np.float64]:
    """Sum down each column, adding its rows in time order (NaN as 0 if asked).

    numpy adds the rows of a many-column array in order, but sums a single
    column pairwise, which rounds differently; a lone column gets a column of
    zeros beside it, so a key's features never depend on what else was in its
    batch. The order is also the one a device's own key matrix was summed in,
    so ties between keys break as they always did.
    """
    if skip_nan:
        columns = np.where(np.isnan(columns), 0.0, columns)
    lone = columns.shape[1] == 1
    if lone:
        columns = np.hstack([columns, np.zeros_like(columns)])
    sums: npt.NDArray[np.float64] = columns.sum(axis=0)
    return sums[:1] if lone else sums


def _window_shapes(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Distinct share, lag-1 autocorrelation, step-to-range and longest run.

    Per key column, over its observed readings only, as if the failed reads
    were cut out of the window. A key with fewer than two readings gets
    (1, 0, 0, 1): one distinct reading, no correlation, no steps, one run.
    """
    rows = values.T
    observed = ~np.isnan(rows)
    counts = observed.sum(axis=1)
    # Observed readings moved to the front of each row, in time order.
    compact = np.take_along_axis(
        rows, np.argsort(~observed, axis=1, kind="stable"), axis=1
    )
    positions = np.arange(rows.shape[1])
    valid = positions < counts[:, None]
    pairs = positions[:-1] < counts[:, None] - 1

    ordered = np.sort(rows, axis=1)
    distinct = 1 + np.count_nonzero(pairs & (ordered[:, 1:] != ordered[:, :-1]), axis=1)
    highest = np.take_along_axis(ordered, np.maximum(counts - 1, 0)[:, None], axis=1)
    value_range = highest[:, 0] - ordered[:, 0]

    steps = np.where(pairs, np.abs(np.diff(compact, axis=1)), 0.0)
    step_mean = _leading_sums(steps, counts - 1) / np.maximum(counts - 1, 1)
    mean = _leading_sums(compact, counts) / np.maximum(counts, 1)
    centred = np.where(valid, compact - mean[:, None], 0.0)
    energy = (centred * centred).sum(axis=1)
    lagged = (centred[:, 1:] * centred[:, :-1]).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        step_to_range = np.where(value_range > 0, step_mean / value_range, 0.0)
        autocorrelation = np.where(energy > 0, lagged / energy, 1.0)

    # Longest run of equal consecutive readings: the longest stretch of zero
    # steps, plus the reading it starts from.
    repeats = pairs & (steps == 0)
    run = np.cumsum(repeats, axis=1)
    run -= np.maximum.accumulate(np.where(repeats, 0, run), axis=1)
    longest = run.max(axis=1, initial=0) + 1

    shape = np.stack(
        [distinct / counts, autocorrelation, step_to_range, longest / counts], axis=1
    )
    shape[counts < 2] = _SHORT_WINDOW_SHAPE
    return shape


def _leading_sums(
    rows: npt.NDArray[np.float64], lengths: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    """Sum the first `lengths[i]` entries of each row, as numpy sums alone.

    numpy adds a contiguous run pairwise, so the rounding depends on how many
    values are summed; a masked sum over the whole row rounds differently.
    That is harmless almost everywhere, but centring a constant or nearly
    constant key decides whether its autocorrelation is 1 or (n - 1) / n, so
    each row is summed over exactly its own readings. Rows are grouped by
    length: one numpy call per distinct length.
    """
    sums = np.zeros(len(rows))
    for length in np.unique(lengths):
        same = lengths == length
        sums[same] = rows[same, : max(int(length), 0)].sum(axis=1)
    return sums


def _standardised(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Centre each key column on its window median; scale by the window spread.

    The CNN then sees the shape of the window (a spike, a step, a flat run,
    chatter) in the same units on every device, whatever the baseline.
    Failed reads count as 0 (the median).
    """
    observed = ~np.isnan(values)
    counts = observed.sum(axis=0)
    ordered = np.sort(values, axis=0)
    columns = np.arange(values.shape[1])
    median = (ordered[(counts - 1) // 2, columns] + ordered[counts // 2, columns]) / 2.0
    mean = _column_sums(np.where(observed, values, 0.0)) / counts
    deviation = np.where(observed, values - mean, 0.0)
    spread = np.sqrt(_column_sums(deviation * deviation) / counts)
    scaled: npt.NDArray[np.float64] = np.nan_to_num(
        (values - median) / np.maximum(spread, ABSOLUTE_SPREAD_FLOOR)
    )
    return scaled


def _place_strongest_keys(window: npt.NDArray[np.float64], keys: _KeyColumns) -> None:
    """Write each window's `_CNN_VALUE_CHANNELS` furthest-straying keys.

    Keys are ranked by their largest standardised reading; ties keep the
    device's key order.
    """
    scaled = _standardised(keys.values)
    strength = np.abs(scaled).max(axis=0)
    ranked = np.argsort(-strength, kind="stable")
    ranked = ranked[np.argsort(keys.owner[ranked], kind="stable")]
    owner = keys.owner[ranked]
    rank = np.arange(len(ranked)) - keys.first[owner]
    keep = rank < _CNN_VALUE_CHANNELS
    window[owner[keep], rank[keep]] = scaled[:, ranked[keep]].T
