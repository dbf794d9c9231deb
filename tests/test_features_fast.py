"""Batched feature computation equals the per-window reference it replaced.

The shipped models were trained on the features of the original per-window
implementation, kept here as the oracle (`_reference_features`). Every window
of many realistic and hostile streams must get the same RandomForest vector
and CNN window from the batched path, however the windows are cut into
batches.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pytest

from converters.simulate import simulate
from sidecar.config import Settings
from sidecar.features import (
    _CNN_VALUE_CHANNELS,
    _KEY_FEATURES,
    ABSOLUTE_SPREAD_FLOOR,
    CNN_CHANNELS,
    CNN_CLIP,
    FEATURE_CLIP,
    FEATURE_GROUPS,
    FEATURE_NAMES,
    MIN_GAP_S,
    RANGE_MARGIN,
    DeviceState,
    FeatureSpec,
    WindowFeatures,
    WindowSnapshot,
    batch_features,
)
from sidecar.pipeline import channel_readings
from sidecar.topics import RouteKind, TopicRouter

# The brief's tolerance on float32 outputs; far below anything a model splits on.
RTOL = 1e-6
ATOL = 1e-6
# As shipped (models/rf.card.json), with a shorter warm-up so more windows score.
SHIPPED_SPEC = FeatureSpec(
    window=32, warmup=40, memory=1000, disabled_groups=("level", "timing", "size")
)
SPECS = {
    "shipped": SHIPPED_SPEC,
    "all_groups": FeatureSpec(window=32, warmup=40, memory=1000),
    "short": FeatureSpec(window=8, warmup=16, memory=100, max_keys=12),
    "odd_length": FeatureSpec(window=13, warmup=20, memory=60, learn_z=2.0),
    "long": FeatureSpec(window=40, warmup=48, memory=500),
}
# Cuts of the same windows into batches: one window, a prime, the default.
BATCH_SIZES = (1, 7, 256)
# Features that count things (shares of rows or keys) must match exactly.
EXACT_FEATURES = tuple(
    index
    for index, name in enumerate(FEATURE_NAMES)
    if name.split("_", 1)[1]
    in {
        "out_of_range",
        "change_rate_diff",
        "missing_share",
        "change_share",
        "distinct_share",
        "longest_run_share",
        "payload_share",
        "key_share",
    }
)
EXACT_CHANNELS = (CNN_CHANNELS.index("missing"), CNN_CHANNELS.index("bad_payload"))
# Streams per spec: enough for thousands of windows, a few seconds of reference.
MESSAGES_PER_DEVICE = 160
HUGE = 1e300
SPIKE_OF_AN_ENERGY_COUNTER = 1e9  # energy counters reach about 1e9 (features.py)

Stream = list[tuple[str, str, bytes, float]]
FloatArray = npt.NDArray[np.float64]
_T = TypeVar("_T")


def _reference_features(state: DeviceState) -> WindowFeatures:
    """The per-window implementation the shipped models were trained on."""
    spec = state.spec
    order = (np.arange(spec.window) + state._pos) % spec.window
    values = state._values[order]
    missing = state._missing[order].astype(np.float64)
    times = state._times[order]
    sizes = state._sizes[order]
    bad = state._bad[order].astype(np.float64)
    learned = np.array([b.stats.n >= 2 for b in state._key_baselines], dtype=bool)
    present = learned & ~np.all(np.isnan(values), axis=0)
    per_key = _reference_per_key(
        state, values[:, present], missing[:, present], present
    )

    vector = np.zeros(len(FEATURE_NAMES), dtype=np.float64)
    n_key = len(_KEY_FEATURES)
    if per_key.shape[0]:
        vector[:n_key] = per_key.max(axis=0)
        vector[n_key : 2 * n_key] = per_key.mean(axis=0)
    vector[2 * n_key] = bad.mean()
    reporting = ~np.isnan(values[-1])
    vector[2 * n_key + 1] = (
        float(np.mean(~learned[reporting])) if reporting.any() else 0
    )
    gaps = np.diff(times, prepend=times[0])
    gap_z = (
        np.log(np.maximum(gaps, MIN_GAP_S)) - state._gap.mean
    ) / state._gap.spread()
    gap_z[0] = 0.0
    size_z = (sizes - state._size.mean) / state._size.spread()
    base = 2 * n_key + 2
    vector[base] = gap_z[-1]
    vector[base + 1] = gap_z[1:].mean()
    mean_gap = max(float(np.mean(np.diff(times))), MIN_GAP_S)
    vector[base + 2] = state._gap.mean - math.log(mean_gap)
    vector[base + 3] = size_z[-1]
    vector[base + 4] = size_z.mean()
    vector = np.clip(np.nan_to_num(vector), -FEATURE_CLIP, FEATURE_CLIP)

    window = np.zeros((len(CNN_CHANNELS), spec.window), dtype=np.float64)
    if present.any():
        kept = values[:, present]
        centred = kept - np.nanmedian(kept, axis=0)
        scale = np.maximum(np.nanstd(kept, axis=0), ABSOLUTE_SPREAD_FLOOR)
        z = np.nan_to_num(centred / scale)
        top = np.argsort(-np.abs(z).max(axis=0), kind="stable")[:_CNN_VALUE_CHANNELS]
        window[: len(top)] = z[:, top].T
    window[4] = missing[:, present].any(axis=1) if present.any() else 0.0
    window[5] = bad
    window[6] = gap_z
    window[7] = size_z
    window = np.clip(np.nan_to_num(window), -CNN_CLIP, CNN_CLIP)
    return WindowFeatures(
        (vector * spec.feature_mask()).astype(np.float32),
        (window * spec.channel_mask()[:, None]).astype(np.float32),
    )


def _reference_per_key(
    state: DeviceState,
    values: FloatArray,
    missing: FloatArray,
    present: npt.NDArray[np.bool_],
) -> FloatArray:
    baselines = [
        b for b, keep in zip(state._key_baselines, present, strict=True) if keep
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
    deviations = np.where(observed, (values - np.nanmean(values, axis=0)) ** 2, 0.0)
    window_spread = np.sqrt(np.nansum(deviations, axis=0) / counts)
    spread_ratio = np.log((window_spread + spreads) / (2.0 * spreads))
    margin = RANGE_MARGIN * (highs - lows) + spreads
    outside = observed & ((values < lows - margin) | (values > highs + margin))
    steps = observed[1:] & observed[:-1]
    changed = steps & (values[1:] != values[:-1])
    change_share = changed.sum(axis=0) / np.maximum(steps.sum(axis=0), 1)
    jump = np.nan_to_num(np.abs(values[-1] - values[-2]) / spreads)
    step_sizes = np.where(steps, np.abs(values[1:] - values[:-1]), 0.0)
    mean_step = step_sizes.sum(axis=0) / np.maximum(steps.sum(axis=0), 1)
    step_ratio = np.log((mean_step + spreads) / (step_means + spreads))
    shape = np.array([_reference_shape(values[:, k]) for k in range(values.shape[1])])
    base = np.stack(
        [
            last,
            mean_z,
            max_z,
            spread_ratio,
            outside.sum(axis=0) / counts,
            change_share - change_rates,
            missing.mean(axis=0),
            jump,
            step_ratio,
            change_share,
        ],
        axis=1,
    )
    return np.hstack([base, shape])


def _reference_shape(column: FloatArray) -> tuple[float, float, float, float]:
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


def _simulated(seed: int) -> Stream:
    """The demo's four devices (zigbee2mqtt, Tasmota, ESPHome) with their faults."""
    return [
        (f"{item.device}_{seed}", item.message.topic, item.message.payload, at)
        for item in (m for stream in simulate(seed).values() for m in stream)
        for at in [item.message.received_at]
    ]


def _ton_iot_like(rng: np.random.Generator, name: str) -> Stream:
    """TON_IoT-style JSON: several keys, words, booleans and register values."""
    stream = []
    for index in range(MESSAGES_PER_DEVICE):
        attack = index > MESSAGES_PER_DEVICE // 2 and rng.random() < 0.3
        document: dict[str, object] = {
            "fridge_temperature": round(4.0 + rng.normal(0, 2 if attack else 0.5), 2),
            "temp_condition": "high" if rng.random() < 0.5 else "low",
            "latitude": round(40.7 + rng.normal(0, 0.01), 6),
            "longitude": round(-74.0 + rng.normal(0, 0.01), 6),
            "door_state": "open" if rng.random() < 0.1 else "closed",
            "sphone_signal": bool(rng.random() < 0.5),
            "FC1_Read_Input_Register": int(rng.integers(0, 3)),
            "FC2_Read_Discrete_Value": int(rng.integers(0, 3)),
            "motion_status": int(rng.random() < 0.2),
            "light_status": "on" if rng.random() < 0.5 else "off",
        }
        payload = json.dumps(document).encode()
        stream.append((name, f"ton_iot/{name}", payload, 1.6e9 + index * 5.0))
    return stream


def _pick(rng: np.random.Generator, options: Sequence[_T]) -> _T:
    """One of `options`, drawn with `rng`."""
    return options[int(rng.integers(len(options)))]


def _hostile(rng: np.random.Generator, name: str, n_keys: int) -> Stream:
    """Missing markers, words, bad payloads, constant, late and huge keys."""
    late = int(rng.integers(0, MESSAGES_PER_DEVICE))
    constant = float(rng.choice([0.1, 87.0, -3.3, 1e-7, 7e11]))
    offset = SPIKE_OF_AN_ENERGY_COUNTER * float(rng.random())
    stream = []
    time = 1.7e9
    for index in range(MESSAGES_PER_DEVICE):
        time += float(rng.choice([0.0, 1e-4, 1.0, 60.0, 3600.0]))
        roll = rng.random()
        if roll < 0.04:
            payload = _pick(rng, [b"\xff\xd8\xff", b"{", b"", b"[" * 80, b"nan"])
        elif roll < 0.06:
            payload = str(_pick(rng, [1.5, HUGE, -HUGE, "unavailable"])).encode()
        else:
            document: dict[str, object] = {}
            for key in range(n_keys):
                if rng.random() < 0.15 or (key == n_keys - 1 and index < late):
                    continue
                kind = key % 8
                value: object
                if kind == 0:
                    value = round(20.0 + rng.normal(0, 1), 1)
                elif kind == 1:
                    value = constant
                elif kind == 2:
                    value = _pick(rng, [None, "nan", "", "unknown", 1.0, 2.0])
                elif kind == 3:
                    value = float(rng.choice([HUGE, -HUGE, 1e12, 0.0, 5.0]))
                elif kind == 4:
                    value = offset + 0.001 * index + float(rng.choice([0.0, 0.0005]))
                elif kind == 5:
                    value = int(rng.random() < 0.5)
                elif kind == 6:
                    value = str(rng.choice(["ON", "OFF", "idle", "heat"]))
                else:
                    value = int(rng.integers(0, 4))
                document[f"k{key}"] = value
            payload = json.dumps(document).encode()
        stream.append((name, f"zigbee2mqtt/{name}", payload, time))
    return stream


def _streams(seed: int) -> Stream:
    """Every kind of device, interleaved in time as a broker would deliver them."""
    rng = np.random.default_rng(seed)
    messages = _simulated(seed)
    for device in range(3):
        messages += _ton_iot_like(rng, f"ton_{seed}_{device}")
    for n_keys in (1, 2, 3, 4, 5, 8, 16, 32, 40):
        messages += _hostile(rng, f"hostile_{seed}_{n_keys}", n_keys)
    messages.sort(key=lambda message: message[3])
    return messages


def _replay(stream: Stream, spec: FeatureSpec) -> Iterator[DeviceState]:
    """Feed each message to its device's state; yield the state when it is ready."""
    settings = Settings()
    router = TopicRouter(settings.topics, settings.output.prefix)
    states: dict[str, DeviceState] = {}
    for device, topic, payload, received_at in stream:
        route = router.route(topic)
        channel = route.channel if route.kind is RouteKind.TELEMETRY else ""
        readings = channel_readings(payload, channel, 65536)
        state = states.setdefault(device, DeviceState(spec))
        state.update(readings, len(payload), received_at)
        if state.ready:
            yield state


def _in_batches(
    snapshots: Sequence[WindowSnapshot], size: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    parts = [
        batch_features(snapshots[i : i + size]) for i in range(0, len(snapshots), size)
    ]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _assert_equal_features(
    vectors: npt.NDArray[np.float32],
    windows: npt.NDArray[np.float32],
    expected: Sequence[WindowFeatures],
) -> None:
    want_vectors = np.stack([features.vector for features in expected])
    want_windows = np.stack([features.window for features in expected])
    assert vectors.dtype == np.float32
    assert windows.dtype == np.float32
    np.testing.assert_allclose(vectors, want_vectors, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(windows, want_windows, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(
        vectors[:, EXACT_FEATURES], want_vectors[:, EXACT_FEATURES]
    )
    np.testing.assert_array_equal(
        windows[:, EXACT_CHANNELS], want_windows[:, EXACT_CHANNELS]
    )


@pytest.fixture(scope="module")
def replayed() -> dict[str, tuple[list[WindowSnapshot], list[WindowFeatures]]]:
    """Every ready window of every spec: its snapshot and its reference features."""
    found = {}
    for seed, (name, spec) in enumerate(SPECS.items()):
        snapshots = []
        expected = []
        with np.errstate(over="ignore"):
            for state in _replay(_streams(seed), spec):
                snapshots.append(state.snapshot())
                expected.append(_reference_features(state))
        found[name] = (snapshots, expected)
    return found


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_batch_features_equal_the_reference_on_every_window(
    replayed: dict[str, tuple[list[WindowSnapshot], list[WindowFeatures]]],
    spec_name: str,
    batch_size: int,
) -> None:
    """Test that batched features equal the reference, however windows are batched."""
    snapshots, expected = replayed[spec_name]
    vectors, windows = _in_batches(snapshots, batch_size)

    assert len(snapshots) >= 1000
    _assert_equal_features(vectors, windows, expected)


@pytest.mark.parametrize("spec_name", SPECS)
def test_batch_features_do_not_depend_on_the_batch(
    replayed: dict[str, tuple[list[WindowSnapshot], list[WindowFeatures]]],
    spec_name: str,
) -> None:
    """Test that a window's features are bit-identical whatever shares its batch.

    Training builds windows in other batches than the live pipeline, and the
    parity test compares their RandomForest scores exactly.
    """
    snapshots, _ = replayed[spec_name]
    alone = _in_batches(snapshots, 1)

    for batch_size in BATCH_SIZES[1:]:
        batched = _in_batches(snapshots, batch_size)
        np.testing.assert_array_equal(batched[0], alone[0])
        np.testing.assert_array_equal(batched[1], alone[1])


def test_device_state_features_equal_the_reference() -> None:
    """Test that `DeviceState.features` equals the reference message by message."""
    expected = []
    found = []
    with np.errstate(over="ignore"):
        for state in _replay(_streams(seed=11), SPECS["short"]):
            expected.append(_reference_features(state))
            found.append(state.features())

    vectors = np.stack([features.vector for features in found])
    windows = np.stack([features.window for features in found])
    _assert_equal_features(vectors, windows, expected)


def test_batch_features_of_no_windows_are_empty() -> None:
    """Test that an empty batch gives empty arrays of the right shapes."""
    vectors, windows = batch_features([])

    assert vectors.shape == (0, len(FEATURE_NAMES))
    assert windows.shape == (0, len(CNN_CHANNELS), FeatureSpec().window)


def test_batch_features_reject_mixed_specs() -> None:
    """Test that windows built under different specs cannot share a batch."""
    states = [DeviceState(FeatureSpec(window=8)), DeviceState(FeatureSpec(window=9))]

    with pytest.raises(ValueError, match="one spec"):
        batch_features([state.snapshot() for state in states])


def test_exact_features_are_the_counting_ones() -> None:
    """Test that the exactly compared features are all shape features."""
    assert len(EXACT_FEATURES) == 14
    assert {FEATURE_GROUPS[FEATURE_NAMES[i]] for i in EXACT_FEATURES} <= {
        "shape",
        "level",
    }
