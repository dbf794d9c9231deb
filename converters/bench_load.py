"""Load generators: separate processes publishing small JSON readings for many devices.

Each generator owns the devices whose index modulo the number of generators
is its own, and publishes to them round robin, so every device's messages
leave in order and its n-th message is the n-th of the round robin. Without
a rate it publishes as fast as the broker reads its socket (paho writes
straight to the socket when no network thread runs; a generator waits for
the broker before running further ahead than `BACKLOG_MESSAGES`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

__all__ = [
    "LoadGenerators",
    "LoadResult",
    "LoadSpec",
    "device_id",
    "device_index",
    "payloads",
]

_LOG = logging.getLogger(__name__)

# Topics the sidecar's default rules route as zigbee2mqtt devices.
TOPIC_PREFIX = "zigbee2mqtt/"
DEVICE_PREFIX = "dev_"
# Wide enough for the largest fleet benchmarked (100,000 devices).
DEVICE_DIGITS = 6
# Distinct normal payloads cycled through, pre-encoded so that building a
# message costs nothing next to publishing it.
PAYLOAD_POOL = 997
# A healthy reading: room temperature and humidity with sensor noise.
TEMPERATURE_C = 21.0
TEMPERATURE_NOISE_C = 0.2
HUMIDITY_PCT = 40.0
HUMIDITY_NOISE_PCT = 0.5
# The injected fault: a sensor that suddenly reads zeros. Fed through the
# live pipeline with the shipped models and default thresholds (a dry run
# while this was written), it raises after about 20 such messages and clears
# about 64 windows after the fault stops, every cycle. In the same dry run
# alternating spikes of +40/-30 degrees raised once in four cycles and
# uniform noise never (the shipped models learned TON_IoT's attacks).
FAULT_PAYLOAD = b'{"temperature": 0.0, "humidity": 0.0}'
# Per faulty device: FAULT_BURST faulty messages at the start of every cycle
# of FAULT_CYCLE messages, long enough apart for the alarm to clear between.
FAULT_BURST = 40
FAULT_CYCLE = 150
# A generator runs at most this many messages ahead of the broker: bounded
# memory in the generator, and "as fast as the broker takes them".
BACKLOG_MESSAGES = 2000
# Paced generators check the clock every this many messages (~1 ms of work).
PACE_CHUNK = 16
# paho's default of 20 unacknowledged QoS 1 messages would cap a generator
# at one loopback round trip per 20 messages; Mosquitto 2.0 accepts any
# number from an MQTT 3.1.1 client.
PUBLISHER_INFLIGHT = 1000
CONNECT_TIMEOUT_S = 10.0
# For the last message to leave (QoS 0) or be acknowledged (QoS 1).
FLUSH_TIMEOUT_S = 30.0
# A spawned generator imports paho and connects in well under a second.
READY_TIMEOUT_S = 30.0
# Generous: a generator stops on its own after `seconds` plus its flush.
RESULT_SLACK_S = FLUSH_TIMEOUT_S + 10.0
NETWORK_POLL_S = 0.001


def device_id(index: int) -> str:
    """The device id of device number `index` (what the sidecar tracks)."""
    return f"{DEVICE_PREFIX}{index:0{DEVICE_DIGITS}d}"


def device_index(device: str) -> int | None:
    """The number of a benchmark device id, or None for anything else."""
    digits = device.removeprefix(DEVICE_PREFIX)
    if digits == device or not digits.isdigit():
        return None
    return int(digits)


def payloads(seed: int, count: int = PAYLOAD_POOL) -> list[bytes]:
    """Healthy readings as JSON, e.g. `{"temperature": 21.3, "humidity": 40.1}`."""
    rng = random.Random(seed)
    return [
        json.dumps(
            {
                "temperature": round(rng.gauss(TEMPERATURE_C, TEMPERATURE_NOISE_C), 2),
                "humidity": round(rng.gauss(HUMIDITY_PCT, HUMIDITY_NOISE_PCT), 1),
            }
        ).encode()
        for _ in range(count)
    ]


@dataclass(frozen=True)
class LoadSpec:
    """What every generator of one run publishes.

    Attributes:
        host: The broker's address.
        port: The broker's port.
        devices: Distinct devices, shared among the generators.
        qos: QoS of every publish.
        seconds: How long to publish.
        rate: Messages per second over all generators; None for as fast as
            the broker takes them.
        faulty_devices: Devices 0 to faulty_devices-1 get faults injected.
            A paced load (with a rate) records the publish time of every
            message.
        seed: Seed of the healthy readings.
    """

    host: str
    port: int
    devices: int
    qos: int = 0
    seconds: float = 5.0
    rate: float | None = None
    faulty_devices: int = 0
    seed: int = 0


@dataclass
class LoadResult:
    """What one generator did: publishes accepted, its time span, publish times.

    Attributes:
        published: Messages paho accepted and flushed to the broker.
        started: When the first publish went out (time.time()).
        ended: When the last one was flushed (time.time()).
        publish_times: Paced loads only: for each device this generator
            owns, the publish time of its n-th message at position n.
        errors: Publishes paho refused (never expected on loopback).
    """

    published: int = 0
    started: float = 0.0
    ended: float = 0.0
    publish_times: dict[int, list[float]] = field(default_factory=dict)
    errors: int = 0


def is_faulty(spec: LoadSpec, device: int, position: int) -> bool:
    """Whether the `position`-th message of `device` is an injected fault."""
    return device < spec.faulty_devices and position % FAULT_CYCLE < FAULT_BURST


def _connect(spec: LoadSpec, index: int) -> paho.Client:
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"bench-load-{index}-{uuid.uuid4().hex[:8]}",
    )
    client.max_inflight_messages_set(PUBLISHER_INFLIGHT)
    client.connect(spec.host, spec.port)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while not client.is_connected():
        if time.monotonic() > deadline:
            message = f"load generator could not connect to {spec.host}:{spec.port}"
            raise ConnectionError(message)
        client.loop(NETWORK_POLL_S)
    return client


def _wait_published(client: paho.Client, info: paho.MQTTMessageInfo) -> None:
    deadline = time.monotonic() + FLUSH_TIMEOUT_S
    while not info.is_published() and time.monotonic() < deadline:
        client.loop(NETWORK_POLL_S)


def _publish(
    spec: LoadSpec, index: int, workers: int, client: paho.Client
) -> LoadResult:
    """Publish round robin over this generator's devices for spec.seconds."""
    own = list(range(index, spec.devices, workers))
    topics = [f"{TOPIC_PREFIX}{device_id(device)}" for device in own]
    pool = payloads(spec.seed + index)
    result = LoadResult(
        publish_times={device: [] for device in own} if spec.rate is not None else {}
    )
    rate = None if spec.rate is None else spec.rate / workers
    backlog: list[paho.MQTTMessageInfo] = []
    sent = 0
    result.started = time.time()
    start = time.monotonic()
    stop_at = start + spec.seconds
    while True:
        now = time.monotonic()
        if now >= stop_at:
            break
        if rate is not None and sent > (now - start) * rate:
            time.sleep(min(sent / rate - (now - start), stop_at - now))
            continue
        for _ in range(PACE_CHUNK):
            slot = sent % len(own)
            position = sent // len(own)
            device = own[slot]
            payload = pool[sent % len(pool)]
            if is_faulty(spec, device, position):
                payload = FAULT_PAYLOAD
            info = client.publish(topics[slot], payload, qos=spec.qos)
            if device in result.publish_times:
                result.publish_times[device].append(time.time())
            sent += 1
            if info.rc != paho.MQTT_ERR_SUCCESS:
                result.errors += 1
                continue
            result.published += 1
            backlog.append(info)
        if len(backlog) >= BACKLOG_MESSAGES:
            # Let the broker catch up with the older half before going on.
            _wait_published(client, backlog[len(backlog) // 2])
            backlog = backlog[len(backlog) // 2 + 1 :]
        client.loop_misc()
    if backlog:
        _wait_published(client, backlog[-1])
    result.ended = time.time()
    return result


def _generator(
    spec: LoadSpec,
    index: int,
    workers: int,
    go: Any,
    results: Any,
) -> None:
    """The body of one generator process: connect, say ready, wait, publish."""
    client = _connect(spec, index)
    results.put(("ready", index, None))
    go.wait()
    result = _publish(spec, index, workers, client)
    client.disconnect()
    results.put(("done", index, result))


class LoadGenerators:
    """Start generator processes, release them together, collect their results.

    Args:
        spec: What they publish.
        workers: How many processes share the devices.
    """

    def __init__(self, spec: LoadSpec, workers: int) -> None:
        self.spec = spec
        # A fork server starts one clean process once and forks generators
        # from it: no threads of the caller are inherited (paho's, the
        # sidecar's), and later runs skip the interpreter start-up.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self._go = context.Event()
        self._results: Any = context.Queue()
        self._processes = [
            context.Process(
                target=_generator,
                args=(spec, index, workers, self._go, self._results),
                name=f"bench-load-{index}",
                daemon=True,
            )
            for index in range(workers)
        ]

    def start(self) -> None:
        """Start every generator and wait until each is connected."""
        for process in self._processes:
            process.start()
        for _ in self._processes:
            kind, index, _result = self._results.get(timeout=READY_TIMEOUT_S)
            _LOG.debug("load generator %s index=%d", kind, index)

    def go(self) -> float:
        """Release the generators; return the time.time() they were released."""
        released = time.time()
        self._go.set()
        return released

    def finish(self) -> list[LoadResult]:
        """Wait until every generator has flushed its last message."""
        results = []
        for _ in self._processes:
            _kind, _index, result = self._results.get(
                timeout=self.spec.seconds + RESULT_SLACK_S
            )
            results.append(result)
        for process in self._processes:
            process.join(RESULT_SLACK_S)
        return results

    def kill(self) -> None:
        """Stop any generator still running (after a failure)."""
        for process in self._processes:
            if process.is_alive():
                process.kill()
                process.join()
