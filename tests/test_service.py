"""End-to-end behaviour of the sidecar against real brokers (amqtt and Mosquitto)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_helpers import BrokerAddress, MessageCollector, ReceivedMessage, publish
from paho.mqtt.enums import CallbackAPIVersion

from sidecar.conditions import ConditionKind, ConditionVerdict
from sidecar.config import Settings, settings_from_mapping
from sidecar.detector import LoadedModels, load_cascade
from sidecar.mqtt import MqttAdapter, PublishOutcome
from sidecar.service import Service, condition_topic, verdict_topic
from sidecar.stream import Message
from sidecar.verdicts import Transition, Verdict

pytestmark = pytest.mark.broker

# Enough messages for one device to pass the shipped models' feature warm-up
# (128 messages) and score calibration (64 windows), plus some scored ones.
MESSAGES_TO_SCORE = 230
# A verdict crosses sidecar and broker in milliseconds; this only bounds a
# failing test.
VERDICT_TIMEOUT_S = 20.0
# How long to watch for a message that must not come.
QUIET_S = 1.0
CONNECT_TIMEOUT_S = 10.0


def _settings(broker: BrokerAddress, **detection: Any) -> Settings:
    return settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
            },
            "detection": detection,
        }
    )


@pytest.fixture
def always_alarm(broker: BrokerAddress) -> Iterator[Service]:
    """A running sidecar that raises on the first window above a device's median.

    With every threshold at 0, any window whose calibrated score is above 0
    (above the device's own median) is confirmed; it is never cleared.
    """
    settings = _settings(
        broker,
        rf_threshold=0.0,
        cnn_threshold=0.0,
        fused_threshold=0.0,
        alarm_after=1,
        clear_after=10_000,
    )
    yield from _running(settings)


def _running(settings: Settings) -> Iterator[Service]:
    models: LoadedModels = load_cascade(
        settings.models, settings.detection, settings.window.length
    )
    service = Service(settings, models)
    service.start()
    assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
    try:
        yield service
    finally:
        service.stop()


def _reading(index: int) -> bytes:
    document = {"temperature": 21.0 + (index % 7) * 0.1, "linkquality": 100 + index % 9}
    return json.dumps(document).encode()


def _wait_processed(service: Service, count: int) -> None:
    deadline = time.monotonic() + VERDICT_TIMEOUT_S
    while service.counters["processed"] < count and time.monotonic() < deadline:
        time.sleep(0.05)


def _publish_readings(broker: BrokerAddress, topic: str, count: int) -> None:
    for index in range(count):
        publish(broker, topic, _reading(index), qos=1)


def test_service_publishes_verdict_on_device_topic(
    broker: BrokerAddress, always_alarm: Service
) -> None:
    """Test that readings on a device topic raise a verdict on anomalies/<device>."""
    topic = "anomalies/test_plug"
    with MessageCollector(broker, topic) as verdicts:
        _publish_readings(broker, "zigbee2mqtt/test_plug", MESSAGES_TO_SCORE)
        received = verdicts.wait_for(
            lambda seen: any(m.topic == topic for m in seen), timeout=VERDICT_TIMEOUT_S
        )

    # amqtt 0.12.1 also hands a new subscriber retained messages of sibling
    # topics (here anomalies/_status), so the verdict is picked by topic.
    verdict = json.loads(next(m.payload for m in received if m.topic == topic))
    assert verdict["device"] == "test_plug"
    assert verdict["state"] == "raised"
    assert verdict["topic"] == "zigbee2mqtt/test_plug"
    assert set(verdict["models"]) == {"rf", "cnn"}
    assert 0.0 <= verdict["score"] <= 1.0
    assert verdict["reason"]
    assert verdict["seq"] >= 128


def test_service_raises_once_while_in_alarm(
    broker: BrokerAddress, always_alarm: Service
) -> None:
    """Test that a device in alarm is raised once and own verdicts are not scored."""
    with MessageCollector(broker, "anomalies/#") as output:
        _publish_readings(broker, "zigbee2mqtt/fridge_plug", MESSAGES_TO_SCORE + 20)
        _wait_processed(always_alarm, MESSAGES_TO_SCORE + 20)
        time.sleep(0.5)
        messages = output.messages

    verdicts = [m for m in messages if m.topic == "anomalies/fridge_plug"]
    assert len(verdicts) == 1
    counters = always_alarm.counters
    # The verdict came back to the sidecar through its `#` subscription.
    assert counters["own_output"] >= 1
    assert counters["devices_tracked"] == 1


@contextlib.contextmanager
def _echo(broker: BrokerAddress, source: str, target: str) -> Iterator[list[str]]:
    """Republish everything under `source/` as `target/`, as a renaming bridge.

    Yields the topics republished so far.
    """
    echoed: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"echo-{uuid.uuid4()}")
    subscribed = threading.Event()

    def on_message(client: mqtt.Client, userdata: Any, message: Any) -> None:
        topic = target + message.topic[len(source) :]
        echoed.append(topic)
        client.publish(topic, message.payload, qos=1)

    client.on_message = on_message
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(broker.host, broker.port)
    client.subscribe(f"{source}/#", qos=1)
    client.loop_start()
    try:
        assert subscribed.wait(CONNECT_TIMEOUT_S)
        yield echoed
    finally:
        client.disconnect()
        client.loop_stop()


def test_service_never_scores_its_output_echoed_under_a_renamed_prefix(
    broker: BrokerAddress, always_alarm: Service
) -> None:
    """Test pitfalls.md #7 with a bridge that maps anomalies/# to alerts/#.

    Copies of verdicts, status and health come back on topics the generic
    rule would read as devices; they are known as output by their payload
    or their reserved level and never tracked, parsed or scored.
    """
    with _echo(broker, "anomalies", "alerts") as echoed:
        _publish_readings(broker, "zigbee2mqtt/fridge_plug", MESSAGES_TO_SCORE)
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while "alerts/fridge_plug" not in echoed and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)

    counters = always_alarm.counters
    assert "alerts/fridge_plug" in echoed
    assert counters["devices_tracked"] == 1
    # Only the readings reached the pipeline: no echo was parsed as telemetry.
    assert counters["processed"] == MESSAGES_TO_SCORE
    assert counters["own_output"] >= 2 * len(echoed)


def test_service_never_scores_its_discovery_configs_under_a_renamed_prefix(
    broker: BrokerAddress, always_alarm: Service
) -> None:
    """A bridge mapping homeassistant/# to remote_ha/# echoes the configs back.

    The copies fall to the generic rule (device `remote_ha`); they are known
    as the sidecar's own by their first bytes and never tracked or scored.
    """
    with _echo(broker, "homeassistant", "remote_ha") as echoed:
        _publish_readings(broker, "zigbee2mqtt/fridge_plug", 3)
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while not any(t.endswith("/config") for t in echoed):
            assert time.monotonic() < deadline, echoed
            time.sleep(0.05)
        time.sleep(0.5)

    counters = always_alarm.counters
    assert counters["devices_tracked"] == 1
    # The three readings, still warming up; nothing else was parsed as one.
    assert counters["warming"] == 3
    assert counters["windows_scored"] == 0


@pytest.mark.parametrize(
    ("topic", "payload", "counter"),
    [
        ("frigate/front/person/snapshot", b"\xff\xd8\xff\xe0" + bytes(2000), "binary"),
        ("zigbee2mqtt/junk", b"{not json", "unparsable"),
        ("zigbee2mqtt/junk", b"x" * 70_000, "oversized"),
        ("esp_living/sensor/temp/state", b"nan", "missing"),
        ("ha/sensor/grid_power/state", b"unavailable", "missing"),
        ("lonely", b"21.5", "unknown_topic"),
        ("anomalies/someone", b'{"state":"raised"}', "own_output"),
        ("zigbee2mqtt/bridge/devices", b"[]", "ignored"),
    ],
)
def test_service_counts_and_skips_junk(
    broker: BrokerAddress,
    always_alarm: Service,
    topic: str,
    payload: bytes,
    counter: str,
) -> None:
    """Test that junk payloads, unknown topics and own output are counted, not fatal."""
    publish(broker, topic, payload, qos=1)
    deadline = time.monotonic() + VERDICT_TIMEOUT_S
    while always_alarm.counters[counter] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)

    counters = always_alarm.counters
    assert counters[counter] >= 1
    assert counters["worker_errors"] == 0
    if counter in ("unknown_topic", "own_output", "ignored"):
        assert counters["devices_tracked"] == 0


def test_service_status_topic_goes_offline_on_stop(broker: BrokerAddress) -> None:
    """Test that the retained status reads online while running, offline after."""
    settings = _settings(broker)
    running = _running(settings)
    next(running)
    with MessageCollector(broker, "anomalies/_status") as status:
        online = status.wait_for(bool, timeout=VERDICT_TIMEOUT_S)
        assert online[0].payload == b"online"
        next(running, None)
        offline = status.wait_for(
            lambda seen: any(m.payload == b"offline" for m in seen),
            timeout=VERDICT_TIMEOUT_S,
        )
    assert isinstance(offline[-1], ReceivedMessage)


def _previous_run_alarms(device: str, at: float) -> dict[str, bytes]:
    """Retained raised verdicts as a stopped sidecar leaves them behind."""
    model = Verdict(
        device=device,
        state=Transition.RAISED,
        score=0.9,
        rf_score=0.9,
        cnn_score=0.9,
        topic=f"zigbee2mqtt/{device}",
        received_at=at,
        seq=400,
        models={"rf": "old", "cnn": "old"},
        evidence=(),
        typical_gap_s=1.0,
        last_gap_s=1.0,
    )
    silent = ConditionVerdict(
        device, ConditionKind.SILENT, Transition.RAISED, at, at - 600.0, 300.0
    )
    return {
        f"anomalies/{device}": model.to_json(),
        f"anomalies/{device}/silent": silent.to_json(),
    }


def test_service_clears_alarms_a_previous_run_left_retained(
    broker: BrokerAddress,
) -> None:
    """Test that a restarted sidecar clears the raised alarms it finds retained.

    The previous run's verdicts are retained in the broker; without taking
    them over, the new run (which raises and clears only on transitions)
    would leave Home Assistant showing a problem for good.
    """
    device = "restarted_plug"
    for topic, payload in _previous_run_alarms(device, time.time() - 60).items():
        publish(broker, topic, payload, qos=1, retain=True)
    settings = _settings(broker, fused_threshold=1.0, alarm_after=1, clear_after=3)

    running = contextlib.contextmanager(_running)
    with (
        MessageCollector(broker, f"anomalies/{device}/#") as output,
        running(settings) as service,
    ):
        _publish_readings(broker, f"zigbee2mqtt/{device}", MESSAGES_TO_SCORE)
        cleared = output.wait_for(
            lambda seen: _cleared_topics(seen) >= {"", "/silent"},
            timeout=VERDICT_TIMEOUT_S,
        )
        counters = service.counters

    assert _cleared_topics(cleared) >= {"", "/silent"}
    # amqtt 0.12.1 may hand a new subscriber a retained message twice; the
    # second copy of the silent alarm is then cleared again (the device has
    # reported since), which changes nothing for Home Assistant.
    assert counters["alarms_adopted"] >= 2
    assert counters["verdicts_raised"] == 0


def test_service_worker_outlives_a_failing_step(
    broker: BrokerAddress, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step between batches that raises is counted; scoring goes on.

    A tester's retained junk under anomalies/ once raised inside adoption,
    outside the batch's guard, and the worker thread ended for good.
    """
    device = "survivor_plug"
    for topic, payload in _previous_run_alarms(device, time.time() - 60).items():
        publish(broker, topic, payload, qos=1, retain=True)
    settings = _settings(broker)

    def broken_adopt(*args: Any) -> None:
        message = "injected fault"
        raise RuntimeError(message)

    models = load_cascade(settings.models, settings.detection, settings.window.length)
    service = Service(settings, models)
    monkeypatch.setattr(service.pipeline, "adopt", broken_adopt)
    service.start()
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        _publish_readings(broker, f"zigbee2mqtt/{device}", MESSAGES_TO_SCORE)
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while service.counters["processed"] < MESSAGES_TO_SCORE:
            assert time.monotonic() < deadline, service.counters
            time.sleep(0.05)
        counters = service.counters
    finally:
        service.stop()

    assert counters["worker_errors"] >= 1
    assert counters["processed"] == MESSAGES_TO_SCORE


class _RefusingAdapter(MqttAdapter):
    """The real MQTT adapter, whose client refuses the first few verdicts.

    Fault injection for a full client queue, which a tester filled with
    Home Assistant discovery configs until a verdict was refused and lost.
    """

    topic = ""
    refusals = 0

    def publish(
        self, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> PublishOutcome:
        if topic == self.topic and self.refusals > 0:
            self.refusals -= 1
            # What paho's publish returns when its queue is full.
            refused = mqtt.MQTTMessageInfo(0)
            refused.rc = mqtt.MQTT_ERR_QUEUE_SIZE
            return PublishOutcome(refused, qos)
        return super().publish(topic, payload, qos, retain)


def test_service_sends_a_refused_verdict_again_until_the_client_takes_it(
    broker: BrokerAddress,
) -> None:
    device = "crowded_plug"
    verdicts = verdict_topic("anomalies", device)
    settings = _settings(
        broker,
        rf_threshold=0.0,
        cnn_threshold=0.0,
        fused_threshold=0.0,
        alarm_after=1,
        clear_after=10_000,
    )
    models = load_cascade(settings.models, settings.detection, settings.window.length)

    def transport(on_message: Callable[[Message], None]) -> MqttAdapter:
        adapter = _RefusingAdapter(
            settings.broker, ["#"], "anomalies/_status", on_message
        )
        adapter.topic, adapter.refusals = verdicts, 3
        return adapter

    service = Service(settings, models, transport=transport)
    service.start()
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        with MessageCollector(broker, verdicts) as output:
            _publish_readings(broker, f"zigbee2mqtt/{device}", MESSAGES_TO_SCORE)
            seen = output.wait_for(
                lambda got: any(m.topic == verdicts for m in got),
                timeout=VERDICT_TIMEOUT_S,
            )
        counters = service.counters
    finally:
        service.stop()

    # Refused once, then sent again on each pass until the client took it.
    sent = [json.loads(m.payload) for m in seen if m.topic == verdicts]
    assert sent[0]["state"] == "raised"
    assert counters["publish_failures"] == 1


def test_service_restart_does_not_raise_again_an_offline_it_took_over(
    broker: BrokerAddress,
) -> None:
    """A retained `offline` availability and our retained alarm for it.

    On a restart the broker replays both; the alarm is taken over first, so
    the availability changes nothing and no fresh `raised` notifies again.
    """
    device = "offline_plug"
    topic = condition_topic("anomalies", device, ConditionKind.OFFLINE)
    left = ConditionVerdict(
        device, ConditionKind.OFFLINE, Transition.RAISED, time.time() - 60, 0.0
    )
    publish(broker, f"zigbee2mqtt/{device}/availability", b"offline", retain=True)
    publish(broker, topic, left.to_json(), qos=1, retain=True)
    running = contextlib.contextmanager(_running)
    with MessageCollector(broker, topic) as seen, running(_settings(broker)) as svc:
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        while svc.counters["availability"] < 1 or svc.counters["alarms_adopted"] < 1:
            assert time.monotonic() < deadline, svc.counters
            time.sleep(0.05)
        time.sleep(QUIET_S)
        messages = [m for m in seen.messages if m.topic == topic]

    # Only the broker's replay of the retained alarm, nothing published anew.
    assert messages
    assert all(m.retain for m in messages)


def _cleared_topics(seen: list[ReceivedMessage]) -> set[str]:
    """Topic suffixes (after anomalies/<device>) whose latest state is cleared."""
    states = {}
    for message in seen:
        suffix = message.topic.split("/", 2)[2] if message.topic.count("/") > 1 else ""
        states["/" + suffix if suffix else ""] = json.loads(message.payload)["state"]
    return {suffix for suffix, state in states.items() if state == "cleared"}
