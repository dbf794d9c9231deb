"""One run of each benchmark stage against a broker: ceiling, sidecar, peer, latency.

Every run starts its load generators, waits until they are connected,
releases them together and publishes for `seconds`. Throughput is what the
subscriber handled between release and the last flushed publish, per
second. After the load, the run waits until the subscriber stops receiving,
then reads the broker's `$SYS` drop counter and accounts for every message:
lost = published - received - broker_dropped, which must be 0.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from converters import bench_offline
from converters.bench_broker import DroppedCounter
from converters.bench_load import LoadGenerators, LoadResult, LoadSpec, device_index
from converters.bench_subscribers import (
    BareSubscriber,
    CountingProcess,
    RiverPeer,
    VerdictListener,
    VerdictSeen,
)
from sidecar.config import Settings
from sidecar.detector import LoadedModels
from sidecar.service import Service

__all__ = [
    "Bench",
    "Run",
    "run_ceiling",
    "run_ceiling_shared",
    "run_latency",
    "run_peer",
    "run_sidecar",
]

_LOG = logging.getLogger(__name__)

Run = dict[str, Any]

# A subscriber has caught up once nothing arrived for this long: Mosquitto
# hands a connected client its queued messages back to back.
QUIET_S = 0.3
# Bounds the wait for a slow subscriber to empty the broker's queue for it
# (Mosquitto's max_queued_messages default is 1000; paho buffers more).
SETTLE_TIMEOUT_S = 30.0
POLL_S = 0.02
CONNECT_TIMEOUT_S = 10.0
# After the load, the sidecar drains its queue for at most this long on stop;
# what is left is shed and counted (Service.stop). Short: the throughput is
# measured while the load runs, the drain only settles the accounting.
STOP_DRAIN_S = 0.5
# Devices of the latency stage (at most; fewer if the bench has fewer), one
# in LATENCY_FAULTY_EVERY of them faulty: each raises and clears about once
# per bench_load.FAULT_CYCLE of its messages.
LATENCY_DEVICES = 100
LATENCY_FAULTY_EVERY = 5
MS_PER_S = 1000.0
# Subscriber processes of the shared-subscription ceiling: one per core of
# the 2-core machines this was measured on. The group name is arbitrary.
SHARED_PROCESSES = 2
SHARED_GROUP = "bench"
PERCENTILES = {"p50": 50.0, "p99": 99.0}


@dataclass(frozen=True)
class Bench:
    """Everything a run needs: the broker, the load, the sidecar's inputs.

    Attributes:
        host: The broker's address.
        port: The broker's port.
        qos: QoS of the load (and of the subscriptions).
        seconds: How long each run publishes.
        workers: Load generator processes.
        devices: Distinct devices of the throughput stages.
        settings: The sidecar's settings, pointed at the broker.
        models: The sidecar's loaded models, shared by its runs.
        dropped: The broker's `$SYS` drop counter.
    """

    host: str
    port: int
    qos: int
    seconds: float
    workers: int
    devices: int
    settings: Settings
    models: LoadedModels
    dropped: DroppedCounter

    def spec(
        self, devices: int, rate: float | None = None, faulty: int = 0
    ) -> LoadSpec:
        """The load of one run."""
        return LoadSpec(
            self.host, self.port, devices, self.qos, self.seconds, rate, faulty
        )


def _wait_quiet(received: Callable[[], int]) -> None:
    """Wait until `received()` has not changed for QUIET_S."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = received()
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        now = received()
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S:
            return
    _LOG.warning("subscriber still receiving after timeout_s=%.0f", SETTLE_TIMEOUT_S)


def _load(
    bench: Bench, spec: LoadSpec, handled: Callable[[], int]
) -> tuple[list[LoadResult], int | None, float, float, int]:
    """Run the generators; return results, drops before, start, end, handled."""
    generators = LoadGenerators(spec, bench.workers)
    try:
        generators.start()
        # No load since the last run settled and its drops were read from a
        # value published after that: the latest value is current.
        dropped_before = bench.dropped.latest()
        handled_before = handled()
        started = generators.go()
        results = generators.finish()
        ended = time.time()
        handled_during = handled() - handled_before
    finally:
        generators.kill()
    return results, dropped_before, started, ended, handled_during


def _account(
    bench: Bench,
    results: list[LoadResult],
    dropped_before: int | None,
    received: int,
) -> Run:
    """Published, received, the broker's drops and what is left: lost."""
    published = sum(result.published for result in results)
    dropped_after = bench.dropped.read_after(time.time())
    broker_dropped = (
        None
        if dropped_before is None or dropped_after is None
        else dropped_after - dropped_before
    )
    return {
        "published": published,
        "publish_errors": sum(result.errors for result in results),
        "received": received,
        "broker_dropped": broker_dropped,
        "lost": published - received - (broker_dropped or 0),
    }


def _throughput(
    bench: Bench,
    spec: LoadSpec,
    handled: Callable[[], int],
    received: Callable[[], int],
    settle: Callable[[], None],
) -> Run:
    received_before = received()
    results, dropped_before, started, ended, handled_during = _load(
        bench, spec, handled
    )
    seconds = ended - started
    received_during = received() - received_before
    _wait_quiet(received)
    settle()
    run = _account(bench, results, dropped_before, received() - received_before)
    run["seconds"] = round(seconds, 3)
    run["per_s"] = handled_during / seconds
    run["received_per_s"] = received_during / seconds
    run["publish_per_s"] = run["published"] / seconds
    return run


def run_ceiling(bench: Bench) -> Run:
    """A bare paho subscriber on `#` that only counts, under the full load."""
    subscriber = BareSubscriber(bench.host, bench.port, "#", bench.qos)
    try:
        # Retained output of earlier sidecar runs arrives right after SUBACK.
        time.sleep(QUIET_S)
        return _throughput(
            bench,
            bench.spec(bench.devices),
            lambda: subscriber.count,
            lambda: subscriber.count,
            lambda: None,
        )
    finally:
        subscriber.close()


def run_ceiling_shared(bench: Bench, processes: int = SHARED_PROCESSES) -> Run:
    """Bare counting subscribers in processes of their own, sharing `#`.

    The broker hands each message of `$share/<group>/#` to one member of
    the group (MQTT 5 section 4.8.2; Mosquitto offers it to 3.1.1 clients
    too), so this is how far spreading the work across processes raises
    the ceiling of one paho client. Mosquitto picks the member per message,
    not per device, so a sidecar spread this way would need to hand each
    device's messages to one process itself. The counting processes
    subscribe at QoS 0 whatever the bench's QoS.
    """
    members = [
        CountingProcess(bench.host, bench.port, [f"$share/{SHARED_GROUP}/#"])
        for _ in range(processes)
    ]

    def count() -> int:
        return sum(member.count for member in members)

    try:
        time.sleep(QUIET_S)
        run = _throughput(bench, bench.spec(bench.devices), count, count, lambda: None)
        run["processes"] = processes
        return run
    finally:
        for member in members:
            member.close()


def run_peer(bench: Bench) -> Run:
    """The River peer: per-message HalfSpaceTrees in paho's callback."""
    peer = RiverPeer(bench.host, bench.port, "#", bench.qos)
    try:
        time.sleep(QUIET_S)
        scored_before = peer.scored
        run = _throughput(
            bench,
            bench.spec(bench.devices),
            lambda: peer.scored,
            lambda: peer.count,
            lambda: None,
        )
        run["scored"] = peer.scored - scored_before
        return run
    finally:
        peer.close()


def _sidecar_settings(bench: Bench, max_devices: int, scores: bool) -> Settings:
    """The configured settings with a unique client id and room for the fleet.

    Two defaults are switched off when the sidecar has them. Its own watch of
    the broker's drop counter: the bench reads that counter itself, and
    without it every message the sidecar receives is either load or its own
    output, so the accounting is exact. Home Assistant discovery: it
    publishes five retained configs per new device, which Mosquitto keeps
    and hands every later subscriber on `#` (the next ceiling, peer and
    sidecar runs) at once, so one run would flood the next. With `scores`,
    every scored window is published (output.publish_scores), for a latency
    per window.
    """
    settings = bench.settings
    update: dict[str, Any] = {
        "broker": settings.broker.model_copy(
            update={"client_id": f"bench-sidecar-{uuid.uuid4().hex[:8]}"}
        ),
        "limits": settings.limits.model_copy(
            update={"max_devices": max(settings.limits.max_devices, max_devices)}
        ),
    }
    if scores:
        update["output"] = settings.output.model_copy(update={"publish_scores": True})
    health = getattr(settings, "health", None)
    if health is not None and hasattr(health, "broker_dropped_topic"):
        update["health"] = health.model_copy(update={"broker_dropped_topic": ""})
    discovery = getattr(settings, "discovery", None)
    if discovery is not None and getattr(discovery, "enabled", False):
        update["discovery"] = discovery.model_copy(update={"enabled": False})
    return settings.model_copy(update=update)


def _output_filters(settings: Settings) -> list[str]:
    """Filters covering everything the sidecar publishes."""
    filters = [f"{settings.output.prefix}/#"]
    discovery = getattr(settings, "discovery", None)
    if discovery is not None and getattr(discovery, "enabled", False):
        filters.append(f"{discovery.prefix}/#")
    return filters


class _RunningSidecar:
    """A started sidecar, its counters at the start of the load, and its stop."""

    def __init__(
        self,
        bench: Bench,
        devices: int,
        warm: bool,
        max_devices: int,
        scores: bool = False,
    ) -> None:
        settings = _sidecar_settings(bench, max_devices, scores)
        self.service = Service(settings, bench.models)
        # The sidecar's own output (verdicts, status, Home Assistant
        # discovery) comes back to it through `#`; what the broker drops of
        # those copies is in its drop counter too, so the accounting needs how
        # many the sidecar published while subscribed.
        self.outputs = CountingProcess(
            bench.host, bench.port, _output_filters(settings)
        )
        self.prewarmed = (
            bench_offline.prewarm(
                self.service.pipeline,
                bench.models,
                devices,
                settings.limits.batch_size,
            )
            if warm
            else 0
        )
        self.service.start()
        if not self.service.adapter.subscribed.wait(CONNECT_TIMEOUT_S):
            self.service.stop(0.0)
            message = f"sidecar not subscribed to {bench.host}:{bench.port}"
            raise ConnectionError(message)
        _wait_quiet(lambda: self.outputs.count)
        self.before = self.service.counters
        self.outputs_before = self.outputs.count
        self.outputs_at_stop = self.outputs_before
        self.stopped = False

    def load_received(self) -> int:
        """Messages received that are not the sidecar's own output."""
        counters = self.service.counters
        return counters["received"] - counters["own_output"]

    def stop(self) -> None:
        """Stop once: drain for STOP_DRAIN_S, shed and count the rest.

        Output published from here on (the drain's verdicts, the offline
        status) no longer reaches the sidecar, which unsubscribes first.
        """
        if not self.stopped:
            self.stopped = True
            _wait_quiet(lambda: self.outputs.count)
            self.outputs_at_stop = self.outputs.count
            self.service.stop(STOP_DRAIN_S)
            self.outputs.close()

    def summary(self) -> Run:
        """The sidecar's own counts for the load, from its counters."""
        after = self.service.counters
        delta = {name: after[name] - self.before.get(name, 0) for name in after}
        return {
            "processed": delta["processed"],
            "shed": delta["shed"],
            "own_output": delta["own_output"],
            "own_output_published": self.outputs_at_stop - self.outputs_before,
            "queue_depth": after["queue_depth"],
            "worker_errors": delta["worker_errors"],
            "windows_scored": delta["windows_scored"],
            "verdicts": delta["verdicts_raised"] + delta["verdicts_cleared"],
            "devices_tracked": after["devices_tracked"],
            "devices_evicted": delta["devices_evicted"],
            # Service's invariant: received = processed + shed + own_output +
            # broker_stats + queue_depth once the worker is between batches
            # (it is: stopped). broker_stats is absent from older sidecars.
            "accounted": delta["received"]
            == delta["processed"]
            + delta["shed"]
            + delta["own_output"]
            + delta.get("broker_stats", 0)
            + delta["queue_depth"],
        }


def _count_own_output(run: Run) -> None:
    """Take the broker's drops of the sidecar's own output out of `lost`.

    The broker delivered own_output_published copies to the sidecar (it
    subscribes to `#`), of which it received own_output; the rest are in
    broker_dropped.
    """
    run["lost"] += run["own_output_published"] - run["own_output"]


def run_sidecar(bench: Bench, devices: int | None = None, prewarm: bool = True) -> Run:
    """The real sidecar, in process with its default settings, under the load.

    Args:
        bench: Broker, load and models.
        devices: Distinct devices (bench.devices if None).
        prewarm: Whether every device is past warm-up when the load starts;
            without it, every device is new to the sidecar.
    """
    devices = bench.devices if devices is None else devices
    sidecar = _RunningSidecar(bench, devices, prewarm, devices)
    try:
        run = _throughput(
            bench,
            bench.spec(devices),
            lambda: sidecar.service.counters["processed"],
            sidecar.load_received,
            sidecar.stop,
        )
    finally:
        sidecar.stop()
    run.update(sidecar.summary())
    _count_own_output(run)
    run["devices"] = devices
    run["prewarmed_per_device"] = sidecar.prewarmed
    return run


def run_latency(bench: Bench, rate: float, scores: bool = False) -> Run:
    """Paced load with injected faults; publish-to-verdict time of every verdict.

    The publish time of a verdict's message is looked up by its device and
    `seq` (the device's message count in the sidecar). That is exact only
    when no message of the run was dropped or shed (`exact`); the time from
    the sidecar's receive to the verdict (`received_at` in the verdict) is
    exact always.
    """
    devices = min(LATENCY_DEVICES, bench.devices)
    faulty = max(1, devices // LATENCY_FAULTY_EVERY)
    spec = bench.spec(devices, rate=rate, faulty=faulty)
    sidecar = _RunningSidecar(bench, devices, True, devices, scores)
    listener = VerdictListener(bench.host, bench.port, bench.settings.output.prefix)
    try:
        received_before = sidecar.load_received()
        results, dropped_before, started, ended, _ = _load(
            bench, spec, lambda: sidecar.service.counters["processed"]
        )
        _wait_quiet(sidecar.load_received)
        sidecar.stop()
        # Verdicts published in the drain still cross the broker.
        time.sleep(QUIET_S)
    finally:
        sidecar.stop()
        listener.close()
    run = _account(
        bench, results, dropped_before, sidecar.load_received() - received_before
    )
    run.update(sidecar.summary())
    _count_own_output(run)
    run["rate"] = rate
    run["seconds"] = round(ended - started, 3)
    run.update(_latencies(listener, results, sidecar.prewarmed))
    run["exact"] = run["shed"] == 0 and not run["broker_dropped"]
    return run


def _latencies(
    listener: VerdictListener, results: list[LoadResult], prewarmed: int
) -> Run:
    """Percentiles of publish-to-verdict and receive-to-verdict, in ms."""
    published_at: dict[int, list[float]] = {}
    for result in results:
        published_at.update(result.publish_times)
    verdicts, scores = listener.snapshot()
    from_receive = [verdict.arrived - verdict.received_at for verdict in verdicts]
    return {
        "verdicts_seen": len(verdicts),
        "scores_seen": len(scores),
        "latency_ms": _percentiles(_from_publish(verdicts, published_at, prewarmed)),
        "receive_to_verdict_ms": _percentiles(from_receive),
        "score_latency_ms": _percentiles(
            _from_publish(scores, published_at, prewarmed)
        ),
    }


def _from_publish(
    seen: list[VerdictSeen], published_at: dict[int, list[float]], prewarmed: int
) -> list[float]:
    """Seconds from the publish of each output's message to the output's arrival."""
    delays = []
    for output in seen:
        index = device_index(output.device)
        times = published_at.get(index, []) if index is not None else []
        position = output.seq - prewarmed
        if 0 <= position < len(times):
            delays.append(output.arrived - times[position])
    return delays


def _percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    values = np.array(seconds) * MS_PER_S
    result: dict[str, float | None] = {
        name: float(np.percentile(values, q)) for name, q in PERCENTILES.items()
    }
    result["max"] = float(values.max())
    return {
        name: None if value is None or math.isnan(value) else round(value, 2)
        for name, value in result.items()
    }
