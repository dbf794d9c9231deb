"""Hostile topics and device ids: bounded state, safe output topics, no crash."""

from __future__ import annotations

import json
import resource
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_helpers import BrokerAddress, MessageCollector, publish

from sidecar.config import Settings, settings_from_mapping
from sidecar.detector import LoadedModels, load_cascade
from sidecar.service import Service, build_pipeline, status_topic, verdict_topic
from sidecar.stream import Message
from sidecar.topics import filter_matches

# A flood of distinct device ids: a million through the pipeline, as a
# misbehaving bridge or an attacker could publish; state must stay bounded.
DISTINCT_DEVICES = 1_000_000
MAX_DEVICES = 1_000
BATCH = 4096
# Resident memory may grow by at most this much over the flood (bytes).
MAX_RSS_GROWTH = 200 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0
DELIVERY_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    """The shipped models, loaded once for the module."""
    defaults = Settings()
    return load_cascade(defaults.models, defaults.detection, defaults.window.length)


def _rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (getrusage(2)).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_pipeline_million_distinct_devices_stay_bounded(models: LoadedModels) -> None:
    """Test that a million distinct device ids keep state bounded and are counted."""
    settings = settings_from_mapping({"limits": {"max_devices": MAX_DEVICES}})
    pipeline = build_pipeline(settings, models)
    before = _rss_bytes()

    for start in range(0, DISTINCT_DEVICES, BATCH):
        batch = [
            Message(f"zigbee2mqtt/dev{index}", b'{"temperature": 21.5}', float(index))
            for index in range(start, min(start + BATCH, DISTINCT_DEVICES))
        ]
        pipeline.process(batch)

    counters = pipeline.counters
    assert pipeline.devices_tracked == MAX_DEVICES
    assert counters.devices_evicted == DISTINCT_DEVICES - MAX_DEVICES
    assert counters.processed == DISTINCT_DEVICES
    assert counters.worker_errors == 0
    assert _rss_bytes() - before < MAX_RSS_GROWTH


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(min_size=1, max_size=300))
def test_verdict_topic_never_leaves_the_output_prefix(device: str) -> None:
    """Test that any device id gives one topic level under the prefix, not status."""
    topic = verdict_topic("anomalies", device)

    assert topic.startswith("anomalies/")
    assert topic.count("/") == 1
    assert topic != status_topic("anomalies")
    assert not any(char in topic for char in "+#\x00")
    assert filter_matches("anomalies/#", topic)


@pytest.mark.broker
@pytest.mark.parametrize(
    "device",
    [
        "kitchen/../../etc",
        "$SYS",
        "_status_plug",
        "a" * 250,
        "space and \u00fcmlaut",
        "emoji\U0001f525plug",
    ],
)
def test_hostile_device_names_get_verdicts_under_the_prefix(
    broker: BrokerAddress, device: str
) -> None:
    """Test that odd device names reach a verdict on a safe topic under anomalies/."""
    settings = settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
            },
            "detection": {
                "rf_threshold": 0.0,
                "cnn_threshold": 0.0,
                "fused_threshold": 0.0,
                "alarm_after": 1,
                "clear_after": 10_000,
            },
            "topics": [{"pattern": r"hostile/(?P<device>.+)"}],
        }
    )
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    service = Service(settings, models)
    service.start()
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        expected = verdict_topic("anomalies", device)
        with MessageCollector(broker, "anomalies/#") as output:
            for index in range(230):
                reading = {
                    "temperature": 21.0 + (index % 7) * 0.1,
                    "linkquality": 100 + index % 9,
                }
                publish(broker, f"hostile/{device}", json.dumps(reading), qos=1)
            received = output.wait_for(
                lambda seen: any(m.topic == expected for m in seen),
                timeout=DELIVERY_TIMEOUT_S,
            )
        verdict = json.loads(next(m.payload for m in received if m.topic == expected))
        assert verdict["device"] == device
        assert expected != status_topic("anomalies")
        assert service.counters["worker_errors"] == 0
    finally:
        service.stop()
