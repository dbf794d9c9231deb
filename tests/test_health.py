"""Data-path health and condition verdicts.

The broker's drop count is specified on `DataPathHealth` alone, fed readings
as Mosquitto would send them; the rest runs end to end against a real
Mosquitto.
"""

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

from sidecar.config import HealthSettings, Settings, settings_from_mapping
from sidecar.detector import LoadedModels, load_cascade
from sidecar.health import DROP_NOTICE_S, DataPathHealth
from sidecar.service import Service

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
# Mosquitto publishes $SYS every second in the tests that read its drop count.
SYS_INTERVAL = "sys_interval 1"

HEALTH_TOPIC = "anomalies/_health"
COUNTER_TOPIC = HealthSettings().broker_dropped_topic
# Wall-clock seconds at which the unit tests below tick, well apart.
START = 1_000_000.0
# The broker's count in the tester's report: hours of drops before the
# sidecar existed.
HISTORIC_DROPS = 130_380


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


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
def test_broker_drops_while_sidecar_away_are_reported(
    start_mosquitto: StartMosquitto, models: LoadedModels
) -> None:
    """Test pitfalls.md #3: the broker keeps 100 of 500 and says it dropped 400.

    The first run stops once its health document holds the broker's count;
    the next run compares with that count, so the drops while it was stopped
    are new, not its baseline.
    """
    broker = start_mosquitto(f"max_queued_messages {QUEUE_LIMIT}", SYS_INTERVAL)
    settings = _settings(
        broker,
        broker={"client_id": "sidecar-persistent", "persistent_session": True},
    )
    with (
        MessageCollector(broker, "anomalies/_health") as first_run,
        _running(settings, models),
    ):
        first_run.wait_for(
            lambda seen: _health(
                seen, lambda doc: doc["broker_dropped_total"] is not None
            ),
            timeout=HEALTH_TIMEOUT_S,
        )
    before = _last_health(first_run)["broker_dropped_total"]
    for seq in range(PUBLISHED_WHILE_AWAY):
        publish(broker, "tele/plug_a/SENSOR", json.dumps({"seq": seq, "Power": 40}))

    with (
        MessageCollector(broker, "anomalies/_health") as health,
        _running(settings, models) as service,
    ):
        # The broker may publish its count mid-way (every sys_interval), so
        # the drops can be reported in two steps; together they are all new.
        health.wait_for(
            lambda seen: _health(
                seen,
                lambda doc: (
                    doc["state"] == "problem"
                    and doc["broker_dropped_total"] - before
                    >= PUBLISHED_WHILE_AWAY - QUEUE_LIMIT
                ),
            ),
            timeout=HEALTH_TIMEOUT_S,
        )
        processed = service.counters["processed"]

    document = _last_health(health)
    assert "broker dropped" in document["problems"][-1]
    # The queued hundred did arrive: the session was resumed, not restarted.
    assert processed >= QUEUE_LIMIT


@pytest.mark.broker
def test_broker_drops_before_the_sidecar_first_ran_are_a_baseline(
    start_mosquitto: StartMosquitto, models: LoadedModels
) -> None:
    """Test that a first start shows the broker's historic drops as ok.

    Another persistent subscriber, away while 500 messages are published,
    makes the broker drop 400 before this sidecar ever connects. (Drops in
    the last sys_interval before a start are not in the first reading yet and
    are reported as new.)
    """
    broker = start_mosquitto(f"max_queued_messages {QUEUE_LIMIT}", SYS_INTERVAL)
    other = _settings(
        broker,
        broker={"client_id": "other-persistent", "persistent_session": True},
        output={"prefix": "other"},
    )
    with _running(other, models):
        pass
    dropped = PUBLISHED_WHILE_AWAY - QUEUE_LIMIT
    with MessageCollector(broker, COUNTER_TOPIC) as counter:
        for seq in range(PUBLISHED_WHILE_AWAY):
            payload = json.dumps({"seq": seq, "Power": 40})
            publish(broker, "tele/plug_a/SENSOR", payload)
        # $SYS is refreshed once a sys_interval: wait until it shows the drops.
        counter.wait_for(
            lambda seen: any(int(m.payload) >= dropped for m in seen),
            timeout=HEALTH_TIMEOUT_S,
        )

    with (
        MessageCollector(broker, "anomalies/_health") as health,
        _running(_settings(broker), models),
    ):
        health.wait_for(
            lambda seen: _health(
                seen,
                lambda doc: (doc["broker_dropped_total"] or 0) >= dropped,
            ),
            timeout=HEALTH_TIMEOUT_S,
        )

    documents = [json.loads(m.payload) for m in health.messages]
    assert [doc["broker_dropped_new"] for doc in documents] == [0] * len(documents)
    assert _last_health(health)["state"] == "ok"


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


@pytest.mark.broker
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


class _Recorder:
    """A DataPathHealth without the probe, and the health documents it publishes."""

    def __init__(self) -> None:
        self.documents: list[dict[str, Any]] = []
        self.health = DataPathHealth(
            HEALTH_TOPIC,
            "anomalies/_probe",
            HealthSettings(probe_timeout_s=0),
            self._publish,
        )

    def _publish(self, topic: str, payload: bytes, retain: bool) -> bool:
        assert topic == HEALTH_TOPIC
        assert retain
        self.documents.append(json.loads(payload))
        return True

    def read(self, count: int, now: float, connects: int = 1) -> dict[str, Any]:
        """Deliver one reading of the broker's count, tick, return the document."""
        assert self.health.on_message(COUNTER_TOPIC, str(count).encode())
        self.health.tick(now, connects, subscribed=True)
        return self.documents[-1]

    def previous_run_left(self, total: int | None) -> None:
        """Replay the retained health document an earlier run published."""
        document = {"origin": "anomaly-sidecar", "broker_dropped_total": total}
        self.health.on_message(HEALTH_TOPIC, json.dumps(document).encode())


def test_first_reading_at_start_is_a_baseline() -> None:
    """Test that drops from before the sidecar existed are shown, not reported."""
    recorder = _Recorder()

    document = recorder.read(HISTORIC_DROPS, START)

    assert document["state"] == "ok"
    assert document["broker_dropped_total"] == HISTORIC_DROPS
    assert document["broker_dropped_new"] == 0
    assert document["problems"] == []


def test_growth_after_the_baseline_is_reported_then_clears() -> None:
    """Test that the count growing is a problem for DROP_NOTICE_S, then ok."""
    recorder = _Recorder()
    recorder.read(100, START)

    document = recorder.read(130, START + 10)

    assert document["state"] == "problem"
    assert document["broker_dropped_new"] == 30
    assert document["problems"] == [
        "broker dropped 30 messages (130 since the broker started)"
    ]
    assert recorder.read(130, START + 10 + DROP_NOTICE_S + 1)["state"] == "ok"


def test_counter_reset_after_broker_restart_reports_post_restart_drops() -> None:
    """Test the tester's case: 651 before a restart, then 300 and 686 after it.

    Compared with the highest total seen, 300 went unreported and 686 read as
    35 new; the drops since the restart are 300, then 386 more.
    """
    recorder = _Recorder()
    recorder.read(651, START, connects=1)

    after_restart = recorder.read(300, START + 10, connects=2)
    later = recorder.read(686, START + 20, connects=2)

    assert after_restart["state"] == "problem"
    assert after_restart["broker_dropped_new"] == 300
    assert after_restart["problems"] == [
        "broker restarted and dropped 300 messages since (300 since the broker started)"
    ]
    assert later["broker_dropped_new"] == 386
    assert later["problems"] == [
        "broker dropped 386 messages (686 since the broker started)"
    ]


def test_broker_restart_without_drops_is_not_a_problem() -> None:
    """Test that a count that begins again at 0 is shown, and nothing is lost."""
    recorder = _Recorder()
    recorder.read(651, START, connects=1)

    document = recorder.read(0, START + 10, connects=2)

    assert document["state"] == "ok"
    assert document["broker_dropped_total"] == 0
    assert recorder.read(25, START + 20, connects=2)["broker_dropped_new"] == 25


def test_drops_across_a_reconnect_to_a_broker_that_kept_running_are_reported() -> None:
    """Test that a reconnect is no new baseline: drops while away are data lost.

    With a persistent session the broker queues for the sidecar while it is
    away and drops what does not fit (pitfalls.md #3).
    """
    recorder = _Recorder()
    recorder.read(50, START, connects=1)

    document = recorder.read(450, START + 10, connects=2)

    assert document["state"] == "problem"
    assert document["broker_dropped_new"] == 400
    assert document["problems"] == [
        "broker dropped 400 messages (450 since the broker started)"
    ]


def test_reconnect_without_new_drops_is_not_a_problem() -> None:
    """Test that the same count read again after a reconnect reports nothing."""
    recorder = _Recorder()
    recorder.read(50, START, connects=1)

    recorder.read(50, START + 10, connects=2)

    assert [document["state"] for document in recorder.documents] == ["ok"]


def test_drops_while_the_sidecar_was_stopped_count_from_its_last_document() -> None:
    """Test that a new run compares with the total its predecessor published.

    The broker replays the retained health document on subscribe; its total
    is the last count the previous run saw.
    """
    recorder = _Recorder()
    recorder.previous_run_left(100)

    document = recorder.read(500, START)

    assert document["broker_dropped_new"] == 400
    assert document["state"] == "problem"


def test_previous_document_replayed_after_the_first_reading_still_counts() -> None:
    """Test the other order: the first reading arrives before the replay."""
    recorder = _Recorder()
    recorder.health.on_message(COUNTER_TOPIC, b"500")
    recorder.previous_run_left(100)

    recorder.health.tick(START, 1, subscribed=True)

    assert recorder.documents[-1]["broker_dropped_new"] == 400


def test_previous_document_without_a_total_leaves_a_baseline() -> None:
    """Test that a run that never read the count gives nothing to compare with."""
    recorder = _Recorder()
    recorder.previous_run_left(None)

    assert recorder.read(HISTORIC_DROPS, START)["state"] == "ok"


def test_own_documents_coming_back_are_not_a_previous_run() -> None:
    """Test that our published documents, echoed back, change no count."""
    recorder = _Recorder()
    recorder.read(500, START)
    recorder.previous_run_left(100)

    document = recorder.read(500, START + 10, connects=2)

    assert document["state"] == "ok"
    assert recorder.health.dropped_new == 0
