"""Specification of the synthetic anomaly injectors of the self-supervised mode."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from converters.inject import INJECTOR_NAMES, INJECTORS, applies, inject, interpolate
from converters.ton_iot import LabeledMessage
from sidecar.payload import PayloadKind, parse_payload
from sidecar.stream import Message

# One report a minute, as zigbee2mqtt sensors do; 400 messages leave room for
# three episodes of every kind after a 128-message warm-up.
PERIOD_S = 60.0
COUNT = 400
EARLIEST = 128
EPISODES = 3
START = 1_700_000_000.0
DEVICE = "kitchen_sensor"
TOPIC = f"zigbee2mqtt/{DEVICE}"
# Injected readings are rounded to the original's decimals (2 here), so two
# edits of one episode agree to within a rounding step on each side.
ROUNDING = 0.011


def _sensor_stream(seed: int = 0, count: int = COUNT) -> list[LabeledMessage]:
    """A z2m sensor: temperature with a daily-like wave, humidity, a steady battery."""
    rng = np.random.default_rng(seed)
    stream = []
    for i in range(count):
        document = {
            "temperature": round(21.0 + math.sin(i / 30.0) + rng.normal(0, 0.1), 2),
            "humidity": round(55.0 + rng.normal(0, 1.0), 1),
            "battery": 91,
            "contact": bool(i % 40 < 4),
        }
        payload = json.dumps(document).encode()
        message = Message(TOPIC, payload, START + i * PERIOD_S + rng.uniform(0, 2))
        stream.append(LabeledMessage(DEVICE, message, 0, "normal"))
    return stream


def _plain_stream(count: int = COUNT) -> list[LabeledMessage]:
    """An ESPHome sensor publishing a bare number with a unit."""
    return [
        LabeledMessage(
            DEVICE,
            Message(TOPIC, f"{20 + (i % 7) * 0.25:.2f} °C".encode(), START + i * 30.0),
            0,
            "normal",
        )
        for i in range(count)
    ]


def _values(item: LabeledMessage) -> dict[str, float]:
    return parse_payload(item.message.payload).values


def _originals(
    stream: list[LabeledMessage], injected: list[LabeledMessage]
) -> list[tuple[LabeledMessage, LabeledMessage]]:
    """Pairs (input, output) of labeled messages that kept their receive time."""
    by_time = {item.message.received_at: item for item in stream}
    return [
        (by_time[item.message.received_at], item)
        for item in injected
        if item.label == 1 and item.message.received_at in by_time
    ]


def _changed_keys(before: LabeledMessage, after: LabeledMessage) -> set[str]:
    return {
        key
        for key, value in _values(after).items()
        if _values(before).get(key) != value
    }


def _changed_key(pairs: list[tuple[LabeledMessage, LabeledMessage]]) -> str:
    """The one key an episode edited."""
    keys = set().union(*(_changed_keys(before, after) for before, after in pairs))
    assert len(keys) == 1, keys
    return keys.pop()


def _spread(stream: list[LabeledMessage], key: str) -> float:
    return float(np.std([_values(item)[key] for item in stream]))


@pytest.mark.parametrize("kind", INJECTOR_NAMES)
def test_inject_is_deterministic_for_a_seed(kind: str) -> None:
    """Test that one seed always gives the same stream and another seed another."""
    stream = _sensor_stream()
    first = inject(stream, kind, seed=7, episodes=EPISODES, earliest=EARLIEST)
    again = inject(stream, kind, seed=7, episodes=EPISODES, earliest=EARLIEST)
    other = inject(stream, kind, seed=8, episodes=EPISODES, earliest=EARLIEST)
    assert first == again
    assert first != other


@pytest.mark.parametrize("kind", INJECTOR_NAMES)
def test_inject_labels_exactly_the_messages_it_changed_or_added(kind: str) -> None:
    """Test that an unlabeled message is an input message with its input predecessor.

    Every other message (added, edited, moved, or following a removed or added
    one) is labeled 1 with the injector's name as its attack type.
    """
    stream = _sensor_stream()
    injected = inject(stream, kind, seed=3, episodes=EPISODES, earliest=EARLIEST)
    # Receive times are unique in the input, so a time names the input message
    # an output message came from (an added message has a time of its own).
    origin_of = {item.message.received_at: index for index, item in enumerate(stream)}
    previous: int | None = -1
    for item in injected:
        origin = origin_of.get(item.message.received_at)
        unchanged = (
            origin is not None
            and previous == origin - 1
            and item.message == stream[origin].message
        )
        if unchanged and origin is not None:
            assert item == stream[origin]
        else:
            assert item.label == 1, (kind, item)
            assert item.attack_type == kind
        previous = origin
    assert sum(item.label for item in injected) > 0


@pytest.mark.parametrize("kind", INJECTOR_NAMES)
def test_inject_leaves_the_stream_outside_its_episodes_byte_identical(
    kind: str,
) -> None:
    """Test that what precedes the first and follows the last change is the input."""
    stream = _sensor_stream()
    injected = inject(stream, kind, seed=5, episodes=EPISODES, earliest=EARLIEST)
    labeled = [index for index, item in enumerate(injected) if item.label]
    first, last = labeled[0], labeled[-1]
    tail = len(injected) - last - 1
    assert first >= EARLIEST
    assert injected[:first] == stream[:first]
    assert tail > 0
    assert injected[last + 1 :] == stream[len(stream) - tail :]
    assert all(item.device == DEVICE for item in injected)


def test_inject_spike_raises_a_few_readings_far_above_the_usual_range() -> None:
    """Test that a spike lifts one key of one to three messages per episode."""
    stream = _sensor_stream()
    injected = inject(stream, "spike", seed=1, episodes=EPISODES, earliest=EARLIEST)
    pairs = _originals(stream, injected)
    assert len(injected) == len(stream)
    assert EPISODES <= len(pairs) <= 3 * EPISODES
    for before, after in pairs:
        (key,) = _changed_keys(before, after)
        rise = _values(after)[key] - _values(before)[key]
        assert rise >= 4.9 * _spread(stream, key)


def test_inject_dip_drops_a_few_readings_far_below_the_usual_range() -> None:
    """Test that a dip lowers one key of one to three messages per episode."""
    stream = _sensor_stream()
    injected = inject(stream, "dip", seed=1, episodes=EPISODES, earliest=EARLIEST)
    pairs = _originals(stream, injected)
    assert EPISODES <= len(pairs) <= 3 * EPISODES
    for before, after in pairs:
        (key,) = _changed_keys(before, after)
        fall = _values(before)[key] - _values(after)[key]
        assert fall >= 4.9 * _spread(stream, key)


def test_inject_level_shift_moves_one_key_by_a_constant_offset() -> None:
    """Test that a level shift adds one offset, of at least 3 spreads, per episode."""
    stream = _sensor_stream()
    injected = inject(stream, "level_shift", seed=2, episodes=1, earliest=EARLIEST)
    pairs = _originals(stream, injected)
    key = _changed_key(pairs)
    offsets = [_values(after)[key] - _values(before)[key] for before, after in pairs]
    assert len(pairs) >= 16
    assert max(offsets) - min(offsets) <= 2 * ROUNDING
    assert abs(offsets[0]) >= 2.9 * _spread(stream, key)


def test_inject_drift_moves_one_key_further_with_every_message() -> None:
    """Test that a drift's offset grows steadily from the episode's start."""
    stream = _sensor_stream()
    injected = inject(stream, "drift", seed=4, episodes=1, earliest=EARLIEST)
    pairs = _originals(stream, injected)
    key = _changed_key(pairs)
    offsets = np.abs(
        [_values(after)[key] - _values(before)[key] for before, after in pairs]
    )
    assert len(pairs) >= 16
    assert np.all(np.diff(offsets) >= -2 * ROUNDING)
    assert offsets[-1] > 10 * offsets[0]


def test_inject_stuck_holds_one_key_constant_over_the_episode() -> None:
    """Test that a stuck key repeats the reading it had just before the episode."""
    stream = _sensor_stream()
    injected = inject(stream, "stuck", seed=6, episodes=1, earliest=EARLIEST)
    labeled = [index for index, item in enumerate(injected) if item.label]
    key = _changed_key(_originals(stream, injected))
    held = {_values(injected[index])[key] for index in labeled}
    before = _values(injected[labeled[0] - 1])[key]
    assert key in {"temperature", "humidity"}  # keys that change on most reports
    assert held == {before}
    assert len(labeled) >= 16


def test_inject_noise_burst_adds_zero_mean_noise_to_one_key() -> None:
    """Test that a noise burst scatters one key by at least 2 spreads."""
    stream = _sensor_stream()
    injected = inject(stream, "noise_burst", seed=9, episodes=1, earliest=EARLIEST)
    pairs = _originals(stream, injected)
    key = _changed_key(pairs)
    if key == "contact":
        changes = [
            _values(after)[key] != _values(before)[key] for before, after in pairs
        ]
        assert 0.2 < np.mean(changes) < 0.8  # a coin toss per report
        return
    noise = np.array(
        [_values(after)[key] - _values(before)[key] for before, after in pairs]
    )
    assert noise.std() >= 1.5 * _spread(stream, key)
    assert abs(noise.mean()) < noise.std()


def test_inject_dropout_leaves_a_gap_of_missing_reports() -> None:
    """Test that a dropout removes consecutive reports and labels the one after."""
    stream = _sensor_stream()
    injected = inject(stream, "dropout", seed=1, episodes=1, earliest=EARLIEST)
    labeled = [item for item in injected if item.label]
    removed = len(stream) - len(injected)
    index = injected.index(labeled[0])
    gap = labeled[0].message.received_at - injected[index - 1].message.received_at
    assert 4 <= removed <= 32
    assert len(labeled) == 1
    assert labeled[0].message == stream[index + removed].message
    assert gap >= (removed + 1) * PERIOD_S - 2


def test_inject_flood_multiplies_the_message_rate() -> None:
    """Test that a flood adds at least ten times the usual messages in its span."""
    stream = _sensor_stream()
    injected = inject(stream, "flood", seed=2, episodes=1, earliest=EARLIEST)
    labeled = [item.message.received_at for item in injected if item.label]
    span_s = max(labeled) - min(labeled)
    usual = sum(
        min(labeled) <= item.message.received_at <= max(labeled) for item in stream
    )
    assert len(labeled) >= 10 * usual
    assert len(labeled) / span_s >= 9 / PERIOD_S


def test_inject_cadence_change_changes_the_reporting_interval() -> None:
    """Test that the gaps inside the episode are at least twice or half the usual."""
    stream = _sensor_stream()
    for seed in range(6):
        injected = inject(stream, "cadence_change", seed=seed, earliest=EARLIEST)
        times = [item.message.received_at for item in injected if item.label]
        ratio = float(np.median(np.diff(times))) / PERIOD_S
        assert ratio <= 0.55 or ratio >= 1.9, (seed, ratio)


def test_inject_malformed_burst_makes_payloads_the_sidecar_cannot_parse() -> None:
    """Test that every changed payload is unparsable or binary to the sidecar."""
    for stream in (_sensor_stream(), _plain_stream()):
        injected = inject(stream, "malformed_burst", seed=3, earliest=EARLIEST)
        kinds = {
            parse_payload(item.message.payload).kind for item in injected if item.label
        }
        assert kinds
        assert kinds <= {PayloadKind.UNPARSABLE, PayloadKind.BINARY}


def test_inject_keeps_the_encoding_of_an_edited_payload() -> None:
    """Test that an edited payload keeps its key order, JSON style and decimals."""
    stream = _sensor_stream()
    injected = inject(stream, "level_shift", seed=2, earliest=EARLIEST)
    edited = next(item for item in injected if item.label)
    original = next(
        item
        for item in stream
        if item.message.received_at == edited.message.received_at
    )
    before = json.loads(original.message.payload)
    after = json.loads(edited.message.payload)
    assert list(after) == list(before)
    assert edited.message.payload.startswith(b'{"temperature": ')
    assert all(type(after[key]) is type(before[key]) for key in before)

    plain = inject(_plain_stream(), "spike", seed=1, earliest=EARLIEST)
    spiked = next(item for item in plain if item.label).message.payload.decode()
    number, unit = spiked.split(" ")
    assert unit == "°C"
    assert len(number.partition(".")[2]) == 2


def test_inject_places_no_episode_before_earliest() -> None:
    """Test that the messages the sidecar learns from are never changed."""
    stream = _sensor_stream()
    for kind in INJECTOR_NAMES:
        for seed in range(4):
            injected = inject(stream, kind, seed=seed, episodes=2, earliest=EARLIEST)
            assert injected[:EARLIEST] == stream[:EARLIEST]


def test_value_injectors_do_not_apply_to_a_device_without_readings() -> None:
    """Test that a words-only device gets only timing and payload injectors."""
    words = [
        LabeledMessage(
            DEVICE, Message(TOPIC, b"ON" if i % 2 else b"OFF", i * 5.0), 0, "normal"
        )
        for i in range(COUNT)
    ]
    usable = {kind for kind in INJECTOR_NAMES if applies(kind, words)}
    assert usable == {
        name for name, spec in INJECTORS.items() if spec.needs == "nothing"
    }
    with pytest.raises(ValueError, match="needs a numeric reading"):
        inject(words, "spike", seed=0, earliest=EARLIEST)


def test_inject_refuses_episodes_that_do_not_fit() -> None:
    """Test that a stream too short for the episodes is an error, not a silent no-op."""
    with pytest.raises(ValueError, match="do not fit"):
        inject(_sensor_stream(count=140), "stuck", seed=0, earliest=EARLIEST)


def test_interpolate_reports_more_often_with_readings_in_between() -> None:
    """Test that a normal copy at a finer cadence keeps the input and stays normal."""
    stream = _sensor_stream(count=50)
    finer = interpolate(stream, 2)
    times = [item.message.received_at for item in finer]
    assert len(finer) == 2 * len(stream) - 1
    assert finer[::2] == stream
    assert all(item.label == 0 for item in finer)
    assert times == sorted(times)
    for before, added, after in zip(finer[::2], finer[1::2], finer[2::2], strict=False):
        low, high = sorted(
            (_values(before)["temperature"], _values(after)["temperature"])
        )
        assert low - ROUNDING <= _values(added)["temperature"] <= high + ROUNDING
        assert _values(added)["contact"] == _values(before)["contact"]
