"""Rule-based conditions: silent, frozen, unavailable and offline devices."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.conditions import ConditionKind, ConditionVerdict, KeyState
from sidecar.config import Settings, settings_from_mapping
from sidecar.detector import LoadedModels, load_cascade
from sidecar.pipeline import Pipeline
from sidecar.service import build_pipeline
from sidecar.stream import Message
from sidecar.verdicts import Transition

# Zigbee sensors report every 5 minutes (pitfalls.md #12's scenario).
FIVE_MIN_S = 300.0
HOUR_S = 3600.0


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    """The shipped models, loaded once."""
    defaults = Settings()
    return load_cascade(defaults.models, defaults.detection, defaults.window.length)


def _pipeline(models: LoadedModels, **overrides: Any) -> Pipeline:
    settings = settings_from_mapping(overrides)
    if "detection" in overrides:
        # Thresholds are bound into the cascade when it is loaded.
        models = load_cascade(
            settings.models, settings.detection, settings.window.length
        )
    return build_pipeline(settings, models)


def _feed(pipeline: Pipeline, messages: list[Message]) -> list[ConditionVerdict]:
    found: list[ConditionVerdict] = []
    for message in messages:
        found.extend(pipeline.process([message]).conditions)
    return found


def _hall_motion(start: float, count: int, temperature: Any) -> list[Message]:
    """zigbee2mqtt/hall_motion every 5 min; linkquality and occupancy vary."""
    messages = []
    for index in range(count):
        value = temperature(index) if callable(temperature) else temperature
        document = {
            "temperature": value,
            "linkquality": 90 + index % 13,
            "occupancy": index % 3 == 0,
            "battery": 97,
        }
        at = start + index * FIVE_MIN_S
        messages.append(
            Message("zigbee2mqtt/hall_motion", json.dumps(document).encode(), at)
        )
    return messages


def test_frozen_value_fires_once_naming_key_and_duration(
    models: LoadedModels,
) -> None:
    """Test pitfalls.md #12: temperature stuck at 20.95 for 2 h while others vary."""
    pipeline = _pipeline(models)
    history = _hall_motion(0.0, 24, lambda i: round(20.0 + 0.4 * (i % 5), 2))
    frozen = _hall_motion(24 * FIVE_MIN_S, 24, 20.95)

    found = _feed(pipeline, history + frozen)

    assert [(v.kind, v.state) for v in found] == [
        (ConditionKind.FROZEN, Transition.RAISED)
    ]
    verdict = found[0]
    assert [item.key for item in verdict.keys] == ["temperature"]
    assert verdict.keys[0].value == 20.95
    assert verdict.at - verdict.since >= HOUR_S
    assert "temperature stuck at 20.95 for" in verdict.reason()
    document = json.loads(verdict.to_json())
    assert document["kind"] == "frozen"
    assert document["state"] == "raised"
    assert document["keys"][0]["key"] == "temperature"


def test_frozen_clears_when_the_value_moves_again(models: LoadedModels) -> None:
    """Test that a frozen key that changes again clears the condition."""
    pipeline = _pipeline(models)
    messages = _hall_motion(0.0, 24, lambda i: 20.0 + 0.4 * (i % 5))
    messages += _hall_motion(24 * FIVE_MIN_S, 24, 20.95)
    messages += _hall_motion(48 * FIVE_MIN_S, 1, 21.3)

    found = _feed(pipeline, messages)

    assert [(v.kind, v.state) for v in found] == [
        (ConditionKind.FROZEN, Transition.RAISED),
        (ConditionKind.FROZEN, Transition.CLEARED),
    ]


def test_value_resting_where_it_rested_before_is_not_frozen(
    models: LoadedModels,
) -> None:
    """Test that a plug back at its usual 0 W overnight is not called frozen."""
    pipeline = _pipeline(models)
    day = [20.0, 35.5, 41.0, 12.5, 60.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 33.0] * 3
    night = [0.0] * 100
    messages = [
        Message("shellies/plug1/relay/0/power", str(value).encode(), index * FIVE_MIN_S)
        for index, value in enumerate(day + night)
    ]

    assert _feed(pipeline, messages) == []


def test_constant_key_that_never_varied_is_not_frozen(models: LoadedModels) -> None:
    """Test that battery at 97 % forever is not a frozen sensor."""
    pipeline = _pipeline(models)
    messages = _hall_motion(0.0, 60, lambda i: 20.0 + 0.4 * (i % 5))

    found = _feed(pipeline, messages)

    assert all("battery" not in [k.key for k in v.keys] for v in found)
    assert found == []


def _statestream(values: list[bytes], start: float, step: float) -> list[Message]:
    return [
        Message("homeassistant/sensor/grid_power/state", value, start + i * step)
        for i, value in enumerate(values)
    ]


def test_short_unavailability_is_neither_a_drop_nor_a_condition(
    models: LoadedModels,
) -> None:
    """Test pitfalls.md #11: 812, 815, unavailable, unknown, empty, 818."""
    pipeline = _pipeline(models)
    values = [b"812", b"815", b"unavailable", b"unknown", b"", b"818"]

    found = _feed(pipeline, _statestream(values, 0.0, 10.0))

    assert found == []
    assert pipeline.counters.missing == 2
    assert pipeline.counters.empty == 1
    assert pipeline.counters.verdicts_raised == 0


def test_unavailable_longer_than_limit_raises_then_clears(
    models: LoadedModels,
) -> None:
    """Test that `unavailable` for longer than after_s is a verdict of its own."""
    pipeline = _pipeline(models, conditions={"unavailable": {"after_s": 600}})
    _feed(pipeline, _statestream([b"812", b"815", b"unavailable"], 0.0, 60.0))

    assert pipeline.check(120.0 + 599.0) == []
    raised = pipeline.check(120.0 + 601.0)
    cleared = _feed(pipeline, _statestream([b"818"], 800.0, 1.0))

    assert [(v.kind, v.state) for v in raised] == [
        (ConditionKind.UNAVAILABLE, Transition.RAISED)
    ]
    assert raised[0].keys[0].key == "value"
    assert "unavailable for 10 min" in raised[0].reason()
    assert [(v.kind, v.state) for v in cleared] == [
        (ConditionKind.UNAVAILABLE, Transition.CLEARED)
    ]


def _every(topic: str, start: float, step: float, count: int) -> list[Message]:
    return [
        Message(
            topic, json.dumps({"temperature": 4.0 + i % 3}).encode(), start + i * step
        )
        for i in range(count)
    ]


def test_silent_device_judged_against_its_own_rhythm(models: LoadedModels) -> None:
    """Test that an hourly battery sensor is silent after 3 h, not after 10 min."""
    pipeline = _pipeline(models)
    last = 11 * HOUR_S
    _feed(pipeline, _every("zigbee2mqtt/freezer", 0.0, HOUR_S, 12))

    early = pipeline.check(last + 2.9 * HOUR_S)
    raised = pipeline.check(last + 3.1 * HOUR_S)
    again = pipeline.check(last + 5 * HOUR_S)
    cleared = _feed(pipeline, _every("zigbee2mqtt/freezer", last + 6 * HOUR_S, 1, 1))

    assert early == []
    assert [(v.kind, v.state) for v in raised] == [
        (ConditionKind.SILENT, Transition.RAISED)
    ]
    assert raised[0].expected_s == pytest.approx(3 * HOUR_S)
    assert "expected one within 3.0 h" in raised[0].reason()
    assert again == []
    assert [(v.kind, v.state) for v in cleared] == [
        (ConditionKind.SILENT, Transition.CLEARED)
    ]


def test_silence_not_judged_before_the_rhythm_is_learned(
    models: LoadedModels,
) -> None:
    """Test that a device seen a few times is never called silent."""
    pipeline = _pipeline(models)
    _feed(pipeline, _every("zigbee2mqtt/new_sensor", 0.0, 60.0, 3))

    assert pipeline.check(10 * HOUR_S) == []


@pytest.mark.parametrize(
    ("topic", "offline", "online"),
    [
        (
            "zigbee2mqtt/door/availability",
            b'{"state":"offline"}',
            b'{"state":"online"}',
        ),
        ("zigbee2mqtt/bridge/state", b'{"state":"offline"}', b'{"state":"online"}'),
        ("zigbee2mqtt/door/availability", b"offline", b"online"),
        ("tele/door/LWT", b"Offline", b"Online"),
        ("shellies/door/online", b"false", b"true"),
        ("door/status", b"offline", b"online"),
    ],
)
def test_offline_announcement_raises_and_online_clears(
    models: LoadedModels, topic: str, offline: bytes, online: bytes
) -> None:
    """Test availability announcements of zigbee2mqtt, Tasmota, Shelly, ESPHome."""
    pipeline = _pipeline(models)

    found = _feed(
        pipeline,
        [
            Message(topic, offline, 10.0),
            Message(topic, offline, 20.0),
            Message(topic, online, 70.0),
        ],
    )

    device = "zigbee2mqtt/bridge" if "bridge" in topic else "door"
    assert [(v.device, v.kind, v.state) for v in found] == [
        (device, ConditionKind.OFFLINE, Transition.RAISED),
        (device, ConditionKind.OFFLINE, Transition.CLEARED),
    ]
    assert found[1].at - found[1].since == 60.0


def test_offline_device_is_not_also_called_silent(models: LoadedModels) -> None:
    """Test that a device announced offline raises offline, not a second silent."""
    pipeline = _pipeline(models)
    _feed(pipeline, _every("zigbee2mqtt/door", 0.0, 60.0, 12))
    _feed(pipeline, [Message("zigbee2mqtt/door/availability", b"offline", 700.0)])

    assert pipeline.check(5 * HOUR_S) == []


def test_device_back_online_is_judged_silent_from_its_return(
    models: LoadedModels,
) -> None:
    """The hours spent announced offline are not counted as silence after it."""
    pipeline = _pipeline(models)
    _feed(pipeline, _every("zigbee2mqtt/door", 0.0, 60.0, 12))
    _feed(pipeline, [Message("zigbee2mqtt/door/availability", b"offline", 700.0)])
    back = 5 * HOUR_S
    _feed(pipeline, [Message("zigbee2mqtt/door/availability", b"online", back)])

    # A minute after coming back, well within its rhythm (silent after 5 min).
    assert pipeline.check(back + 60.0) == []
    assert [v.kind for v in pipeline.check(back + HOUR_S)] == [ConditionKind.SILENT]


def test_reload_clears_conditions_no_longer_watched(models: LoadedModels) -> None:
    """Switching a condition off live clears what it raised, as a restart does."""
    pipeline = _pipeline(models)
    _feed(pipeline, [Message("zigbee2mqtt/door/availability", b"offline", 10.0)])
    pipeline.conditions = settings_from_mapping(
        {"conditions": {"offline": {"enabled": False}}}
    ).conditions

    result = pipeline.clear_unwatched(20.0)
    again = pipeline.clear_unwatched(30.0)

    assert [(v.device, v.kind, v.state) for v in result.conditions] == [
        ("door", ConditionKind.OFFLINE, Transition.CLEARED)
    ]
    assert "no longer watched" in result.conditions[0].reason()
    assert again.conditions == []


def test_unknown_availability_payload_changes_nothing(models: LoadedModels) -> None:
    """Test that an availability topic with an unknown word is only counted."""
    pipeline = _pipeline(models)

    found = _feed(pipeline, [Message("tele/door/LWT", b"\xff\xfe maybe", 1.0)])

    assert found == []
    assert pipeline.counters.availability == 1


def test_evicted_device_gets_its_raised_conditions_cleared(
    models: LoadedModels,
) -> None:
    """Test that eviction never leaves a retained raised condition behind."""
    pipeline = _pipeline(models, limits={"max_devices": 1})
    _feed(pipeline, [Message("tele/door/LWT", b"Offline", 1.0)])

    found = _feed(pipeline, _every("zigbee2mqtt/other", 2.0, 1.0, 1))

    assert [(v.device, v.kind, v.state) for v in found] == [
        ("door", ConditionKind.OFFLINE, Transition.CLEARED)
    ]
    assert "no longer tracked" in found[0].reason()
    # Since the offline began, not since the eviction.
    assert found[0].since == 1.0
    assert pipeline.counters.devices_evicted == 1


def test_conditions_can_be_switched_off(models: LoadedModels) -> None:
    """Test that disabled conditions raise nothing."""
    pipeline = _pipeline(
        models,
        conditions={
            "silent": {"enabled": False},
            "offline": {"enabled": False},
        },
    )
    _feed(pipeline, _every("zigbee2mqtt/door", 0.0, 60.0, 12))

    found = _feed(pipeline, [Message("zigbee2mqtt/door/availability", b"offline", 1e3)])

    assert found == []
    assert pipeline.check(10 * HOUR_S) == []


def test_evicted_device_in_alarm_gets_a_cleared_verdict(models: LoadedModels) -> None:
    """Test that an evicted device's model alarm is cleared with the reason."""
    pipeline = _pipeline(
        models,
        limits={"max_devices": 1},
        detection={
            "rf_threshold": 0.0,
            "cnn_threshold": 0.0,
            "fused_threshold": 0.0,
            "alarm_after": 1,
            "clear_after": 10_000,
        },
    )
    raised = pipeline.process(_every("zigbee2mqtt/fridge", 0.0, 1.0, 230)).verdicts
    assert [v.state for v in raised] == [Transition.RAISED]

    cleared = pipeline.process(_every("zigbee2mqtt/other", 300.0, 1.0, 1)).verdicts

    assert [(v.device, v.state) for v in cleared] == [("fridge", Transition.CLEARED)]
    assert "no longer tracked" in cleared[0].reason()
    assert json.loads(cleared[0].to_json())["state"] == "cleared"


def _left_raised(kind: ConditionKind, at: float, **fields: Any) -> bytes:
    """A raised condition of hall_motion as a previous run left it retained."""
    return ConditionVerdict(
        "hall_motion", kind, Transition.RAISED, at, at - HOUR_S, **fields
    ).to_json()


def test_adopted_frozen_holds_until_the_value_moves(models: LoadedModels) -> None:
    """Test that a frozen key carried over a restart clears only when it changes."""
    pipeline = _pipeline(models)
    start = 10 * HOUR_S
    stuck = KeyState("temperature", start - 2 * HOUR_S, 24, 20.95)
    left = _left_raised(ConditionKind.FROZEN, start, keys=(stuck,))

    adopted = pipeline.adopt("hall_motion/frozen", left, start)
    still = _feed(pipeline, _hall_motion(start, 6, 20.95))
    moved = _feed(pipeline, _hall_motion(start + 6 * FIVE_MIN_S, 1, 21.4))

    assert adopted.conditions == []
    assert still == []
    assert [(v.kind, v.state) for v in moved] == [
        (ConditionKind.FROZEN, Transition.CLEARED)
    ]
    assert pipeline.counters.alarms_adopted == 1


def test_adopted_offline_clears_at_once_if_already_announced_online(
    models: LoadedModels,
) -> None:
    """Test that a retained offline alarm arriving after `online` is cleared."""
    pipeline = _pipeline(models)
    online = Message("zigbee2mqtt/hall_motion/availability", b"online", 100.0)
    pipeline.process([online])

    result = pipeline.adopt(
        "hall_motion/offline", _left_raised(ConditionKind.OFFLINE, 50.0), 101.0
    )

    assert [(v.kind, v.state) for v in result.conditions] == [
        (ConditionKind.OFFLINE, Transition.CLEARED)
    ]


def test_adopted_condition_that_is_switched_off_now_is_cleared(
    models: LoadedModels,
) -> None:
    """Test that an alarm of a condition this run does not watch is not left up."""
    pipeline = _pipeline(models, conditions={"silent": {"enabled": False}})

    result = pipeline.adopt(
        "hall_motion/silent", _left_raised(ConditionKind.SILENT, 50.0), 51.0
    )

    assert [(v.kind, v.state) for v in result.conditions] == [
        (ConditionKind.SILENT, Transition.CLEARED)
    ]


@pytest.mark.parametrize(
    ("level", "payload"),
    [
        pytest.param(
            "hall_motion/silent",
            ConditionVerdict(
                "hall_motion", ConditionKind.SILENT, Transition.CLEARED, 9.0, 1.0
            ).to_json(),
            id="cleared",
        ),
        pytest.param(
            "other_device/silent",
            _left_raised(ConditionKind.SILENT, 50.0),
            id="device_not_of_this_level",
        ),
        pytest.param("hall_motion/silent", b"raised", id="not_json"),
        pytest.param(
            "hall_motion/silent",
            b'{"device":"hall_motion","kind":"silent","state":"raised",'
            b'"since":"2026-12-04T10:00:00+00:00"}',
            id="no_origin_so_not_ours",
        ),
        pytest.param(
            "hall_motion/frozen",
            b'{"origin":"anomaly-sidecar","device":"hall_motion","kind":"frozen",'
            b'"state":"raised","since":"2026-12-04T10:00:00+00:00","keys":[{"key":'
            b'"t","since":"2026-12-04T10:00:00+00:00","messages":Infinity,"value":1}]}',
            id="infinite_count",
        ),
        pytest.param(
            "hall_motion/frozen",
            b'{"origin":"anomaly-sidecar","device":"hall_motion","kind":"frozen",'
            b'"state":"raised","since":"2026-12-04T10:00:00+00:00","keys":[{"key":'
            b'"t","since":"2026-12-04T10:00:00+00:00","messages":3,"value":'
            + b"9" * 400
            + b"}]}",
            id="value_beyond_float",
        ),
        pytest.param("hall_motion/silent/x", b"{}", id="too_deep"),
        pytest.param(
            "hall_motion/sleepy",
            _left_raised(ConditionKind.SILENT, 50.0),
            id="unknown_kind",
        ),
    ],
)
def test_adopt_passes_over_what_is_not_a_raised_alarm_of_ours(
    models: LoadedModels, level: str, payload: bytes
) -> None:
    """Test that only raised verdicts matching their topic are carried over."""
    pipeline = _pipeline(models)

    result = pipeline.adopt(level, payload, 60.0)

    assert result.conditions == []
    assert result.verdicts == []
    assert pipeline.counters.alarms_adopted == 0


def test_adopt_leaves_an_alarm_this_run_raised_alone(models: LoadedModels) -> None:
    """Test that a replay of our own raised silent alarm after a reconnect is kept."""
    pipeline = _pipeline(models)
    _feed(pipeline, _hall_motion(0.0, 20, lambda i: 20.0 + 0.1 * i))
    raised = pipeline.check(20 * FIVE_MIN_S + 3 * HOUR_S)
    assert [(v.kind, v.state) for v in raised] == [
        (ConditionKind.SILENT, Transition.RAISED)
    ]

    result = pipeline.adopt("hall_motion/silent", raised[0].to_json(), 1e5)

    assert result.conditions == []
    assert pipeline.counters.alarms_adopted == 0
