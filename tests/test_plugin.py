"""The sidecar running inside the embedded amqtt broker as a plugin."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port
from mqtt_helpers import BrokerAddress, MessageCollector, publish

from sidecar.broker import EmbeddedBroker

pytestmark = pytest.mark.broker

PLUGIN = "sidecar.plugin.SidecarPlugin"
# Thresholds at 0, one window to raise: a verdict right after the warm-up.
ALWAYS_ALARM = {
    "rf_threshold": 0.0,
    "cnn_threshold": 0.0,
    "fused_threshold": 0.0,
    "alarm_after": 1,
    "clear_after": 10_000,
}
# Past the shipped models' warm-up (128 messages) with windows to spare.
READINGS = 230
VERDICT_TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 20.0
BROKER_COMMAND = (sys.executable, "-m", "sidecar", "broker")
EXIT_TIMEOUT_S = 20.0


def _reading(index: int) -> bytes:
    document = {"temperature": 21.0 + (index % 7) * 0.1, "linkquality": 100 + index % 9}
    return json.dumps(document).encode()


def test_plugin_publishes_verdicts_and_status_from_inside_the_broker(
    tmp_path: Path,
) -> None:
    """Test that readings published to the broker raise a verdict through it."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"detection": ALWAYS_ALARM}))
    plugins = {PLUGIN: {"config_file": str(config)}}
    with EmbeddedBroker(port=0, plugins=plugins) as running:
        broker = BrokerAddress(running.host, running.port, "amqtt")
        with MessageCollector(broker, "anomalies/#") as output:
            for index in range(READINGS):
                publish(broker, "zigbee2mqtt/inside_plug", _reading(index))
            seen = output.wait_for(
                lambda seen: any(m.topic == "anomalies/inside_plug" for m in seen),
                timeout=VERDICT_TIMEOUT_S,
            )
        with MessageCollector(broker, "anomalies/_status") as status:
            # amqtt 0.12.1 also replays retained messages of sibling topics.
            retained = status.wait_for(
                lambda seen: any(m.topic == "anomalies/_status" for m in seen)
            )

    verdict = json.loads(
        next(m.payload for m in seen if m.topic == "anomalies/inside_plug")
    )
    assert verdict["device"] == "inside_plug"
    assert verdict["state"] == "raised"
    statuses = [m.payload for m in retained if m.topic == "anomalies/_status"]
    # amqtt may hand over the retained status and a live copy of it.
    assert set(statuses) == {b"online"}
    # Our own verdicts are broadcast by the broker, never fed back to us.
    assert not any(m.topic.startswith("anomalies/anomalies") for m in seen)


def test_plugin_with_a_broken_config_keeps_the_broker_from_starting(
    tmp_path: Path,
) -> None:
    """Test that a config error surfaces at start, not as a silent broker."""
    from sidecar.broker import BrokerStartError

    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"limits": {"queue_size": 0}}))
    plugins = {PLUGIN: {"config_file": str(config)}}

    with (
        pytest.raises(BrokerStartError, match=r"limits\.queue_size"),
        EmbeddedBroker(port=0, plugins=plugins),
    ):
        pass


def test_broker_command_runs_the_sidecar_inside_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    """Test `anomaly-sidecar broker`: one process, verdicts out, exit 0."""
    port = free_port()
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"detection": ALWAYS_ALARM}))
    log = tmp_path / "broker.stderr"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*BROKER_COMMAND, "--port", str(port), "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "broker with sidecar listening" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        broker = BrokerAddress("127.0.0.1", port, "amqtt")
        with MessageCollector(broker, "anomalies/cli_plug") as output:
            for index in range(READINGS):
                publish(broker, "zigbee2mqtt/cli_plug", _reading(index))
            output.wait_for(bool, timeout=VERDICT_TIMEOUT_S)
        process.send_signal(signal.SIGTERM)
        code = process.wait(EXIT_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()
