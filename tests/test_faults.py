"""The sidecar under faults: broker restart or freeze, slow model, overload, signals."""

from __future__ import annotations

import itertools
import json
import logging
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import pytest
import yaml
from cli_helpers import sidecar_process, wait_for_text
from conftest import (
    LOOPBACK_HOST,
    MOSQUITTO_MISSING_REASON,
    _find_mosquitto,
    _terminate,
    _wait_until_listening,
    free_port,
)
from mqtt_helpers import BrokerAddress, MessageCollector, ReceivedMessage
from paho.mqtt.enums import CallbackAPIVersion

from sidecar.config import Settings, settings_from_mapping
from sidecar.detector import LoadedModels, Scorer, load_cascade
from sidecar.mqtt import (
    RECONNECT_JITTER_S,
    RECONNECT_MIN_S,
    STOP_PUBLISH_TIMEOUT_S,
    MqttAdapter,
)
from sidecar.service import (
    REPLAY_GRACE_S,
    Service,
    build_pipeline,
    status_topic,
    verdict_topic,
)
from sidecar.stream import Message

pytestmark = pytest.mark.broker

_LOG = logging.getLogger(__name__)

# mosquitto.conf(5), Mosquitto 2.0, as in conftest.py, plus `notice`: that is
# the level of "Client <id> has exceeded timeout, disconnecting.", which the
# slow-model test must not find.
MOSQUITTO_CONF_TEMPLATE = """\
listener {port} {host}
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
"""
# Mosquitto 2.0.11's own words, at notice level, when it drops a client that
# stayed silent for 1.5 keepalives (seen in its log when a client is frozen).
KEEPALIVE_EXCEEDED = "exceeded timeout"
# Forces verdicts as in tests/test_service.py: every threshold at 0 confirms
# any window above the device's own median, and one such window raises.
ALWAYS_ALARM = {
    "rf_threshold": 0.0,
    "cnn_threshold": 0.0,
    "fused_threshold": 0.0,
    "alarm_after": 1,
    "clear_after": 10_000,
}
# The smallest keepalive the config allows (config.BrokerSettings). Mosquitto
# drops a client silent for 1.5 of them (7.5 s).
KEEPALIVE_S = 5
# paho (client.py, _check_keepalive) sends PINGREQ once a keepalive has passed
# without traffic and gives up one keepalive later, checking about once a
# second: a silent broker is noticed within 2 x (KEEPALIVE_S + 1) = 12 s. A
# freeze of 13 s lets the sidecar notice by itself, whatever Mosquitto does
# on resume (measured: it sometimes answers the queued PINGREQ, sometimes
# drops the client first).
FREEZE_S = 13.0
# The fault-injected model run: well over half the keepalive, which is the
# most a network loop can lose to a callback (pitfalls.md #1).
SLOW_SCORE_S = 3.0
# The slow-model flood must outlast 1.5 keepalives, the longest Mosquitto
# lets a silent client live, so a blocked network loop would get dropped.
SLOW_FLOOD_S = 9.0
# Messages per second of the slow-model flood: the 50-message queue below
# fills within one model run.
SLOW_FLOOD_RATE = 40.0
# A small queue, so the slow model makes it shed within seconds.
SLOW_QUEUE_SIZE = 50
# Sustained overload: far more than the sidecar can score while its model is
# slowed, at QoS 0 as fast as one Python publisher goes.
OVERLOAD_MESSAGES = 20_000
OVERLOAD_QUEUE_SIZE = 1_000
OVERLOAD_BATCH_SIZE = 100
# Per model run in the overload test: caps scoring near 1,000 windows/s, well
# under what one paho publisher pushes through Mosquitto on loopback.
OVERLOAD_SCORE_S = 0.1
# Devices the overload cycles over; each does its own warm-up.
OVERLOAD_DEVICES = 8
# A stop with a slow model: each model run takes STOP_SCORE_S, batches are
# small, and the drain gets STOP_DRAIN_S, so most of the backlog is left to
# shed at the deadline.
STOP_SCORE_S = 1.0
STOP_BATCH_SIZE = 10
STOP_BACKLOG = 300
STOP_DRAIN_S = 1.0
# On top of the drain and the one model run that may straddle its deadline:
# the offline status round trip and thread scheduling on a loaded machine.
STOP_SLACK_S = 1.5
# Resident memory may grow this much under overload. A full queue of small
# messages is well under 1 MB; the rest is allocator and paho slack.
RSS_GROWTH_LIMIT_KB = 50 * 1024
# How often the resident set size is sampled during the overload.
RSS_SAMPLE_INTERVAL_S = 0.02
# Connect and subscribe on loopback take milliseconds; this bounds a failure.
CONNECT_TIMEOUT_S = 10.0
# paho's backoff (1 s, then 2 s, ...) plus up to 1 s of jitter
# (sidecar.mqtt.RECONNECT_MIN_S and RECONNECT_JITTER_S), for a broker that
# was away a few seconds, with room for a loaded machine.
RECONNECT_TIMEOUT_S = 15.0
# A verdict crosses sidecar and broker in milliseconds; this bounds a failure.
VERDICT_TIMEOUT_S = 20.0
# After the expected verdict arrived, how long a duplicate gets to show up:
# a resend would follow within one round trip, this is hundreds of those.
DUPLICATE_WINDOW_S = 1.5
# Loading both models and connecting takes about a second on a laptop; a
# loaded 2-core runner may need several.
STARTUP_TIMEOUT_S = 30.0
# A stop drains the queue for at most 5 s (service.STOP_DRAIN_TIMEOUT_S) and
# waits at most 2 s each for UNSUBACK and the offline PUBACK; on loopback the
# whole stop takes well under a second.
EXIT_TIMEOUT_S = 10.0
# The worker wakes every 0.2 s (service.IDLE_POLL_S); a slow batch takes
# SLOW_SCORE_S. This bounds waiting for the counters to settle.
SETTLE_TIMEOUT_S = 20.0
# How often counters and flags are polled while waiting.
POLL_INTERVAL_S = 0.01
# A dry run gives up after this many scored windows without a raise; the
# shipped models raise on the second with these readings.
MAX_SCORED_FOR_RAISE = 100
# Failed reconnects watched while the broker is down: two show the doubling.
RETRIES_WATCHED = 2
# Scheduling slack on top of a backoff step plus its jitter, for a loaded
# 2-core machine; paho's wait itself never ends early.
BACKOFF_SLACK_S = 1.0
# What sidecar.mqtt logs when the connection drops, when a retry fails, and
# when its subscription holds.
LOST_RECORD = "connection lost"
FAILED_RECORD = "connect failed"
SUBSCRIBED_RECORD = "subscribed filters="
# Readings after a reconnect that must be scored without a new warm-up.
READINGS_AFTER_RECONNECT = 10
# Readings after the dry run's raise, so a live run whose raise comes a few
# windows later (it differs in receive times) still raises.
SPARE_READINGS = 5

FloatArray = npt.NDArray[np.float32]


class RestartableMosquitto:
    """A Mosquitto the test can stop, start again on the same port, and freeze.

    Args:
        binary: The Mosquitto executable.
        folder: Where its config and log go.
    """

    def __init__(self, binary: Path, folder: Path) -> None:
        self.address = BrokerAddress(LOOPBACK_HOST, free_port(), "mosquitto")
        self.log = folder / "mosquitto.log"
        self._binary = binary
        self._conf = folder / "mosquitto.conf"
        self._conf.write_text(
            MOSQUITTO_CONF_TEMPLATE.format(host=LOOPBACK_HOST, port=self.address.port)
        )
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    def start(self) -> None:
        """Start Mosquitto and wait until it listens."""
        with self.log.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(self._binary), "-c", str(self._conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        _wait_until_listening(self._process, self.address.port, self.log)

    def stop(self) -> None:
        """Stop Mosquitto (thawing it first if frozen); idempotent."""
        if self._process is None:
            return
        self.thaw()
        _terminate(self._process)
        self._process = None

    def freeze(self) -> None:
        """Suspend the process (SIGSTOP): it holds its sockets but answers nothing."""
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Resume a frozen process (SIGCONT)."""
        if self._process is not None and self._frozen:
            self._process.send_signal(signal.SIGCONT)
            self._frozen = False


class SlowScorer:
    """A fault-injection double for a model: the real scorer, slowed down.

    Args:
        inner: The scorer whose results are returned.
        delay_s: Seconds every call sleeps first.
    """

    def __init__(self, inner: Scorer, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.calls = 0

    def score(self, inputs: FloatArray) -> FloatArray:
        """Sleep, then return the real scores."""
        self.calls += 1
        time.sleep(self.delay_s)
        return self.inner.score(inputs)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[RestartableMosquitto]:
    """A running Mosquitto that the test may restart or freeze; always reaped."""
    binary = _find_mosquitto()
    if binary is None:
        pytest.skip(MOSQUITTO_MISSING_REASON)
    broker = RestartableMosquitto(binary, tmp_path)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def models() -> LoadedModels:
    """The shipped models with forced alarms, loaded per test (tests slow them)."""
    settings = _settings(BrokerAddress(LOOPBACK_HOST, 1, "mosquitto"))
    return load_cascade(settings.models, settings.detection, settings.window.length)


def _settings(broker: BrokerAddress, **limits: int) -> Settings:
    return settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
                "keepalive": KEEPALIVE_S,
            },
            "detection": ALWAYS_ALARM,
            "limits": limits,
        }
    )


@contextmanager
def _running(settings: Settings, models: LoadedModels) -> Iterator[Service]:
    service = Service(settings, models)
    service.start()
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        yield service
    finally:
        service.stop()


@contextmanager
def _publisher(broker: BrokerAddress) -> Iterator[mqtt.Client]:
    """A connected paho client for many publishes (`publish` connects per message)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"test-flood-{uuid.uuid4().hex[:8]}",
        reconnect_on_failure=False,
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        _wait_until(client.is_connected, CONNECT_TIMEOUT_S, "publisher connected")
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def _reading(index: int) -> bytes:
    document = {"temperature": 21.0 + (index % 7) * 0.1, "linkquality": 100 + index % 9}
    return json.dumps(document).encode()


def _publish_readings(
    client: mqtt.Client, topic: str, indices: range, qos: int = 1
) -> None:
    """Publish readings and wait until the broker has acknowledged the last."""
    info = None
    for index in indices:
        info = client.publish(topic, _reading(index), qos=qos)
    if info is not None:
        info.wait_for_publish(VERDICT_TIMEOUT_S)
        assert info.is_published()


def _publish_round_robin(client: mqtt.Client, count: int, devices: int) -> None:
    """Publish `count` readings at QoS 0 over `devices` devices, as fast as it goes."""
    info = None
    for index in range(count):
        device = f"zigbee2mqtt/flood_{index % devices}"
        info = client.publish(device, _reading(index), qos=0)
    if info is not None:
        # QoS 0 is "published" once written to the socket, in order.
        info.wait_for_publish(VERDICT_TIMEOUT_S)


def _learning_length(models: LoadedModels) -> int:
    """Messages a new device spends warming up and calibrating, raising nothing."""
    spec = models.spec
    return max(spec.warmup, spec.window) + models.cascade.calibration.windows


def _messages_until_raise(models: LoadedModels, settings: Settings) -> int:
    """Count the readings that raise a device, by a dry run through a pipeline."""
    pipeline = build_pipeline(settings, models)
    for index in range(_learning_length(models) + MAX_SCORED_FOR_RAISE):
        message = Message("zigbee2mqtt/dry_run", _reading(index), float(index))
        if pipeline.process([message]).verdicts:
            return index + 1
    pytest.fail(f"no raise in {MAX_SCORED_FOR_RAISE} scored windows of a dry run")


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until `condition` holds; return the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not {what} within {timeout} s")
        time.sleep(POLL_INTERVAL_S)
    return time.monotonic() - start


def _wait_counter(service: Service, name: str, value: int) -> None:
    """Wait until the counter `name` has reached `value`."""
    _wait_until(
        lambda: service.counters[name] >= value, VERDICT_TIMEOUT_S, f"{name}={value}"
    )


def _wait_learned(service: Service, models: LoadedModels) -> None:
    """Wait until a device fed `_learning_length` readings has learned from all."""
    spec = models.spec
    _wait_counter(service, "warming", max(spec.warmup, spec.window))
    _wait_counter(service, "calibrating", models.cascade.calibration.windows)


def _accounted(counters: dict[str, int]) -> bool:
    """Whether every message is processed, shed, own output, broker stats or queued."""
    return counters["received"] == (
        counters["processed"]
        + counters["shed"]
        + counters["own_output"]
        + counters["broker_stats"]
        + counters["queue_depth"]
    )


def _device_messages(counters: dict[str, int]) -> int:
    """Messages received that were neither our own output nor the broker's stats."""
    return counters["received"] - counters["own_output"] - counters["broker_stats"]


def _wait_settled(service: Service) -> dict[str, int]:
    """Wait until the queue is empty and every message is accounted for."""
    snapshot: dict[str, int] = {}

    def settled() -> bool:
        snapshot.update(service.counters)
        return snapshot["queue_depth"] == 0 and _accounted(snapshot)

    _wait_until(settled, SETTLE_TIMEOUT_S, "settled")
    return snapshot


def _verdicts(seen: list[ReceivedMessage], topic: str) -> list[dict[str, Any]]:
    return [json.loads(message.payload) for message in seen if message.topic == topic]


def _record_times(caplog: pytest.LogCaptureFixture, text: str) -> list[float]:
    """When each log record containing `text` was made, oldest first."""
    return [record.created for record in caplog.records if text in record.getMessage()]


def _rss_kb() -> int:
    """The resident set size of this process, in kB (proc(5), VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    pytest.fail("no VmRSS line in /proc/self/status")


def test_service_verdict_raised_while_broker_down_arrives_once(
    mosquitto: RestartableMosquitto,
    models: LoadedModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test that a verdict raised during a broker restart arrives once, state intact."""
    caplog.set_level(logging.INFO, logger="sidecar.mqtt")
    broker = mosquitto.address
    device = "restart_plug"
    topic = f"zigbee2mqtt/{device}"
    learning = _learning_length(models)
    settings = _settings(broker)
    injected = _messages_until_raise(models, settings) - learning + SPARE_READINGS
    with _running(settings, models) as service:
        with _publisher(broker) as client:
            _publish_readings(client, topic, range(learning))
        _wait_learned(service, models)
        before = service.counters
        assert before["verdicts_raised"] == 0

        mosquitto.stop()
        _wait_until(
            lambda: not service.adapter.connected.is_set(),
            CONNECT_TIMEOUT_S,
            "disconnected",
        )
        # Traffic already inside the sidecar when the broker went: fed
        # straight to the queue, as the network thread would.
        for index in range(learning, learning + injected):
            service.enqueue(Message(topic, _reading(index), time.time()))
        _wait_counter(service, "verdicts_raised", 1)
        # Down through two failed retries, to watch the backoff with jitter.
        _wait_until(
            lambda: len(_record_times(caplog, FAILED_RECORD)) >= RETRIES_WATCHED,
            RECONNECT_TIMEOUT_S,
            "retried",
        )

        mosquitto.start()
        reconnect_s = _wait_until(
            service.adapter.subscribed.is_set, RECONNECT_TIMEOUT_S, "resubscribed"
        )
        with MessageCollector(broker, verdict_topic("anomalies", device)) as output:
            output.wait_for(bool, timeout=VERDICT_TIMEOUT_S)
            time.sleep(DUPLICATE_WINDOW_S)
            seen = output.messages
        with _publisher(broker) as client:
            _publish_readings(
                client,
                topic,
                range(
                    learning + injected, learning + injected + READINGS_AFTER_RECONNECT
                ),
            )
        scored = before["windows_scored"] + injected + READINGS_AFTER_RECONNECT
        _wait_counter(service, "windows_scored", scored)
        settled = _wait_settled(service)
    lost = _record_times(caplog, LOST_RECORD)[0]
    failed = _record_times(caplog, FAILED_RECORD)[:RETRIES_WATCHED]
    waits = [later - earlier for earlier, later in itertools.pairwise([lost, *failed])]
    _LOG.info(
        "restart waits_s=%s reconnect_after_restart_s=%.2f injected=%d",
        [round(wait, 2) for wait in waits],
        reconnect_s,
        injected,
    )

    verdicts = _verdicts(seen, verdict_topic("anomalies", device))
    assert len(verdicts) == 1
    assert verdicts[0]["state"] == "raised"
    assert verdicts[0]["seq"] >= learning
    assert service.adapter.connects == 2
    assert settled["publish_failures"] == 0
    # Same device, same warm-up: nothing learned again after the restart.
    assert settled["devices_tracked"] == before["devices_tracked"] == 1
    assert settled["warming"] == before["warming"]
    assert settled["calibrating"] == before["calibrating"]
    scored_after = settled["windows_scored"] - before["windows_scored"]
    assert scored_after == injected + READINGS_AFTER_RECONNECT
    assert settled["processed"] == learning + injected + READINGS_AFTER_RECONNECT
    # paho's backoff doubles from RECONNECT_MIN_S; each retry adds jitter.
    for step, wait in enumerate(waits):
        backoff = RECONNECT_MIN_S * 2**step
        assert backoff <= wait < backoff + RECONNECT_JITTER_S + BACKOFF_SLACK_S


def test_service_broker_frozen_past_keepalive_reconnects_and_works(
    mosquitto: RestartableMosquitto, models: LoadedModels
) -> None:
    """Test that a broker frozen past the keepalive is left, rejoined and used again."""
    broker = mosquitto.address
    device = "frozen_plug"
    topic = f"zigbee2mqtt/{device}"
    learning = _learning_length(models)
    settings = _settings(broker)
    readings = _messages_until_raise(models, settings) + SPARE_READINGS
    with _running(settings, models) as service:
        with _publisher(broker) as client:
            _publish_readings(client, topic, range(learning))
        _wait_learned(service, models)

        mosquitto.freeze()
        time.sleep(FREEZE_S)
        noticed_while_frozen = not service.adapter.connected.is_set()
        mosquitto.thaw()
        thawed = time.monotonic()
        _wait_until(
            lambda: service.adapter.connects >= 2, RECONNECT_TIMEOUT_S, "reconnected"
        )
        _wait_until(
            service.adapter.subscribed.is_set, RECONNECT_TIMEOUT_S, "resubscribed"
        )
        reconnect_s = time.monotonic() - thawed

        with MessageCollector(broker, verdict_topic("anomalies", device)) as output:
            with _publisher(broker) as client:
                _publish_readings(client, topic, range(learning, readings))
            seen = output.wait_for(bool, timeout=VERDICT_TIMEOUT_S)
        with MessageCollector(broker, status_topic("anomalies")) as status:
            retained_status = status.wait_for(bool)[-1]
        _LOG.info("freeze reconnect_after_thaw_s=%.2f", reconnect_s)

    assert noticed_while_frozen
    assert _verdicts(seen, verdict_topic("anomalies", device))[0]["state"] == "raised"
    assert service.adapter.connects == 2
    # Mosquitto published the will (offline) for the lost connection; the
    # sidecar said online again after it.
    assert retained_status.payload == b"online"


# Messages published while the broker is frozen, with one in flight at a
# time: the rest, and the offline status after them, wait inside paho.
STUCK_PUBLISHES = 5


def test_adapter_stop_that_cannot_say_offline_leaves_the_will_to_say_it(
    mosquitto: RestartableMosquitto,
) -> None:
    """Test that a stop whose offline status is never acknowledged ends offline.

    A tester's flood kept paho's in-flight window full, so the status never
    left paho; a DISCONNECT then told the broker to discard the last will
    and `online` stayed retained.
    """
    broker = mosquitto.address
    status = status_topic("anomalies")
    settings = _settings(broker)
    adapter = MqttAdapter(
        settings.broker, [], status, lambda _message: None, max_inflight=1
    )
    adapter.start()
    assert adapter.connected.wait(CONNECT_TIMEOUT_S)
    with MessageCollector(broker, status) as seen:
        seen.wait_for(lambda got: any(m.payload == b"online" for m in got))

    mosquitto.freeze()
    try:
        for index in range(STUCK_PUBLISHES):
            adapter.publish(f"anomalies/stuck_{index}", b"{}", qos=1, retain=False)
        started = time.monotonic()
        adapter.stop()
        stop_s = time.monotonic() - started
    finally:
        mosquitto.thaw()

    with MessageCollector(broker, status) as retained:
        last = retained.wait_for(
            lambda got: any(m.payload == b"offline" for m in got),
            timeout=VERDICT_TIMEOUT_S,
        )[-1]
    assert last == ReceivedMessage(status, b"offline", True)
    # The 2 s wait for the acknowledgement, not paho waiting for the unsent
    # messages (it did, until the keepalive gave up on the frozen broker).
    assert stop_s < STOP_PUBLISH_TIMEOUT_S + STOP_SLACK_S


def test_service_slow_model_keeps_keepalive_and_sheds_counted(
    mosquitto: RestartableMosquitto, models: LoadedModels
) -> None:
    """Test that a stuck model run neither stalls the keepalive nor loses silently."""
    broker = mosquitto.address
    slow = SlowScorer(models.cascade.rf, SLOW_SCORE_S)
    models.cascade.rf = slow
    settings = _settings(broker, queue_size=SLOW_QUEUE_SIZE)
    deepest = 0
    with _running(settings, models) as service:
        with _publisher(broker) as client:
            started = time.monotonic()
            index = 0
            while time.monotonic() - started < SLOW_FLOOD_S:
                client.publish("zigbee2mqtt/slow_plug", _reading(index), qos=0)
                index += 1
                deepest = max(deepest, service.counters["queue_depth"])
                time.sleep(1.0 / SLOW_FLOOD_RATE)
            _wait_until(
                lambda: _device_messages(service.counters) == index,
                VERDICT_TIMEOUT_S,
                "all received",
            )
        counters = _wait_settled(service)
        connects = service.adapter.connects
        connected = service.adapter.connected.is_set()
    _LOG.info(
        "slow model published=%d received=%d processed=%d shed=%d runs=%d deepest=%d",
        index,
        counters["received"],
        counters["processed"],
        counters["shed"],
        slow.calls,
        deepest,
    )

    assert connects == 1
    assert connected
    assert KEEPALIVE_EXCEEDED not in mosquitto.log.read_text()
    assert slow.calls >= 2
    assert deepest <= SLOW_QUEUE_SIZE
    assert counters["shed"] > 0
    assert counters["worker_errors"] == 0
    assert _accounted(counters)


def test_service_sustained_overload_bounded_memory_and_counted(
    mosquitto: RestartableMosquitto, models: LoadedModels
) -> None:
    """Test that a flood faster than scoring keeps memory bounded and counts all."""
    broker = mosquitto.address
    models.cascade.rf = SlowScorer(models.cascade.rf, OVERLOAD_SCORE_S)
    settings = _settings(
        broker, queue_size=OVERLOAD_QUEUE_SIZE, batch_size=OVERLOAD_BATCH_SIZE
    )
    samples: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(RSS_SAMPLE_INTERVAL_S):
            samples.append(_rss_kb())

    with _running(settings, models) as service:
        baseline_kb = _rss_kb()
        sampler = threading.Thread(target=sample, name="rss-sampler")
        sampler.start()
        try:
            started = time.monotonic()
            with _publisher(broker) as client:
                _publish_round_robin(client, OVERLOAD_MESSAGES, OVERLOAD_DEVICES)
                published_s = time.monotonic() - started
                _wait_until(
                    lambda: _device_messages(service.counters) >= OVERLOAD_MESSAGES,
                    VERDICT_TIMEOUT_S,
                    "all received",
                )
            counters = _wait_settled(service)
        finally:
            sampling.set()
            sampler.join()
        after_kb = _rss_kb()
    growth_kb = max([after_kb, *samples]) - baseline_kb
    _LOG.info(
        "overload published_s=%.2f received=%d processed=%d shed=%d "
        "rss_baseline_kb=%d rss_peak_growth_kb=%d rss_after_growth_kb=%d",
        published_s,
        counters["received"],
        counters["processed"],
        counters["shed"],
        baseline_kb,
        growth_kb,
        after_kb - baseline_kb,
    )

    assert _device_messages(counters) == OVERLOAD_MESSAGES
    assert counters["shed"] > 0
    assert counters["worker_errors"] == 0
    assert _accounted(counters)
    assert growth_kb < RSS_GROWTH_LIMIT_KB


def test_service_stop_with_slow_model_is_bounded_and_counted(
    mosquitto: RestartableMosquitto, models: LoadedModels
) -> None:
    """Test that stop drains for a bounded time and counts the backlog it sheds."""
    models.cascade.rf = SlowScorer(models.cascade.rf, STOP_SCORE_S)
    settings = _settings(mosquitto.address, batch_size=STOP_BATCH_SIZE)
    topic = "zigbee2mqtt/backlog_plug"
    service = Service(settings, models)
    service.start()
    try:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        for index in range(_learning_length(models) + STOP_BACKLOG):
            service.enqueue(Message(topic, _reading(index), time.time()))
        # The worker is past the warm-up and inside slow model runs.
        _wait_counter(service, "windows_scored", STOP_BATCH_SIZE)
    finally:
        started = time.monotonic()
        service.stop(drain_timeout=STOP_DRAIN_S)
        stop_s = time.monotonic() - started
    counters = service.counters
    _LOG.info(
        "slow stop stop_s=%.2f processed=%d shed=%d",
        stop_s,
        counters["processed"],
        counters["shed"],
    )

    assert stop_s < STOP_DRAIN_S + STOP_SCORE_S + STOP_SLACK_S
    assert counters["shed"] > 0
    assert counters["queue_depth"] == 0
    assert _accounted(counters)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name
)
def test_cli_run_stops_cleanly_on_signal(
    mosquitto: RestartableMosquitto,
    models: LoadedModels,
    tmp_path: Path,
    signum: signal.Signals,
) -> None:
    """Test that SIGTERM or SIGINT ends `run` with 0, offline, verdict published."""
    broker = mosquitto.address
    device = "signal_plug"
    topic = f"zigbee2mqtt/{device}"
    settings = _settings(broker)
    readings = _messages_until_raise(models, settings) + SPARE_READINGS
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "broker": {"host": broker.host, "port": broker.port},
                "detection": ALWAYS_ALARM,
                "logging": {"level": "INFO"},
            }
        )
    )
    stderr_path = tmp_path / "sidecar.stderr"
    status = status_topic("anomalies")
    with (
        MessageCollector(broker, status) as status_seen,
        MessageCollector(broker, verdict_topic("anomalies", device)) as output,
        sidecar_process(["run", "--config", str(config)], stderr_path) as process,
    ):
        status_seen.wait_for(
            lambda seen: any(m.payload == b"online" for m in seen),
            timeout=STARTUP_TIMEOUT_S,
        )
        # `online` goes out before the SUBSCRIBE: readings published
        # between the two would never reach the sidecar.
        _wait_until(
            lambda: SUBSCRIBED_RECORD in stderr_path.read_text(),
            STARTUP_TIMEOUT_S,
            "subscribed",
        )
        with _publisher(broker) as client:
            _publish_readings(client, topic, range(readings))
            process.send_signal(signum)
        signalled = time.monotonic()
        code = process.wait(EXIT_TIMEOUT_S)
        exit_s = time.monotonic() - signalled
        seen = output.wait_for(bool, timeout=VERDICT_TIMEOUT_S)
        time.sleep(DUPLICATE_WINDOW_S)
        seen = output.messages
    _LOG.info("signal=%s exit_s=%.2f", signum.name, exit_s)

    log = stderr_path.read_text()
    assert code == 0, log
    assert "Traceback" not in log
    assert f"stopping signal={signum.name}" in log
    assert f"processed={readings} " in log
    verdicts = _verdicts(seen, verdict_topic("anomalies", device))
    assert [verdict["state"] for verdict in verdicts] == ["raised"]
    with MessageCollector(broker, status) as retained:
        last = retained.wait_for(bool)[-1]
    assert last == ReceivedMessage(status, b"offline", True)


# Enough SIGHUPs, close enough together, that some arrive while the main
# thread is busy reloading rather than waiting for a signal: a tester's
# sidecar died of the eighth (threads numpy starts at import did not block
# the signal, so its default action ended the process).
HANGUPS = 40
HANGUP_INTERVAL_S = 0.02


def _fatal_somewhere(pid: int) -> set[signal.Signals]:
    """The stop and reload signals whose default action could end the process.

    A signal sent to a process goes to any thread that does not block it; one
    at its default action (no handler caught it) then ends the process. So
    each must be blocked by every thread or caught by a handler.
    """
    held = (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)
    caught = _mask(Path(f"/proc/{pid}/status"), "SigCgt")
    exposed = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        blocked = _mask(task / "status", "SigBlk")
        exposed |= {s for s in held if not blocked >> (s - 1) & 1}
    return {s for s in exposed if not caught >> (s - 1) & 1}


def _mask(status: Path, field: str) -> int:
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    message = f"{field} not in {status}"
    raise AssertionError(message)


def test_cli_run_survives_a_burst_of_sighups_then_stops_cleanly(
    mosquitto: RestartableMosquitto, tmp_path: Path
) -> None:
    """Test that SIGHUPs during reloads neither kill nor stall `run`."""
    broker = mosquitto.address
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "broker": {"host": broker.host, "port": broker.port},
                "logging": {"level": "INFO"},
            }
        )
    )
    stderr_path = tmp_path / "sidecar.stderr"
    with sidecar_process(["run", "--config", str(config)], stderr_path) as process:
        wait_for_text(stderr_path, SUBSCRIBED_RECORD, STARTUP_TIMEOUT_S)
        assert _fatal_somewhere(process.pid) == set()
        for _ in range(HANGUPS):
            process.send_signal(signal.SIGHUP)
            time.sleep(HANGUP_INTERVAL_S)
        assert process.poll() is None, stderr_path.read_text()
        process.send_signal(signal.SIGTERM)
        code = process.wait(EXIT_TIMEOUT_S)

    log = stderr_path.read_text()
    assert code == 0, log
    assert "stopping signal=SIGTERM" in log
    assert "reloading signal=SIGHUP" in log


# Where the Tasmota plug's offline condition is published (not a digest: the
# id is already safe).
GARAGE_OFFLINE = "anomalies/garage_plug/offline"


def _raise_garage_offline(broker: BrokerAddress) -> None:
    """Announce a plug offline; return once its raised condition is out."""
    with _publisher(broker) as client:
        client.publish("tele/garage_plug/LWT", b"Offline", qos=1)
    with MessageCollector(broker, GARAGE_OFFLINE) as raised:
        raised.wait_for(bool)


def test_service_publishes_standing_verdicts_again_to_a_broker_that_lost_them(
    mosquitto: RestartableMosquitto, models: LoadedModels
) -> None:
    """Test that a restart without persistence does not erase a standing alarm.

    Mosquitto keeps retained messages in memory unless persistence is on
    (its default is off): after a restart the raised verdict was gone, while
    the sidecar still held the device in alarm.
    """
    broker = mosquitto.address
    settings = _settings(broker)
    with _running(settings, models) as service:
        _raise_garage_offline(broker)

        mosquitto.stop()
        mosquitto.start()
        _wait_until(
            lambda: service.adapter.connects >= 2, RECONNECT_TIMEOUT_S, "reconnected"
        )
        with MessageCollector(broker, GARAGE_OFFLINE) as after:
            seen = after.wait_for(bool, timeout=REPLAY_GRACE_S + VERDICT_TIMEOUT_S)
    restored = json.loads(seen[-1].payload)
    assert restored["state"] == "raised"
    assert restored["kind"] == "offline"


def test_service_does_not_repeat_standing_verdicts_the_broker_kept(
    mosquitto: RestartableMosquitto, models: LoadedModels
) -> None:
    """Test that a reconnect to a broker that kept them publishes nothing again.

    A second `raised` would notify Home Assistant and Node-RED users again
    for an alarm they already know about.
    """
    broker = mosquitto.address
    settings = _settings(broker)
    with _running(settings, models) as service:
        _raise_garage_offline(broker)

        with MessageCollector(broker, GARAGE_OFFLINE) as after:
            after.wait_for(bool)  # the retained copy, on subscribing
            mosquitto.freeze()
            time.sleep(FREEZE_S)
            mosquitto.thaw()
            _wait_until(
                lambda: service.adapter.connects >= 2,
                RECONNECT_TIMEOUT_S,
                "reconnected",
            )
            time.sleep(REPLAY_GRACE_S + 1.0)
            seen = after.messages

    assert [m.retain for m in seen] == [True]
