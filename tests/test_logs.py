"""Structured logs: every line of a real run is JSON when the config asks for it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
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
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "subscribed filters=" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        publish(mosquitto_broker, "zigbee2mqtt/plug", b'{"power": 12}')
        process.send_signal(signal.SIGTERM)
        code = process.wait(EXIT_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert code == 0
    assert {"asctime", "levelname", "name", "message"} <= set(records[0])
    assert any(record["name"] == "sidecar.mqtt" for record in records)
    assert any("stopping signal=SIGTERM" in record["message"] for record in records)
    stopping = next(r for r in records if "stopping signal=" in r["message"])
    assert stopping["event"] == "stopping"
    assert stopping["signal"] == "SIGTERM"
