"""Per-device overrides, users' false-positive marks and reloads without restart."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli_helpers import sidecar_process, wait_for_text
from mqtt_helpers import BrokerAddress, MessageCollector, publish

from sidecar.config import MuteWindow, Settings, settings_from_mapping
from sidecar.detector import card_path, load_cascade
from sidecar.overrides import FeedbackStore, OverrideTable
from sidecar.pipeline import Pipeline
from sidecar.service import Service, build_pipeline, feedback_topic
from sidecar.stream import Message
from sidecar.verdicts import Transition

# Thresholds at 0 and one window to raise: any window above the device's own
# median raises at once, so a test sees a verdict after the warm-up.
ALWAYS_ALARM = {
    "rf_threshold": 0.0,
    "cnn_threshold": 0.0,
    "fused_threshold": 0.0,
    "alarm_after": 1,
    "clear_after": 10_000,
}
# Past the shipped models' warm-up (128 messages) with windows to spare.
READINGS = 230
CONNECT_TIMEOUT_S = 10.0
VERDICT_TIMEOUT_S = 20.0
# `run` polls its files every 2 s and applies a change once it settled.
RELOAD_TIMEOUT_S = 15.0
STARTUP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 15.0


def _readings(topic: str, count: int = READINGS, start: float = 0.0) -> list[Message]:
    return [
        Message(
            topic,
            json.dumps(
                {"temperature": 21.0 + (i % 7) * 0.1, "lq": 100 + i % 9}
            ).encode(),
            start + i,
        )
        for i in range(count)
    ]


def _pipeline(tmp_path: Path, **sections: Any) -> Pipeline:
    sections.setdefault("detection", ALWAYS_ALARM)
    sections.setdefault("feedback", {"state_file": str(tmp_path / "feedback.json")})
    settings = settings_from_mapping(sections)
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    return build_pipeline(settings, models)


def _raised(pipeline: Pipeline, topic: str) -> list[str]:
    result = pipeline.process(_readings(topic))
    return [v.device for v in result.verdicts if v.state is Transition.RAISED]


def test_override_ignores_matching_devices(tmp_path: Path) -> None:
    """Test that an ignored device is counted and never raised."""
    pipeline = _pipeline(tmp_path, overrides=[{"device": "garage_*", "ignore": True}])

    assert _raised(pipeline, "zigbee2mqtt/garage_door") == []
    assert _raised(pipeline, "zigbee2mqtt/kitchen") == ["kitchen"]
    assert pipeline.counters.ignored_by_override == READINGS


def test_override_thresholds_apply_per_device_by_topic_filter(tmp_path: Path) -> None:
    """Test that a device-specific fused threshold of 1 keeps it quiet, only it."""
    pipeline = _pipeline(
        tmp_path, overrides=[{"topic": "zigbee2mqtt/noisy", "fused_threshold": 1.0}]
    )

    assert _raised(pipeline, "zigbee2mqtt/noisy") == []
    assert _raised(pipeline, "zigbee2mqtt/calm") == ["calm"]


def test_override_alarm_after_needs_more_confirmations(tmp_path: Path) -> None:
    """Test that alarm_after per device delays its raise."""
    quick = _pipeline(tmp_path)
    slow = _pipeline(tmp_path, overrides=[{"device": "plug", "alarm_after": 50}])

    quick_seq = quick.process(_readings("zigbee2mqtt/plug")).verdicts[0].seq
    slow_seq = slow.process(_readings("zigbee2mqtt/plug")).verdicts[0].seq

    assert slow_seq - quick_seq == 49


def test_muted_device_verdicts_are_counted_not_published(tmp_path: Path) -> None:
    """Test that a mute rule holds verdicts back and counts them."""
    pipeline = _pipeline(tmp_path, overrides=[{"device": "plug", "mute": True}])

    assert _raised(pipeline, "zigbee2mqtt/plug") == []
    assert pipeline.counters.verdicts_muted == 1


def test_topic_override_applies_to_a_device_first_seen_by_its_availability(
    tmp_path: Path,
) -> None:
    """zigbee2mqtt's retained availability arrives before any reading.

    The device's topic is its first telemetry topic, so a topic override
    written for `zigbee2mqtt/<name>` still selects it.
    """
    pipeline = _pipeline(
        tmp_path, overrides=[{"topic": "zigbee2mqtt/plug", "ignore": True}]
    )
    availability = Message(
        "zigbee2mqtt/plug/availability", b'{"state":"online"}', 0.0, retain=True
    )
    pipeline.process([availability])

    assert _raised(pipeline, "zigbee2mqtt/plug") == []
    assert pipeline.counters.ignored_by_override == READINGS
    assert not pipeline.tracks("plug")


def test_mute_holds_back_raises_but_never_a_clear(tmp_path: Path) -> None:
    """A clear swallowed by a mute would leave the alarm standing for good."""
    pipeline = _pipeline(
        tmp_path,
        detection={**ALWAYS_ALARM, "clear_after": 3},
        overrides=[{"device": "plug", "mute": True}],
    )
    assert _raised(pipeline, "zigbee2mqtt/plug") == []
    settings = settings_from_mapping(
        {"overrides": [{"device": "plug", "fused_threshold": 1.0, "mute": True}]}
    )
    pipeline.apply_overrides(OverrideTable(settings.overrides))

    later = pipeline.process(_readings("zigbee2mqtt/plug", count=10, start=1000.0))

    assert [v.state for v in later.verdicts] == [Transition.CLEARED]


@pytest.mark.parametrize(
    ("start", "end", "moment", "covered"),
    [
        ("22:00", "06:00", "23:30", True),
        ("22:00", "06:00", "05:59", True),
        ("22:00", "06:00", "06:00", False),
        ("09:00", "17:00", "12:00", True),
        ("09:00", "17:00", "08:59", False),
    ],
)
def test_mute_window_in_local_time_may_span_midnight(
    start: str, end: str, moment: str, covered: bool
) -> None:
    """Test the daily mute windows, including one across midnight."""
    window = MuteWindow.model_validate({"start": start, "end": end})

    assert window.covers(dt.time.fromisoformat(moment)) is covered


def test_reloaded_overrides_apply_to_devices_already_tracked(tmp_path: Path) -> None:
    """Test that apply_overrides re-resolves rules for known devices."""
    pipeline = _pipeline(tmp_path)
    pipeline.process(_readings("zigbee2mqtt/plug", count=10))
    settings = settings_from_mapping(
        {"overrides": [{"device": "plug", "ignore": True}]}
    )

    pipeline.apply_overrides(OverrideTable(settings.overrides))
    result = pipeline.process(_readings("zigbee2mqtt/plug", start=10.0))

    assert result.verdicts == []
    assert pipeline.counters.ignored_by_override == READINGS


def test_false_positive_mark_clears_raises_threshold_and_persists(
    tmp_path: Path,
) -> None:
    """Test that a mark clears the alarm, quiets the device and survives restart."""
    pipeline = _pipeline(
        tmp_path, feedback={"step": 1.0, "state_file": str(tmp_path / "fb.json")}
    )
    assert _raised(pipeline, "zigbee2mqtt/plug") == ["plug"]

    cleared = pipeline.mark_false_positive("plug", 1000.0)
    later = pipeline.process(_readings("zigbee2mqtt/plug", start=1000.0)).verdicts

    assert [(v.device, v.state) for v in cleared] == [("plug", Transition.CLEARED)]
    assert "marked false positive by a user (1 so far)" in cleared[0].reason()
    assert later == []
    settings = settings_from_mapping(
        {"feedback": {"state_file": str(tmp_path / "fb.json")}}
    )
    assert FeedbackStore(settings.feedback).marks("plug") == 1


def test_feedback_reset_takes_back_the_marks_and_the_device_alarms_again(
    tmp_path: Path,
) -> None:
    """Test that `reset` forgets a device's marks, in memory and on disk."""
    state_file = tmp_path / "fb.json"
    pipeline = _pipeline(
        tmp_path, feedback={"step": 1.0, "state_file": str(state_file)}
    )
    assert _raised(pipeline, "zigbee2mqtt/plug") == ["plug"]
    pipeline.mark_false_positive("plug", 1000.0)

    pipeline.reset_feedback("plug")
    again = pipeline.process(_readings("zigbee2mqtt/plug", start=1000.0)).verdicts

    assert [(v.device, v.state) for v in again] == [("plug", Transition.RAISED)]
    settings = settings_from_mapping({"feedback": {"state_file": str(state_file)}})
    assert FeedbackStore(settings.feedback).marks("plug") == 0


def test_feedback_for_unknown_devices_is_counted_not_applied(tmp_path: Path) -> None:
    """A flood of marks for devices nobody tracks costs a lookup each, no more."""
    state_file = tmp_path / "fb.json"
    pipeline = _pipeline(tmp_path, feedback={"state_file": str(state_file)})
    assert _raised(pipeline, "zigbee2mqtt/plug") == ["plug"]

    for index in range(1000):
        assert pipeline.mark_false_positive(f"ghost_{index}", 1000.0) == []
    pipeline.reset_feedback("ghost_0")

    assert pipeline.counters.feedback_unknown == 1001
    assert pipeline.counters.feedback_marks == 0
    assert not state_file.exists()


def test_feedback_store_survives_a_broken_file(tmp_path: Path) -> None:
    """Test that an unreadable feedback file starts empty instead of failing."""
    path = tmp_path / "fb.json"
    path.write_text("{not json")
    settings = settings_from_mapping({"feedback": {"state_file": str(path)}})

    store = FeedbackStore(settings.feedback)

    assert store.marks("plug") == 0
    assert store.mark("plug") == 1
    assert json.loads(path.read_text()) == {"false_positive": {"plug": 1}}


@pytest.mark.broker
def test_feedback_topic_clears_a_raised_device_end_to_end(
    broker: BrokerAddress, tmp_path: Path
) -> None:
    """Test `false_positive` on anomalies/_feedback/<device> through a real broker."""
    settings = settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
            },
            "detection": ALWAYS_ALARM,
            "feedback": {"state_file": str(tmp_path / "fb.json")},
        }
    )
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    service = Service(settings, models)
    service.start()
    topic = "anomalies/fb_plug"
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        with MessageCollector(broker, topic) as verdicts:
            for message in _readings("zigbee2mqtt/fb_plug"):
                publish(broker, message.topic, message.payload, qos=1)
            verdicts.wait_for(
                lambda seen: any(m.topic == topic for m in seen), VERDICT_TIMEOUT_S
            )
            publish(broker, feedback_topic("anomalies", "fb_plug"), b"false_positive")
            seen = verdicts.wait_for(
                lambda seen: len([m for m in seen if m.topic == topic]) >= 2,
                VERDICT_TIMEOUT_S,
            )
    finally:
        service.stop()

    states = [json.loads(m.payload) for m in seen if m.topic == topic]
    assert [s["state"] for s in states] == ["raised", "cleared"]
    assert "false positive" in states[1]["reason"]
    assert json.loads((tmp_path / "fb.json").read_text()) == {
        "false_positive": {"fb_plug": 1}
    }


@pytest.mark.broker
def test_run_reloads_config_and_models_without_restart(
    mosquitto_broker: BrokerAddress, tmp_path: Path
) -> None:
    """Test SIGHUP, a changed config file, a bad edit and a changed model card.

    Models are reloaded when their files change, not on every SIGHUP.
    """
    models_dir = tmp_path / "models"
    shutil.copytree(Settings().models.directory, models_dir)
    config = tmp_path / "sidecar.yaml"
    base: dict[str, Any] = {
        "broker": {"host": mosquitto_broker.host, "port": mosquitto_broker.port},
        "models": {"directory": str(models_dir)},
        "logging": {"level": "INFO"},
    }
    config.write_text(yaml.safe_dump(base))
    log = tmp_path / "sidecar.stderr"
    with sidecar_process(["run", "--config", str(config)], log) as process:
        wait_for_text(log, "subscribed filters=", STARTUP_TIMEOUT_S)

        with_override = {**base, "overrides": [{"device": "garage_*", "ignore": True}]}
        config.write_text(yaml.safe_dump(with_override))
        process.send_signal(signal.SIGHUP)
        wait_for_text(
            log, "config applied changed=overrides overrides=1", RELOAD_TIMEOUT_S
        )

        config.write_text(yaml.safe_dump({**base, "limits": {"queue_size": -1}}))
        wait_for_text(
            log, "config not reloaded, the running one is kept", RELOAD_TIMEOUT_S
        )
        assert "limits.queue_size" in log.read_text()

        card = card_path(models_dir / "rf.onnx")
        document = json.loads(card.read_text())
        document["version"] = "hot-swapped"
        card.write_text(json.dumps(document))
        wait_for_text(log, "'rf': 'hot-swapped'", RELOAD_TIMEOUT_S)

        as_json = {**with_override, "logging": {"level": "INFO", "format": "json"}}
        config.write_text(yaml.safe_dump(as_json))
        wait_for_text(log, '"changed": "logging"', RELOAD_TIMEOUT_S)

        process.send_signal(signal.SIGTERM)
        code = process.wait(EXIT_TIMEOUT_S)

    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()
    # Once, for the changed card; the SIGHUP above did not reload them.
    assert log.read_text().count("models reloaded") == 1


@pytest.mark.broker
def test_overrides_mute_one_device_end_to_end(
    mosquitto_broker: BrokerAddress, tmp_path: Path
) -> None:
    """Test through Mosquitto: the muted device publishes nothing, the other does."""
    broker = mosquitto_broker
    settings = settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
            },
            "detection": ALWAYS_ALARM,
            "overrides": [{"device": "muted_*", "mute": True}],
            "feedback": {"state_file": str(tmp_path / "fb.json")},
        }
    )
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    service = Service(settings, models)
    service.start()
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        with MessageCollector(broker, "anomalies/+") as verdicts:
            for message in _readings("zigbee2mqtt/muted_plug"):
                publish(broker, message.topic, message.payload, qos=1)
            for message in _readings("zigbee2mqtt/loud_plug"):
                publish(broker, message.topic, message.payload, qos=1)
            seen = verdicts.wait_for(
                lambda seen: any(m.topic == "anomalies/loud_plug" for m in seen),
                VERDICT_TIMEOUT_S,
            )
        counters = service.counters
    finally:
        service.stop()

    topics = {m.topic for m in seen}
    assert "anomalies/muted_plug" not in topics
    assert counters["verdicts_muted"] == 1
