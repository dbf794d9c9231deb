"""Structured logs: every line of a real run is JSON when the config asks for it."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from cli_helpers import sidecar_process, wait_for_text
from mqtt_helpers import BrokerAddress, publish

pytestmark = pytest.mark.broker

STARTUP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 15.0


def test_run_with_json_logging_writes_one_json_object_per_line(
    mosquitto_broker: BrokerAddress, tmp_path: Path
) -> None:
    """Test `logging.format: json` on a run that connects, scores and stops."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "broker": {
                    "host": mosquitto_broker.host,
                    "port": mosquitto_broker.port,
                },
                "logging": {"level": "INFO", "format": "json"},
            }
        )
    )
    log = tmp_path / "sidecar.stderr"
    with sidecar_process(["run", "--config", str(config)], log) as process:
        wait_for_text(log, "subscribed filters=", STARTUP_TIMEOUT_S)
        publish(mosquitto_broker, "zigbee2mqtt/plug", b'{"power": 12}')
        process.send_signal(signal.SIGTERM)
        code = process.wait(EXIT_TIMEOUT_S)

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert code == 0
    assert {"asctime", "levelname", "name", "message"} <= set(records[0])
    assert any(record["name"] == "sidecar.mqtt" for record in records)
    assert any("stopping signal=SIGTERM" in record["message"] for record in records)
    stopping = next(r for r in records if "stopping signal=" in r["message"])
    assert stopping["event"] == "stopping"
    assert stopping["signal"] == "SIGTERM"
