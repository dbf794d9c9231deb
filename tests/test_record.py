"""Recording live traffic to JSON lines, against a real broker."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import pytest
from mqtt_helpers import BrokerAddress, publish

from sidecar.config import Settings, settings_from_mapping
from sidecar.detector import load_cascade
from sidecar.record import RecordSummary, format_line, record
from sidecar.service import Service
from sidecar.stream import Message

pytestmark = pytest.mark.broker

# The recorder subscribes within milliseconds on loopback; this bounds a hang.
RECORD_S = 8.0
SUBSCRIBE_WAIT_S = 1.0


def _settings(broker: BrokerAddress) -> Settings:
    return settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"recorder-{uuid.uuid4().hex[:8]}",
            }
        }
    )


def _record_in_background(
    settings: Settings, out: Path, max_bytes: int
) -> tuple[threading.Thread, threading.Event, list[RecordSummary]]:
    stop = threading.Event()
    results: list[RecordSummary] = []
    thread = threading.Thread(
        target=lambda: results.append(
            record(settings, out, max_bytes=max_bytes, duration_s=RECORD_S, stop=stop)
        )
    )
    thread.start()
    return thread, stop, results


def test_record_writes_device_traffic_and_skips_own_output(
    mosquitto_broker: BrokerAddress, tmp_path: Path
) -> None:
    """Test that each message becomes one line the self-supervised trainer reads."""
    out = tmp_path / "home.jsonl"
    thread, stop, results = _record_in_background(
        _settings(mosquitto_broker), out, max_bytes=1_000_000
    )
    threading.Event().wait(SUBSCRIBE_WAIT_S)
    publish(mosquitto_broker, "zigbee2mqtt/fridge", b'{"temperature": 4.1}')
    publish(mosquitto_broker, "anomalies/fridge", b'{"state": "raised"}')
    publish(
        mosquitto_broker,
        "homeassistant/binary_sensor/anomaly_sidecar/fridge_anomaly/config",
        b'{"name": "Anomaly"}',
    )
    publish(mosquitto_broker, "tele/plug/SENSOR", b"\xff\xfe")
    threading.Event().wait(SUBSCRIBE_WAIT_S)
    stop.set()
    thread.join()

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["topic"] for line in lines] == [
        "zigbee2mqtt/fridge",
        "tele/plug/SENSOR",
    ]
    assert lines[0]["payload"] == '{"temperature": 4.1}'
    assert lines[1]["payload"] == "\ufffd\ufffd"
    assert all(isinstance(line["time"], float) for line in lines)
    assert results[0].written == 2
    assert results[0].skipped_own == 2
    assert results[0].reason == "stopped"


def test_record_beside_a_sidecar_with_the_same_config(
    mosquitto_broker: BrokerAddress, tmp_path: Path
) -> None:
    """Test that recording does not knock a sidecar off with its client id."""
    settings = _settings(mosquitto_broker)
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    service = Service(settings, models)
    service.start()
    try:
        assert service.adapter.subscribed.wait(RECORD_S)
        out = tmp_path / "home.jsonl"
        thread, stop, results = _record_in_background(settings, out, 1_000_000)
        threading.Event().wait(SUBSCRIBE_WAIT_S)
        for index in range(20):
            publish(mosquitto_broker, "zigbee2mqtt/fridge", f"{index}")
        threading.Event().wait(SUBSCRIBE_WAIT_S)
        stop.set()
        thread.join()
        connects = service.adapter.connects
        processed = service.counters["processed"]
    finally:
        service.stop()

    assert results[0].written == 20
    assert connects == 1
    assert processed == 20


def test_record_stops_at_the_size_cap(
    mosquitto_broker: BrokerAddress, tmp_path: Path
) -> None:
    """Test that the file never grows past max_bytes."""
    out = tmp_path / "capped.jsonl"
    cap = 300
    thread, _stop, results = _record_in_background(
        _settings(mosquitto_broker), out, max_bytes=cap
    )
    threading.Event().wait(SUBSCRIBE_WAIT_S)
    for index in range(20):
        publish(mosquitto_broker, "zigbee2mqtt/fridge", json.dumps({"t": index}))
    thread.join()

    assert out.stat().st_size <= cap
    assert results[0].reason == "size cap reached"
    assert results[0].written >= 1


def test_recording_trains_through_the_self_supervised_loader(
    tmp_path: Path,
) -> None:
    """Test that the recorder's line format is what `train --self-supervised` reads."""
    from converters.selfsup import load_recording

    out = tmp_path / "lines.jsonl"
    out.write_text(format_line(Message("zigbee2mqtt/fridge", b"4.1", 1.0)))

    streams = load_recording(out)

    assert list(streams) == ["fridge"]
