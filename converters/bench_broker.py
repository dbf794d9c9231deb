"""The benchmark's broker side: a private Mosquitto and its `$SYS` drop counter."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

__all__ = ["DroppedCounter", "Mosquitto", "find_mosquitto", "free_port"]

_LOG = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
# Debian's mosquitto package installs the daemon in /usr/sbin, often not on PATH.
MOSQUITTO_FALLBACK = Path("/usr/sbin/mosquitto")
# mosquitto.conf(5), Mosquitto 2.0: one loopback listener, no auth, nothing on
# disk, and `$SYS` updated every second so the drop counter can be read
# right after each run.
MOSQUITTO_CONF = """\
listener {port} {host}
allow_anonymous true
persistence false
sys_interval {sys_interval}
log_dest stderr
log_type error
log_type warning
"""
SYS_INTERVAL_S = 1
# Mosquitto 2.0 listens within ~50 ms (measured); this bounds a failure.
READY_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
PORT_POLL_S = 0.02
# Mosquitto's count of messages it threw away because a subscriber's queue
# was full (QoS 0 to a slow client, QoS 1/2 past max_queued_messages).
DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
CONNECT_TIMEOUT_S = 5.0
# Mosquitto publishes a `$SYS` value at each SYS_INTERVAL_S tick only if it
# changed, but its uptime changes every tick: once two uptimes arrived after
# a moment, a whole tick has passed since, and the drop counter last
# published is the one that stood at that moment (sys_tree.c, 2.0.11).
UPTIME_TOPIC = "$SYS/broker/uptime"
TICKS_AFTER = 2
# Bounds the wait for those ticks on a busy machine; a broker without an
# uptime topic costs this wait per read.
TICKS_TIMEOUT_S = SYS_INTERVAL_S * 5.0
# The retained value arrives within milliseconds of connecting; a broker
# without one (amqtt) costs this wait once.
FIRST_VALUE_S = SYS_INTERVAL_S * 2.0


def free_port(host: str = LOOPBACK_HOST) -> int:
    """Return a TCP port free on `host` right now (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def find_mosquitto() -> Path | None:
    """The Mosquitto binary on PATH or at Debian's location, if installed."""
    on_path = shutil.which("mosquitto")
    if on_path is not None:
        return Path(on_path)
    if MOSQUITTO_FALLBACK.exists():
        return MOSQUITTO_FALLBACK
    return None


class Mosquitto:
    """A Mosquitto process on a free loopback port, for one benchmark.

    Args:
        binary: The Mosquitto executable.

    Raises:
        RuntimeError: On entry, if it exits or does not listen in time.
    """

    def __init__(self, binary: Path) -> None:
        self.host = LOOPBACK_HOST
        self.port = free_port()
        self._binary = binary
        self._folder = tempfile.TemporaryDirectory(prefix="bench-mosquitto-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        """Mosquitto's own log (warnings and errors)."""
        return Path(self._folder.name) / "mosquitto.log"

    def __enter__(self) -> Self:
        conf = Path(self._folder.name) / "mosquitto.conf"
        conf.write_text(
            MOSQUITTO_CONF.format(
                host=self.host, port=self.port, sys_interval=SYS_INTERVAL_S
            )
        )
        with self.log.open("wb") as log_file:
            self._process = subprocess.Popen(
                [str(self._binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_listening(self._process)
        except BaseException:
            self._stop()
            raise
        _LOG.info("mosquitto started port=%d pid=%d", self.port, self._process.pid)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop()

    def _wait_listening(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                message = (
                    f"mosquitto exited with code {process.returncode}: "
                    f"{self.log.read_text()}"
                )
                raise RuntimeError(message)
            try:
                with socket.create_connection((self.host, self.port), PORT_POLL_S):
                    return
            except OSError:
                time.sleep(PORT_POLL_S)
        message = f"mosquitto not listening on port {self.port} in {READY_TIMEOUT_S} s"
        raise RuntimeError(message)

    def _stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            _LOG.info("mosquitto stopped port=%d", self.port)
            self._process = None
        self._folder.cleanup()


class DroppedCounter:
    """Follow the broker's `$SYS` dropped counter; None if it never reports one.

    Args:
        host: The broker's address.
        port: The broker's port.
    """

    def __init__(self, host: str, port: int) -> None:
        self._value: int | None = None
        self._ticks: list[float] = []
        self._changed = threading.Condition()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-sys-{uuid.uuid4().hex[:8]}",
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        # Mosquitto retains its `$SYS` values: the first comes with the SUBACK.
        with self._changed:
            self._changed.wait_for(lambda: self._value is not None, FIRST_VALUE_S)

    def latest(self) -> int | None:
        """The last value the broker published (None before the first)."""
        with self._changed:
            return self._value

    def read_after(self, moment: float) -> int | None:
        """The counter as it stood at `moment` (time.time()) or later.

        Waits until TICKS_AFTER `$SYS` ticks arrived after `moment`. Returns
        None if the broker publishes no such counter (amqtt).
        """

        def ticked() -> bool:
            return sum(tick > moment for tick in self._ticks) >= TICKS_AFTER

        with self._changed:
            if not self._changed.wait_for(ticked, TICKS_TIMEOUT_S):
                _LOG.warning("no $SYS ticks from the broker; drop count may lag")
            return self._value

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: Any,
        properties: Any,
    ) -> None:
        client.subscribe([(DROPPED_TOPIC, 0), (UPTIME_TOPIC, 0)])

    def _on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        with self._changed:
            if message.topic == UPTIME_TOPIC:
                # Only the latest few matter; keep the list short.
                self._ticks = [*self._ticks[-TICKS_AFTER:], time.time()]
            else:
                try:
                    self._value = int(message.payload)
                except ValueError:
                    _LOG.warning("drop counter not a number %r", message.payload)
            self._changed.notify_all()
