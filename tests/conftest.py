"""Shared fixtures: real MQTT brokers (embedded amqtt and Mosquitto) on free ports."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from mqtt_helpers import BrokerAddress, StartMosquitto

from sidecar.broker import EmbeddedBroker

if TYPE_CHECKING:
    from collections.abc import Iterator

# Test brokers listen on loopback only.
LOOPBACK_HOST = "127.0.0.1"
# Mosquitto 2.0 listens within ~50 ms on a laptop (measured); 5 s leaves room
# for a loaded CI runner and still fails fast when it cannot start.
MOSQUITTO_READY_TIMEOUT_S = 5.0
# Mosquitto exits within milliseconds of SIGTERM; after this we send SIGKILL.
MOSQUITTO_STOP_TIMEOUT_S = 5.0
# How often to retry connecting while Mosquitto starts up.
PORT_POLL_INTERVAL_S = 0.02
# Debian's mosquitto package installs the daemon in /usr/sbin, which is not on
# every user's PATH.
MOSQUITTO_FALLBACK_PATH = Path("/usr/sbin/mosquitto")
MOSQUITTO_MISSING_REASON = "mosquitto not installed; .ci/run installs it from Debian"
# mosquitto.conf(5), Mosquitto 2.0: one loopback listener, no auth, nothing on
# disk, and only warnings and errors on stderr.
MOSQUITTO_CONF_TEMPLATE = """\
listener {port} {host}
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
"""
BROKER_FIXTURES = {"amqtt": "amqtt_broker", "mosquitto": "mosquitto_broker"}


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Iterator[None]:
    """Undo log levels a command run in-process set (bench quiets `sidecar`).

    Without this, a later test that expects DEBUG records from the sidecar
    would depend on which tests ran before it.
    """
    names = ("", "sidecar")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def free_port(host: str = LOOPBACK_HOST) -> int:
    """Return a TCP port that is free on `host` right now.

    Another process may take the port before the caller binds it; on a test
    machine that is rare enough to accept.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def amqtt_broker() -> Iterator[BrokerAddress]:
    """Run an embedded amqtt broker on a free loopback port."""
    with EmbeddedBroker(LOOPBACK_HOST, free_port()) as broker:
        yield BrokerAddress(host=broker.host, port=broker.port, kind="amqtt")


@pytest.fixture
def start_mosquitto(tmp_path: Path) -> Iterator[StartMosquitto]:
    """Start Mosquitto processes with extra mosquitto.conf lines; stop them after.

    The returned function takes the extra lines (global settings such as
    `max_queued_messages 100` or `sys_interval 1`) and returns the address of
    a fresh broker on a free loopback port. Skipped when Mosquitto is missing.
    """
    binary = _find_mosquitto()
    if binary is None:
        pytest.skip(MOSQUITTO_MISSING_REASON)
    processes: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> BrokerAddress:
        port = free_port()
        conf = tmp_path / f"mosquitto-{port}.conf"
        base = MOSQUITTO_CONF_TEMPLATE.format(host=LOOPBACK_HOST, port=port)
        # Run as whoever runs the tests, so files they wrote (an ACL) are
        # readable: as root, Mosquitto otherwise drops to user `mosquitto`.
        base += f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        conf.write_text(base + "".join(f"{line}\n" for line in extra))
        log = tmp_path / f"mosquitto-{port}.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        _wait_until_listening(process, port, log)
        return BrokerAddress(host=LOOPBACK_HOST, port=port, kind="mosquitto")

    try:
        yield start
    finally:
        for process in processes:
            _terminate(process)


@pytest.fixture
def mosquitto_broker(start_mosquitto: StartMosquitto) -> BrokerAddress:
    """Run a Mosquitto process on a free loopback port, skipping if not installed."""
    return start_mosquitto()


@pytest.fixture(params=sorted(BROKER_FIXTURES))
def broker(request: pytest.FixtureRequest) -> BrokerAddress:
    """Run each integration test once against amqtt and once against Mosquitto."""
    address = request.getfixturevalue(BROKER_FIXTURES[request.param])
    assert isinstance(address, BrokerAddress)
    return address


def _find_mosquitto() -> Path | None:
    """Return the Mosquitto binary from PATH or Debian's location, if any."""
    on_path = shutil.which("mosquitto")
    if on_path is not None:
        return Path(on_path)
    if shutil.which(MOSQUITTO_FALLBACK_PATH) is not None:
        return MOSQUITTO_FALLBACK_PATH
    return None


def _wait_until_listening(
    process: subprocess.Popen[bytes], port: int, log: Path
) -> None:
    """Block until Mosquitto accepts TCP connections, or fail with its log."""
    deadline = time.monotonic() + MOSQUITTO_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"mosquitto exited with code {process.returncode} before "
                f"listening on {LOOPBACK_HOST}:{port}; its log:\n{log.read_text()}"
            )
        try:
            with socket.create_connection((LOOPBACK_HOST, port), PORT_POLL_INTERVAL_S):
                return
        except OSError:
            time.sleep(PORT_POLL_INTERVAL_S)
    pytest.fail(
        f"mosquitto not listening on {LOOPBACK_HOST}:{port} after "
        f"{MOSQUITTO_READY_TIMEOUT_S} s; its log:\n{log.read_text()}"
    )


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """Stop a broker process with SIGTERM, then SIGKILL if it lingers."""
    process.terminate()
    try:
        process.wait(MOSQUITTO_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
