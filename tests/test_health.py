"""Data-path health and condition verdicts, end to end against a real Mosquitto."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mqtt_helpers import (
    BrokerAddress,
    MessageCollector,
    ReceivedMessage,
    StartMosquitto,
    publish,
)

from sidecar.config import Settings, settings_from_mapping
from sidecar.detector import LoadedModels, load_cascade
from sidecar.service import Service

pytestmark = pytest.mark.broker

CONNECT_TIMEOUT_S = 10.0
# Health and conditions are judged once a second; this bounds a failing test.
HEALTH_TIMEOUT_S = 15.0
# Short enough for a test, long enough for a loopback round trip under load.
PROBE_TIMEOUT_S = 2.0
# pitfalls.md #3: the broker keeps 100 messages for an absent subscriber...
QUEUE_LIMIT = 100
# ... while 500 numbered messages are published.
PUBLISHED_WHILE_AWAY = 500
# Two clients with one id take the session from each other about once per
# reconnect backoff (1 s, then 2 s, ...); three losses fit in this.
CLIENT_ID_HINT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    """The shipped models, loaded once."""
    defaults = Settings()
    return load_cascade(defaults.models, defaults.detection, defaults.window.length)


def _settings(address: BrokerAddress, **sections: Any) -> Settings:
    sections.setdefault("broker", {})
    sections["broker"] = {
        "host": address.host,
        "port": address.port,
        "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
        **sections["broker"],
    }
    sections.setdefault("health", {"probe_timeout_s": PROBE_TIMEOUT_S})
    return settings_from_mapping(sections)


@contextmanager
def _running(settings: Settings, models: LoadedModels) -> Iterator[Service]:
    service = Service(settings, models)
    service.start()
    assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
    try:
        yield service
    finally:
        service.stop()


def _health(
    seen: list[ReceivedMessage], accept: Callable[[dict[str, Any]], bool]
) -> bool:
    return any(
        accept(json.loads(m.payload)) for m in seen if m.topic == "anomalies/_health"
    )


def _last_health(collector: MessageCollector) -> dict[str, Any]:
    payloads = [m.payload for m in collector.messages if m.topic == "anomalies/_health"]
    document: dict[str, Any] = json.loads(payloads[-1])
    return document


def test_probe_comes_back_and_health_is_ok(
    start_mosquitto: StartMosquitto, models: LoadedModels
) -> None:
    """Test pitfalls.md #5's matrix cell: `max_queued_messages 0` on this Mosquitto.

    Mosquitto 2.0.16 dropped every outgoing message with this setting; the
    installed release does not, and the probe says so.
    """
    broker = start_mosquitto("max_queued_messages 0")
    with (
        MessageCollector(broker, "anomalies/_health") as health,
        _running(_settings(broker), models) as service,
    ):
        publish(broker, "tele/plug_a/SENSOR", b'{"ENERGY":{"Power":42}}')
        health.wait_for(
            lambda seen: _health(seen, lambda doc: doc["probe"] == "ok"),
            timeout=HEALTH_TIMEOUT_S,
        )
        assert service.counters["processed"] >= 1

    assert _last_health(health)["state"] == "ok"


def test_probe_not_delivered_back_is_reported(
    start_mosquitto: StartMosquitto, tmp_path: Path, models: LoadedModels
) -> None:
    """Test that a broker that does not deliver to us raises a health problem.

    The ACL lets anonymous clients read only device topics and the health
    topic, so the sidecar's probe never comes back: the same symptom as a
    broker whose queue limits drop everything.
    """
    acl = tmp_path / "acl"
    acl.write_text(
        "topic read zigbee2mqtt/#\ntopic read anomalies/_health\ntopic write #\n"
    )
    broker = start_mosquitto(f"acl_file {acl}")
    settings = _settings(broker, subscribe={"include": ["zigbee2mqtt/#"]})
    with (
        MessageCollector(broker, "anomalies/_health") as health,
        _running(settings, models),
    ):
        health.wait_for(
            lambda seen: _health(seen, lambda doc: doc["probe"] == "missing"),
            timeout=HEALTH_TIMEOUT_S,
        )

    document = _last_health(health)
    assert document["state"] == "problem"
    assert "not delivered back" in document["problems"][0]


def test_broker_drops_while_sidecar_away_are_reported(
    start_mosquitto: StartMosquitto, models: LoadedModels
) -> None:
    """Test pitfalls.md #3: the broker keeps 100 of 500 and says it dropped 400."""
    broker = start_mosquitto(f"max_queued_messages {QUEUE_LIMIT}", "sys_interval 1")
    settings = _settings(
        broker,
        broker={"client_id": "sidecar-persistent", "persistent_session": True},
    )
    with _running(settings, models):
        pass
    for seq in range(PUBLISHED_WHILE_AWAY):
        publish(broker, "tele/plug_a/SENSOR", json.dumps({"seq": seq, "Power": 40}))

    with (
        MessageCollector(broker, "anomalies/_health") as health,
        _running(settings, models) as service,
    ):
        health.wait_for(
            lambda seen: _health(
                seen,
                lambda doc: (
                    doc["broker_dropped_new"] >= PUBLISHED_WHILE_AWAY - QUEUE_LIMIT
                ),
            ),
            timeout=HEALTH_TIMEOUT_S,
        )
        processed = service.counters["processed"]

    document = _last_health(health)
    assert document["state"] == "problem"
    assert "broker dropped" in document["problems"][-1]
    # The queued hundred did arrive: the session was resumed, not restarted.
    assert processed >= QUEUE_LIMIT


def test_offline_announcement_publishes_condition_verdict(
    start_mosquitto: StartMosquitto, models: LoadedModels
) -> None:
    """Test that zigbee2mqtt's offline raises anomalies/<device>/offline, retained."""
    broker = start_mosquitto()
    topic = "anomalies/freezer/offline"
    with (
        _running(_settings(broker), models),
        MessageCollector(broker, topic) as verdicts,
    ):
        publish(broker, "zigbee2mqtt/freezer/availability", b'{"state":"offline"}')
        verdicts.wait_for(lambda seen: len(seen) >= 1, timeout=HEALTH_TIMEOUT_S)
        publish(broker, "zigbee2mqtt/freezer/availability", b'{"state":"online"}')
        received = verdicts.wait_for(lambda seen: len(seen) >= 2, timeout=10)

    states = [json.loads(m.payload)["state"] for m in received]
    assert states == ["raised", "cleared"]
    assert json.loads(received[0].payload)["kind"] == "offline"


def test_silent_device_publishes_condition_verdict(
    start_mosquitto: StartMosquitto, models: LoadedModels
) -> None:
    """Test that a device that stops reporting gets anomalies/<device>/silent."""
    broker = start_mosquitto()
    settings = _settings(
        broker,
        conditions={
            "silent": {"min_s": 1, "factor": 1.0, "min_gaps": 3},
            "check_interval_s": 0.2,
        },
    )
    topic = "anomalies/freezer/silent"
    with (
        _running(settings, models),
        MessageCollector(broker, topic) as verdicts,
    ):
        for value in (-18.0, -18.2, -18.1, -17.9):
            publish(broker, "zigbee2mqtt/freezer", json.dumps({"temperature": value}))
            time.sleep(0.1)
        received = verdicts.wait_for(lambda seen: len(seen) >= 1, timeout=10)

    verdict = json.loads(received[0].payload)
    assert verdict["kind"] == "silent"
    assert verdict["state"] == "raised"
    assert verdict["expected_s"] == 1.0
    assert "no message for" in verdict["reason"]


def test_two_sidecars_with_one_client_id_get_a_hint(
    start_mosquitto: StartMosquitto,
    models: LoadedModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test that a client id taken over again and again is named in an error."""
    broker = start_mosquitto()
    settings = _settings(broker, broker={"client_id": "sidecar-shared"})
    caplog.set_level(logging.ERROR, logger="sidecar.mqtt")
    with _running(settings, models), _running(settings, models):
        deadline = time.monotonic() + CLIENT_ID_HINT_TIMEOUT_S
        while "another client may be using" not in caplog.text:
            assert time.monotonic() < deadline, "no client id hint logged"
            time.sleep(0.2)

    assert "client_id=sidecar-shared" in caplog.text


def test_frozen_and_unavailable_keys_publish_condition_verdicts(
    start_mosquitto: StartMosquitto, models: LoadedModels
) -> None:
    """Test frozen and unavailable conditions end to end, with short limits."""
    broker = start_mosquitto()
    settings = _settings(
        broker,
        conditions={
            "frozen": {"min_s": 1, "min_messages": 4, "min_distinct": 3},
            "unavailable": {"after_s": 0.5},
            "check_interval_s": 0.2,
        },
    )
    with (
        _running(settings, models),
        MessageCollector(broker, "anomalies/hall/+") as verdicts,
    ):
        for value in (20.1, 20.4, 20.2, 20.6):
            publish(broker, "zigbee2mqtt/hall", json.dumps({"temperature": value}))
        for _ in range(8):
            publish(broker, "zigbee2mqtt/hall", json.dumps({"temperature": 20.95}))
            time.sleep(0.2)
        publish(broker, "zigbee2mqtt/hall", b'{"temperature": null}')
        received = verdicts.wait_for(
            lambda seen: (
                {m.topic for m in seen}
                >= {"anomalies/hall/frozen", "anomalies/hall/unavailable"}
            ),
            timeout=HEALTH_TIMEOUT_S,
        )

    by_topic = {m.topic: json.loads(m.payload) for m in received}
    frozen = by_topic["anomalies/hall/frozen"]
    assert frozen["kind"] == "frozen"
    assert frozen["keys"][0]["key"] == "temperature"
    unavailable = by_topic["anomalies/hall/unavailable"]
    assert unavailable["state"] == "raised"
    assert unavailable["keys"][0]["key"] == "temperature"
