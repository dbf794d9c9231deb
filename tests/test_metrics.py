"""The Prometheus endpoint, scraped from a sidecar running against a real broker."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid

import pytest
from mqtt_helpers import BrokerAddress, publish
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import MetricsSettings, Settings, settings_from_mapping
from sidecar.detector import load_cascade
from sidecar.errors import ConfigError
from sidecar.metrics import MetricsEndpoint
from sidecar.service import Service

pytestmark = pytest.mark.broker

CONNECT_TIMEOUT_S = 10.0
PROCESS_TIMEOUT_S = 20.0
# Past the shipped models' warm-up (128 messages), so windows are scored.
READINGS = 140


def _scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def _settings(broker: BrokerAddress, **sections: object) -> Settings:
    return settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
            },
            **sections,
        }
    )


def test_metrics_endpoint_reports_counters_and_model_latency(
    mosquitto_broker: BrokerAddress,
) -> None:
    """Test that a scrape shows traffic, devices, verdicts and inference timing."""
    settings = _settings(mosquitto_broker, metrics={"enabled": True, "port": 0})
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    service = Service(settings, models)
    service.start()
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        assert service.metrics is not None
        for index in range(READINGS):
            document = {"temperature": 4.0 + index % 3 * 0.1}
            publish(mosquitto_broker, "zigbee2mqtt/fridge", json.dumps(document))
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while service.counters["windows_scored"] < READINGS - 128:
            assert time.monotonic() < deadline, "readings not scored in time"
            time.sleep(0.05)
        samples = _scrape(service.metrics.port)
    finally:
        service.stop()

    assert samples["anomaly_sidecar_processed_total"][()] >= READINGS
    assert samples["anomaly_sidecar_shed_total"][()] == 0
    assert samples["anomaly_sidecar_devices_tracked"][()] == 1
    assert samples["anomaly_sidecar_queue_depth"][()] >= 0
    verdicts = samples["anomaly_sidecar_verdicts_total"]
    assert (("kind", "model"), ("state", "raised")) in verdicts
    assert samples["anomaly_sidecar_inference_seconds_count"][(("model", "rf"),)] >= 1


def test_metrics_endpoint_is_off_by_default(mosquitto_broker: BrokerAddress) -> None:
    """Test that no port is opened unless metrics are enabled."""
    settings = _settings(mosquitto_broker)
    models = load_cascade(settings.models, settings.detection, settings.window.length)

    service = Service(settings, models)

    assert service.metrics is None


def test_metrics_port_taken_is_a_config_error_naming_the_port() -> None:
    """Test that a busy metrics port stops start-up with a message, not a trace."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        endpoint = MetricsEndpoint(MetricsSettings(enabled=True, port=port), dict, {})

        with pytest.raises(
            ConfigError, match=rf"metrics\.port: .*:{port} .*got {port}"
        ):
            endpoint.start()
