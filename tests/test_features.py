"""Specification of per-device windows, baselines and the model input features."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator

import numpy as np
import pytest

from sidecar.features import (
    CNN_CHANNEL_GROUPS,
    CNN_CHANNELS,
    FEATURE_GROUPS,
    FEATURE_NAMES,
    DeviceState,
    FeatureSpec,
    WindowFeatures,
)
from sidecar.payload import parse_payload

# Small enough to keep each test to milliseconds, large enough to learn from.
SPEC = FeatureSpec(window=8, warmup=32)
# z2m sensors report every 5 minutes (pitfalls.md #12); the jitter is invented.
PERIOD_S = 300.0
GROUPS = ("level", "shape", "timing", "size")
# Far beyond any plausible reading, still finite (the square overflows float64).
HUGE = 1e300

Message = tuple[bytes, float]


def _feed(state: DeviceState, messages: Iterable[Message]) -> None:
    """Parse and add each (payload, receive time) to the device state."""
    for payload, received_at in messages:
        state.update(parse_payload(payload, key="value"), len(payload), received_at)


def _z2m_messages(seed: int, count: int, start: float = 0.0) -> Iterator[Message]:
    """Yield a healthy z2m sensor: varying temperature and link quality."""
    rng = random.Random(seed)
    for index in range(count):
        document = {
            "temperature": round(21.0 + rng.gauss(0.0, 0.3), 2),
            "linkquality": rng.randint(60, 200),
        }
        yield json.dumps(document).encode(), start + index * PERIOD_S + rng.random()


def _frozen_messages(seed: int, count: int, start: float) -> Iterator[Message]:
    """Yield the same sensor with temperature stuck at 20.95 (z2m issue #12912)."""
    rng = random.Random(seed)
    for index in range(count):
        document = {"temperature": 20.95, "linkquality": rng.randint(60, 200)}
        yield json.dumps(document).encode(), start + index * PERIOD_S + rng.random()


def _warmed_state(spec: FeatureSpec = SPEC, seed: int = 1) -> DeviceState:
    """Return a device state that has just become ready on healthy messages."""
    state = DeviceState(spec)
    _feed(state, _z2m_messages(seed, spec.warmup + 1))
    assert state.ready
    return state


def _feature(features: WindowFeatures, name: str) -> float:
    """Return one named RandomForest feature."""
    return float(features.vector[FEATURE_NAMES.index(name)])


def _assert_well_formed(features: WindowFeatures, spec: FeatureSpec = SPEC) -> None:
    """Check the shape, dtype and finiteness both models rely on."""
    assert features.vector.dtype == np.float32
    assert features.vector.shape == (len(FEATURE_NAMES),)
    assert features.window.dtype == np.float32
    assert features.window.shape == (len(CNN_CHANNELS), spec.window)
    assert np.isfinite(features.vector).all()
    assert np.isfinite(features.window).all()


def _messy_messages(start: float) -> list[Message]:
    """Return failed readings, bad payloads and a late key, as real devices send."""
    times = [start + index * PERIOD_S for index in range(1, 13)]
    payloads = [
        b'{"temperature": NaN, "linkquality": 90}',
        b"nan",
        b"unavailable",
        b'{"temperature": null, "linkquality": 91}',
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
        b"{",
        b"",
        b'{"temperature": "", "linkquality": 92, "battery": 87}',
        b'{"temperature": 21.2, "linkquality": 93, "battery": 86}',
        b"[" * 100,
        b'{"temperature": 21.1, "linkquality": 94, "battery": 86}',
        b'{"temperature": 21.0, "linkquality": 95, "battery": 85}',
    ]
    return list(zip(payloads, times, strict=True))


def test_device_state_not_ready_during_warmup() -> None:
    """Test that a device is not ready until warm-up and one full window are seen."""
    state = DeviceState(SPEC)
    readiness = []
    for message in _z2m_messages(seed=1, count=SPEC.warmup + 2):
        _feed(state, [message])
        readiness.append(state.ready)

    assert readiness == [False] * SPEC.warmup + [True, True]


def test_device_state_ready_needs_a_full_window() -> None:
    """Test that a window longer than the warm-up also has to fill first."""
    spec = FeatureSpec(window=16, warmup=4)
    state = DeviceState(spec)

    _feed(state, _z2m_messages(seed=1, count=16))
    assert not state.ready
    _feed(state, _z2m_messages(seed=2, count=1, start=16 * PERIOD_S))
    assert state.ready


def test_device_state_features_shape_dtype_and_finiteness() -> None:
    """Test that after warm-up both model inputs are finite float32 of fixed shape."""
    features = _warmed_state().features()

    _assert_well_formed(features)


def test_device_state_snapshot_stays_as_taken_after_later_updates() -> None:
    """Test that a snapshot shares no buffer a later message writes into."""
    state = _warmed_state()
    snapshot = state.snapshot()
    values = snapshot.values.copy()
    times = snapshot.times.copy()

    _feed(state, _z2m_messages(seed=9, count=3, start=1e6))

    np.testing.assert_array_equal(snapshot.values, values)
    np.testing.assert_array_equal(snapshot.times, times)
    assert state.snapshot().times.max() > times.max()


def test_device_state_released_snapshot_is_written_in_place() -> None:
    """Test that after `release` the next message reuses the ring buffers."""
    state = _warmed_state()
    snapshot = state.snapshot()
    state.release()

    _feed(state, _z2m_messages(seed=9, count=1, start=1e6))

    assert state.snapshot().times is snapshot.times
    assert snapshot.times.max() >= 1e6


def test_device_state_features_finite_with_missing_and_bad_payloads() -> None:
    """Test that missing markers, binary payloads and late keys keep inputs finite."""
    state = _warmed_state()
    for message in _messy_messages(start=SPEC.warmup * PERIOD_S):
        _feed(state, [message])

        _assert_well_formed(state.features())


def test_device_state_late_key_counts_as_new() -> None:
    """Test that a key first seen after warm-up shows up as a new key."""
    state = _warmed_state()
    _feed(state, [(b'{"temperature": 21.0, "linkquality": 90, "battery": 87}', 1e5)])

    assert _feature(state.features(), "new_key_share") > 0.0


def test_device_state_bad_payloads_raise_bad_payload_share() -> None:
    """Test that binary and unparsable payloads show in the bad-payload features."""
    state = _warmed_state()
    clean = state.features()
    _feed(state, _messy_messages(start=SPEC.warmup * PERIOD_S)[4:6])

    messy = state.features()

    assert _feature(clean, "bad_payload_share") == 0.0
    assert _feature(messy, "bad_payload_share") == pytest.approx(2 / SPEC.window)
    assert messy.window[CNN_CHANNELS.index("bad_payload")].sum() == 2.0


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_device_state_features_finite_with_huge_values() -> None:
    """Test that readings of 1e300 still give finite, clipped model inputs."""
    state = _warmed_state()
    for index in range(SPEC.window + 2):
        sign = 1 if index % 2 else -1
        payload = json.dumps({"temperature": sign * HUGE, "linkquality": 90})
        _feed(state, [(payload.encode(), (SPEC.warmup + 1 + index) * PERIOD_S)])

        _assert_well_formed(state.features())


def test_device_state_features_huge_values_emit_no_warning() -> None:
    """Test that huge readings are handled without numpy overflow warnings."""
    state = _warmed_state()
    payload = json.dumps({"temperature": HUGE, "linkquality": 90}).encode()
    _feed(state, [(payload, (SPEC.warmup + 1) * PERIOD_S)])

    _assert_well_formed(state.features())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.xfail(
    strict=True,
    reason=(
        "features._Stats keeps a mean and variance, which one outlier in the "
        "warm-up drags: a reading clipped to MAX_READING (1e12) inflates the "
        "key's spread so far that a later spike of 500 scores near 0. A robust "
        "baseline (median and MAD) would fix it; not built yet"
    ),
)
def test_device_state_huge_warmup_reading_does_not_blind_the_key() -> None:
    """Test that one absurd warm-up reading does not hide a later spike."""
    state = DeviceState(SPEC)
    messages = list(_z2m_messages(seed=3, count=SPEC.warmup + SPEC.window))
    messages[3] = (b'{"temperature": 1e300, "linkquality": 90}', messages[3][1])
    _feed(state, messages)
    spike = json.dumps({"temperature": 500.0, "linkquality": 90}).encode()
    _feed(state, [(spike, len(messages) * PERIOD_S)])

    assert _feature(state.features(), "max_abs_z_last") >= 20.0


@pytest.mark.parametrize("group", GROUPS)
def test_feature_spec_disabled_group_is_exactly_zero(group: str) -> None:
    """Test that a disabled group is zero in the vector and window, the rest intact.

    The shape group reads only the window itself, so it is compared exactly;
    disabling timing or size also stops them steering what the baseline
    learns, which may move level features, so those are not compared.
    """
    spike = [(b'{"temperature": 30.0, "linkquality": 250, "battery": 1}', 2e4)]
    full_state = _warmed_state()
    masked_state = _warmed_state(
        FeatureSpec(window=8, warmup=32, disabled_groups=(group,))
    )
    for state in (full_state, masked_state):
        _feed(state, _messy_messages(start=SPEC.warmup * PERIOD_S)[:6] + spike)
    full = full_state.features()
    masked = masked_state.features()

    in_group = np.array([FEATURE_GROUPS[name] == group for name in FEATURE_NAMES])
    channels = np.array([CNN_CHANNEL_GROUPS[name] == group for name in CNN_CHANNELS])
    assert np.any(full.vector[in_group] != 0.0)
    assert np.all(masked.vector[in_group] == 0.0)
    assert np.all(masked.window[channels] == 0.0)
    shape = np.array([FEATURE_GROUPS[name] == "shape" for name in FEATURE_NAMES])
    shape_channels = np.array([CNN_CHANNEL_GROUPS[n] == "shape" for n in CNN_CHANNELS])
    if group != "shape":
        assert np.array_equal(masked.vector[shape], full.vector[shape])
        assert np.array_equal(
            masked.window[shape_channels], full.window[shape_channels]
        )


def test_feature_groups_cover_every_feature_and_channel() -> None:
    """Test that every feature and CNN channel belongs to a known group."""
    assert set(FEATURE_GROUPS) == set(FEATURE_NAMES)
    assert set(CNN_CHANNEL_GROUPS) == set(CNN_CHANNELS)
    assert set(FEATURE_GROUPS.values()) == set(GROUPS)
    assert set(CNN_CHANNEL_GROUPS.values()) <= set(GROUPS)


def test_device_state_frozen_value_raises_longest_run_share() -> None:
    """Test that a value stuck while the device keeps reporting shows as a long run."""
    state = DeviceState(SPEC)
    healthy_count = SPEC.warmup + 10 * SPEC.window
    normal_runs = []
    for message in _z2m_messages(seed=5, count=healthy_count):
        _feed(state, [message])
        if state.ready:
            normal_runs.append(_feature(state.features(), "max_longest_run_share"))
    _feed(state, _frozen_messages(seed=6, count=SPEC.window, start=1e6))

    frozen = state.features()

    assert _feature(frozen, "max_longest_run_share") == 1.0
    assert _feature(frozen, "max_longest_run_share") > max(normal_runs)
    assert _feature(frozen, "mean_longest_run_share") > 0.5


def test_device_state_spike_gives_large_abs_z_last() -> None:
    """Test that one reading far off the learned level gives a large z."""
    state = _warmed_state()
    normal = _feature(state.features(), "max_abs_z_last")
    spike = json.dumps({"temperature": 35.0, "linkquality": 120}).encode()
    _feed(state, [(spike, (SPEC.warmup + 1) * PERIOD_S)])

    features = state.features()

    assert normal < 5.0
    assert _feature(features, "max_abs_z_last") >= 20.0
    assert state.deviations()[0].key == "temperature"
    assert state.deviations()[0].z >= 20.0


def test_device_state_keys_beyond_max_keys_are_dropped() -> None:
    """Test that keys beyond `max_keys` are counted as dropped, not tracked."""
    state = DeviceState(FeatureSpec(window=8, warmup=32, max_keys=2))
    payload = b'{"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}'

    _feed(state, [(payload, 0.0)])
    assert state.dropped_keys == 3
    _feed(state, [(payload, PERIOD_S)])
    assert state.dropped_keys == 6


def test_device_state_features_are_deterministic() -> None:
    """Test that the same messages always give identical model inputs."""
    results = []
    for _ in range(2):
        state = _warmed_state(seed=9)
        _feed(state, _messy_messages(start=SPEC.warmup * PERIOD_S))
        results.append(state.features())

    first, second = results
    assert np.array_equal(first.vector, second.vector)
    assert np.array_equal(first.window, second.window)


def test_device_state_deviations_name_the_key_that_strayed_in_the_window() -> None:
    """A reading far off earlier in the window outranks the latest's small wobble."""
    state = _warmed_state()
    time_s = (SPEC.warmup + 1) * PERIOD_S
    spike = json.dumps({"temperature": 35.0, "linkquality": 120}).encode()
    calm = json.dumps({"temperature": 21.0, "linkquality": 150}).encode()
    _feed(state, [(spike, time_s), (calm, time_s + PERIOD_S)])

    top = state.deviations()[0]

    assert top.key == "temperature"
    assert top.value == 35.0
    assert top.z >= 20.0
