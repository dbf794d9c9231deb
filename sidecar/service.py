"""Orchestration: the bounded queue, the worker and verdict publishing."""

from __future__ import annotations

import collections
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence

from sidecar.conditions import ConditionKind, ConditionVerdict
from sidecar.config import Settings
from sidecar.detector import LoadedModels
from sidecar.discovery import OWN_CONFIG_MARK, Discovery
from sidecar.health import DataPathHealth
from sidecar.metrics import MetricsEndpoint
from sidecar.mqtt import MqttAdapter
from sidecar.overrides import FALSE_POSITIVE, RESET, FeedbackStore, OverrideTable
from sidecar.pipeline import BatchResult, Pipeline, WindowScore
from sidecar.stream import Message
from sidecar.topics import (
    FEEDBACK_LEVEL,
    HEALTH_LEVEL,
    PROBE_LEVEL,
    SCORES_LEVEL,
    STATUS_LEVEL,
    TopicRouter,
    device_topic_segment,
    filter_matches,
)
from sidecar.transport import Transport, TransportFactory
from sidecar.verdicts import (
    ORIGIN,
    OWN_OUTPUT_MARK,
    AlarmLifecycle,
    Transition,
    Verdict,
)

__all__ = [
    "Service",
    "build_pipeline",
    "condition_topic",
    "feedback_topic",
    "health_topic",
    "probe_topic",
    "score_topic",
    "status_topic",
    "verdict_topic",
]

_LOG = logging.getLogger(__name__)

# The worker wakes this often when idle, to notice a stop request.
IDLE_POLL_S = 0.2
# On stop, queued messages are processed and their verdicts published for at
# most this long; the rest is shed and counted. With the 2 s unsubscribe and
# 2 s offline-status waits (mqtt.STOP_PUBLISH_TIMEOUT_S) a stop stays under
# Docker's default 10 s grace period between SIGTERM and SIGKILL.
STOP_DRAIN_TIMEOUT_S = 5.0
# After the drain deadline, how long to wait for a batch already inside the
# models before disconnecting without it.
STOP_BATCH_GRACE_S = 2.0
# Verdicts (and the status) the MQTT client may hold while the broker is
# away. Verdicts are rare, one per alarm transition: 10,000 covers a large
# fleet's transitions through a long outage at about 1 kB each, and keeps a
# dead broker from growing the process without limit. Past it a verdict is
# refused, counted in publish_failures and logged.
HELD_MESSAGES_LIMIT = 10_000
# Counters are logged at INFO this often.
STATS_INTERVAL_S = 60.0
# After a reconnect, how long the retained copies of the raised verdicts have
# to come back through the subscription before the broker is taken to have
# lost them (a restart without persistence, Mosquitto's default) and they are
# published again. The broker replays retained messages right after SUBACK;
# seconds leave room for a busy broker.
REPLAY_GRACE_S = 5.0
# Feedback messages waiting for the worker; users send a handful a day, so
# past this the oldest are dropped (deque maxlen), never buffered without end.
FEEDBACK_QUEUE_SIZE = 1000
# Ignored feedback is logged at most this often, with its count.
FEEDBACK_LOG_INTERVAL_S = 10.0
# Retained verdicts of a previous run waiting for the worker to carry them
# over: one per device and kind (five kinds), for the default 10,000
# devices; past it the oldest are dropped (deque maxlen) and stay retained.
RETAINED_QUEUE_SIZE = 50_000
# How often the worker runs its clock-driven duties (probe, broker counter).
TICK_INTERVAL_S = 1.0


def status_topic(prefix: str) -> str:
    """The retained online/offline topic of the sidecar."""
    return f"{prefix}/{STATUS_LEVEL}"


def verdict_topic(prefix: str, device: str) -> str:
    """The topic a device's verdicts are published on."""
    return f"{prefix}/{device_topic_segment(device)}"


def condition_topic(prefix: str, device: str, kind: ConditionKind) -> str:
    """The topic a device's silent/frozen/unavailable/offline verdicts go to."""
    return f"{prefix}/{device_topic_segment(device)}/{kind.value}"


def feedback_topic(prefix: str, device: str) -> str:
    """Where a user marks a device's last alarm as a false positive."""
    return f"{prefix}/{FEEDBACK_LEVEL}/{device_topic_segment(device)}"


def health_topic(prefix: str) -> str:
    """The retained topic of the sidecar's data-path self-checks."""
    return f"{prefix}/{HEALTH_LEVEL}"


def probe_topic(prefix: str) -> str:
    """The topic the start-up probe travels on, out and back."""
    return f"{prefix}/{PROBE_LEVEL}"


def score_topic(prefix: str, device: str) -> str:
    """The topic a device's per-window scores go to when enabled."""
    return f"{prefix}/{SCORES_LEVEL}/{device_topic_segment(device)}"


def build_pipeline(settings: Settings, models: LoadedModels) -> Pipeline:
    """Wire a pipeline from validated settings and loaded models."""
    router = TopicRouter(
        settings.topics, settings.output.prefix, settings.subscribe.exclude
    )
    lifecycle = AlarmLifecycle(models.alarm_after, models.clear_after)
    return Pipeline(
        router,
        models.cascade,
        models.spec,
        lifecycle,
        settings.limits,
        models.versions,
        settings.conditions,
        OverrideTable(settings.overrides),
        FeedbackStore(settings.feedback) if settings.feedback.enabled else None,
    )


class Service:
    """Run the sidecar: MQTT in, bounded queue, batched worker, verdicts out.

    When the queue is full the oldest waiting message is dropped and counted
    as shed, so latency stays bounded and the newest data wins. Every message
    received is accounted for: received = processed + shed + own_output +
    broker_stats + queue_depth, once the worker is between batches.

    The service outlives broker outages: device state stays in the pipeline,
    verdicts raised while disconnected are held in the MQTT client and sent
    after the reconnect (see `sidecar.mqtt`), and per-window scores, which
    are only worth anything live, are skipped meanwhile (counted in
    `scores_skipped`, as are scores the MQTT client refuses).
    """

    def __init__(
        self,
        settings: Settings,
        models: LoadedModels,
        on_verdict: Callable[[Verdict], None] | None = None,
        transport: TransportFactory | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = build_pipeline(settings, models)
        # The bounded queue is a bare deque: appends and pops are atomic under
        # the GIL and never block, where a queue.Queue takes a lock per put and
        # per get that paho's thread and the worker contend for under a flood
        # (`bench --stages throughput`, 2 runs each: sidecar/ceiling 0.143 with
        # queue.Queue, 0.175 with the deque). Only the receiving thread appends
        # and drops, only the worker pops, so every drop is counted.
        self._queue_size = settings.limits.queue_size
        self._pending: collections.deque[Message] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain_deadline = math.inf
        self._on_verdict = on_verdict
        self._shed_at_stop = 0
        self._scores_skipped = 0
        self._feedback_prefix = f"{settings.output.prefix}/{FEEDBACK_LEVEL}/"
        self._feedback: collections.deque[Message] = collections.deque(
            maxlen=FEEDBACK_QUEUE_SIZE
        )
        self._output_level = f"{settings.output.prefix}/"
        self._retained: collections.deque[Message] = collections.deque(
            maxlen=RETAINED_QUEUE_SIZE
        )
        # Raised verdicts and conditions standing now (topic -> payload), and
        # which connection last saw each come back retained: after a
        # reconnect, those the broker no longer holds are published again.
        self._standing: dict[str, bytes] = {}
        # Verdicts the MQTT client refused (its queue was full), newest per
        # topic, sent again on each pass until it takes them: a verdict is
        # never dropped for want of room.
        self._unsent: dict[str, bytes] = {}
        self._feedback_ignored = 0
        self._feedback_logged = -math.inf
        self._last_tick = self._last_check = self._last_stats = 0.0
        self._replayed: dict[str, int] = {}
        self._replays_checked = 1
        self._replay_deadline: float | None = None
        self._sees_output = any(
            filter_matches(topic_filter, f"{settings.output.prefix}/x")
            for topic_filter in settings.subscribe.include
        ) and not any(
            filter_matches(topic_filter, f"{settings.output.prefix}/x")
            for topic_filter in settings.subscribe.exclude
        )
        # Work handed to the worker from other threads (reloads), run between
        # batches so the pipeline is only ever touched by the worker.
        self._requests: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        prefix = settings.output.prefix
        self.health = DataPathHealth(
            health_topic(prefix), probe_topic(prefix), settings.health, self._send
        )
        self.discovery: Discovery | None = None
        if settings.discovery.enabled:
            self.discovery = Discovery(
                settings.discovery, settings.output, settings.conditions, self._send
            )
        self.adapter: Transport = (
            transport(self.enqueue)
            if transport is not None
            else MqttAdapter(
                settings.broker,
                _filters(settings),
                status_topic(settings.output.prefix),
                self.enqueue,
                max_queued=HELD_MESSAGES_LIMIT,
            )
        )
        self._worker = threading.Thread(
            target=self._work, name="sidecar-worker", daemon=True
        )
        self.metrics: MetricsEndpoint | None = None
        if settings.metrics.enabled:
            self.metrics = MetricsEndpoint(
                settings.metrics,
                lambda: self.counters,
                {"rf": models.rf, "cnn": models.cnn},
            )

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of every counter, plus queue depth and devices tracked."""
        snapshot = self.pipeline.counters.as_dict()
        snapshot["shed"] += self._shed_at_stop
        snapshot["scores_skipped"] = self._scores_skipped
        snapshot["queue_depth"] = len(self._pending)
        snapshot["devices_tracked"] = self.pipeline.devices_tracked
        snapshot["devices_in_alarm"] = self.pipeline.lifecycle.alarms
        return snapshot

    def enqueue(self, message: Message) -> None:
        """Put a message on the queue without blocking (paho's thread calls this).

        Call it from one thread only (the transport's receiving thread): a
        full queue drops its oldest message here, and that count is exact
        only with a single producer.

        The sidecar's own output comes back through its `#` subscription; it
        is counted here and never queued, so verdicts and scores can neither
        feed the model nor crowd device traffic out of the queue.
        """
        counters = self.pipeline.counters
        counters.received += 1
        if self.health.on_message(message.topic, message.payload):
            counters.broker_stats += 1
            return
        discovery = self.discovery
        if discovery is not None and discovery.on_message(
            message.topic, message.payload
        ):
            # A discovery config of ours: own output, whatever the rules say.
            counters.own_output += 1
            return
        if self.pipeline.router.is_own_output(message.topic) or (
            message.payload.startswith(OWN_OUTPUT_MARK)
            or message.payload.startswith(OWN_CONFIG_MARK)
        ):
            counters.own_output += 1
            if message.topic.startswith(self._feedback_prefix):
                if len(self._feedback) == FEEDBACK_QUEUE_SIZE:
                    counters.feedback_dropped += 1
                self._feedback.append(message)
            elif message.topic.startswith(self._output_level):
                if message.topic in self._standing:
                    # The broker has it on this connection, retained.
                    self._replayed[message.topic] = self.adapter.connects
                if message.retain:
                    # What a previous run left raised, replayed on subscribe.
                    self._retained.append(message)
            return
        pending = self._pending
        if len(pending) >= self._queue_size:
            # The worker may pop the same message first; then this drops the
            # next one. Either way one message goes and one is counted.
            try:
                pending.popleft()
                counters.shed += 1
            except IndexError:
                pass
        pending.append(message)
        if not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        """Start the worker (and the metrics endpoint), connect to the broker."""
        if self.metrics is not None:
            self.metrics.start()
        self._worker.start()
        self.adapter.start()

    def stop(self, drain_timeout: float = STOP_DRAIN_TIMEOUT_S) -> None:
        """Stop intake, drain and publish what is queued, say offline, disconnect.

        Args:
            drain_timeout: Seconds to keep processing queued messages; what
                is still queued after that is shed and counted.
        """
        self.adapter.stop_intake()
        self._drain_deadline = time.monotonic() + drain_timeout
        self._stop.set()
        self._worker.join(drain_timeout + STOP_BATCH_GRACE_S)
        if self._worker.is_alive():
            _LOG.warning(
                "worker still inside a batch after drain_timeout_s=%.1f; "
                "disconnecting without its verdicts",
                drain_timeout,
            )
        self.adapter.stop()
        if self.metrics is not None:
            self.metrics.stop()
        _LOG.info("stopped %s", _format_counters(self.counters))

    def _work(self) -> None:
        batch_size = self.settings.limits.batch_size
        self._last_tick = self._last_check = self._last_stats = time.monotonic()
        housekeeping = (
            self._run_requests,
            self._apply_feedback,
            self._restore_standing,
            self._retry_unsent,
            self._tick_discovery,
            self._tick_clocks,
        )
        while True:
            if self._stop.is_set() and time.monotonic() >= self._drain_deadline:
                self._shed_queued()
                return
            batch = self._next_batch(batch_size)
            # Alarms a previous run left retained are taken over before the
            # batch: the broker replays them first (`anomalies/...` before
            # device topics), and a replayed `offline` availability handled
            # before its adopted alarm would raise it again, as new.
            self._guarded(self._adopt_retained)
            if batch:
                self._handle(batch)
            elif self._stop.is_set():
                return
            for step in housekeeping:
                self._guarded(step)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # noqa: BLE001 - the worker must outlive any step
            # Each step reads what others send (retained messages, feedback,
            # broker counters); a bug or a hostile input there must not end
            # the worker, which scores everything.
            self.pipeline.counters.worker_errors += 1
            _LOG.exception("worker step failed step=%s", step.__name__)

    def _tick_discovery(self) -> None:
        if self.discovery is not None:
            self.discovery.tick(
                self.adapter.connects,
                self.adapter.connected.is_set(),
                self.pipeline.device_ids,
            )

    def _tick_clocks(self) -> None:
        now = time.monotonic()
        if now - self._last_tick >= TICK_INTERVAL_S:
            self._last_tick = now
            self.health.tick(
                time.time(), self.adapter.connects, self.adapter.subscribed.is_set()
            )
        if now - self._last_check >= self.settings.conditions.check_interval_s:
            self._last_check = now
            self._publish_conditions(self.pipeline.check(time.time()))
        if now - self._last_stats >= STATS_INTERVAL_S:
            self._last_stats = now
            _LOG.info("stats %s", _format_counters(self.counters))

    def reload(self, settings: Settings) -> None:
        """Apply what can change while running; name what needs a restart.

        Overrides (thresholds, alarm and clear counts, mute windows, ignore
        lists), conditions and the log level take effect between two batches;
        broker, subscriptions, output, topics, limits, models and the rest
        are kept as they were, and a warning lists them.
        """
        live = {"overrides", "conditions", "logging"}
        changed = [
            name
            for name in type(settings).model_fields
            if getattr(settings, name) != getattr(self.settings, name)
        ]
        needs_restart = [name for name in changed if name not in live]
        if needs_restart:
            _LOG.warning(
                "config reloaded; these sections need a restart to change: %s",
                ",".join(needs_restart),
            )

        def apply() -> None:
            self.pipeline.apply_overrides(OverrideTable(settings.overrides))
            self.pipeline.conditions = settings.conditions
            self._publish(self.pipeline.clear_unwatched(time.time()))
            logging.getLogger().setLevel(settings.logging.level)
            # What runs now; the next reload is compared with it.
            self.settings = self.settings.model_copy(
                update={name: getattr(settings, name) for name in live}
            )
            _LOG.info(
                "config applied changed=%s overrides=%d",
                ",".join(name for name in changed if name in live) or "nothing",
                len(settings.overrides),
            )

        self._requests.put(apply)

    def swap_models(self, models: LoadedModels) -> None:
        """Serve newly loaded models from the next batch on, without a restart."""
        if self.metrics is not None:
            self.metrics.time_models({"rf": models.rf, "cnn": models.cnn})

        def apply() -> None:
            self.pipeline.swap_models(
                models.cascade,
                models.spec,
                models.versions,
                models.alarm_after,
                models.clear_after,
            )

        self._requests.put(apply)

    def _run_requests(self) -> None:
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                return
            request()

    def _apply_feedback(self) -> None:
        if not self._feedback:
            return
        counters = self.pipeline.counters
        unknown_before = counters.feedback_unknown
        while self._feedback:
            message = self._feedback.popleft()
            segment = message.topic[len(self._feedback_prefix) :]
            word = message.payload.strip().lower()
            if word == RESET:
                self.pipeline.reset_feedback(segment)
            elif word == FALSE_POSITIVE:
                cleared = self.pipeline.mark_false_positive(segment, time.time())
                self._publish(BatchResult(verdicts=cleared))
            else:
                counters.feedback_unknown += 1
        # At most one line per FEEDBACK_LOG_INTERVAL_S, with the count since
        # the last: a flood of junk feedback must not become one of log lines.
        self._feedback_ignored += counters.feedback_unknown - unknown_before
        now = time.monotonic()
        if self._feedback_ignored and now - self._feedback_logged >= (
            FEEDBACK_LOG_INTERVAL_S
        ):
            _LOG.warning(
                "feedback ignored count=%d; publish %s or %s on %s<device level> "
                "of a tracked device",
                self._feedback_ignored,
                FALSE_POSITIVE.decode(),
                RESET.decode(),
                self._feedback_prefix,
            )
            self._feedback_ignored = 0
            self._feedback_logged = now

    def _adopt_retained(self) -> None:
        skip = len(self._output_level)
        while self._retained:
            message = self._retained.popleft()
            level = message.topic[skip:]
            if level.startswith("_"):
                continue
            adopted = self.pipeline.counters.alarms_adopted
            result = self.pipeline.adopt(level, message.payload, message.received_at)
            if self.pipeline.counters.alarms_adopted > adopted and not (
                result.verdicts or result.conditions
            ):
                # Held as if raised by this run, so also restored like one
                # after a broker restart.
                self._standing[message.topic] = message.payload
            self._publish(result)

    def _restore_standing(self) -> None:
        """Publish again the raised verdicts a reconnected broker no longer holds.

        Only when the subscription covers the output prefix: otherwise their
        retained copies cannot be seen coming back, and publishing them again
        after every reconnect would notify users of the same alarms again.
        """
        connects = self.adapter.connects
        if connects <= self._replays_checked or not self._sees_output:
            return
        if not self.adapter.subscribed.is_set():
            self._replay_deadline = None
            return
        now = time.monotonic()
        if self._replay_deadline is None:
            self._replay_deadline = now + REPLAY_GRACE_S
            return
        if now < self._replay_deadline:
            return
        self._replays_checked = connects
        self._replay_deadline = None
        missing = [
            topic for topic in self._standing if self._replayed.get(topic) != connects
        ]
        for topic in missing:
            if not self._send(topic, self._standing[topic], True):
                self._refused(topic, self._standing[topic], "the client refused it")
        if missing:
            _LOG.warning(
                "raised verdicts published again count=%d; the broker came back "
                "without their retained copies (restarted without persistence?)",
                len(missing),
            )

    def _shed_queued(self) -> None:
        shed = 0
        popleft = self._pending.popleft
        while True:
            try:
                popleft()
            except IndexError:
                break
            shed += 1
        if shed:
            self._shed_at_stop += shed
            _LOG.warning("drain deadline reached; queued messages shed count=%d", shed)

    def _next_batch(self, batch_size: int) -> list[Message]:
        pending = self._pending
        if not pending:
            # Cleared before the second look, so an append in between either
            # is seen here or sets the event again.
            self._wake.clear()
            if not pending and not self._wake.wait(IDLE_POLL_S):
                return []
        batch: list[Message] = []
        popleft = pending.popleft
        try:
            for _ in range(min(batch_size, len(pending))):
                batch.append(popleft())
        except IndexError:
            # enqueue dropped the oldest message between len() and popleft().
            pass
        return batch

    def _handle(self, batch: list[Message]) -> None:
        try:
            result = self.pipeline.process(batch)
        except Exception:  # noqa: BLE001 - the worker must outlive any one batch
            # A bug must not kill the worker: the batch is counted and logged
            # with its traceback, and the next one is processed.
            self.pipeline.counters.worker_errors += 1
            _LOG.exception("batch failed size=%d", len(batch))
            return
        self._publish(result)

    def _publish(self, result: BatchResult) -> None:
        output = self.settings.output
        for verdict in result.verdicts:
            topic = verdict_topic(output.prefix, verdict.device)
            payload = verdict.to_json()
            self._note_standing(topic, payload, verdict.state)
            outcome = self.adapter.publish(topic, payload, output.qos, retain=True)
            if not outcome.accepted:
                self._refused(topic, payload, outcome.error)
            elif outcome.held:
                _LOG.info("verdict held until the broker is back topic=%s", topic)
            _LOG.info(
                "verdict device=%r state=%s score=%.3f reason=%r",
                verdict.device,
                verdict.state.value,
                verdict.score,
                verdict.reason(),
            )
            if self._on_verdict is not None:
                self._on_verdict(verdict)
        self._publish_conditions(result.conditions)
        if self.discovery is not None:
            self.discovery.reconcile(result.devices_changed, self.pipeline.tracks)
        if output.publish_scores and not self.adapter.connected.is_set():
            self._scores_skipped += len(result.scores)
        elif output.publish_scores:
            for score in result.scores:
                outcome = self.adapter.publish(
                    score_topic(output.prefix, score.device),
                    _score_json(score),
                    output.qos,
                )
                if not outcome.accepted:
                    self._scores_skipped += 1

    def _publish_conditions(self, found: Sequence[ConditionVerdict]) -> None:
        prefix = self.settings.output.prefix
        for item in found:
            topic = condition_topic(prefix, item.device, item.kind)
            payload = item.to_json()
            self._note_standing(topic, payload, item.state)
            if not self._send(topic, payload, True):
                self._refused(topic, payload, "the client refused it")
            _LOG.info(
                "condition device=%r kind=%s state=%s reason=%r",
                item.device,
                item.kind.value,
                item.state.value,
                item.reason(),
            )

    def _refused(self, topic: str, payload: bytes, error: str | None) -> None:
        self.pipeline.counters.publish_failures += 1
        self._unsent[topic] = payload
        _LOG.warning(
            "verdict not published yet topic=%s error=%s; sent again when the "
            "client takes it",
            topic,
            error,
        )

    def _retry_unsent(self) -> None:
        while self._unsent:
            topic, payload = next(iter(self._unsent.items()))
            if not self._send(topic, payload, True):
                return
            del self._unsent[topic]
            _LOG.info("verdict published after a refusal topic=%s", topic)

    def _note_standing(self, topic: str, payload: bytes, state: Transition) -> None:
        # A newer verdict for a topic replaces one still waiting to be sent.
        self._unsent.pop(topic, None)
        if state is Transition.RAISED:
            self._standing[topic] = payload
        else:
            self._standing.pop(topic, None)
            self._replayed.pop(topic, None)

    def _send(self, topic: str, payload: bytes, retain: bool) -> bool:
        """Publish at the output QoS; return whether the client took it."""
        outcome = self.adapter.publish(
            topic, payload, self.settings.output.qos, retain=retain
        )
        return outcome.accepted


def _filters(settings: Settings) -> list[str]:
    """The configured filters plus what the self-checks need and they miss.

    `#` does not match `$SYS` topics (MQTT 3.1.1 section 4.7.2), so the
    broker's drop counter is always subscribed by name; the probe (and Home
    Assistant's status topic, for discovery) only when no configured filter
    covers it, to avoid a second copy of each message.
    """
    filters = list(settings.subscribe.include)
    prefix = settings.output.prefix
    wanted = []
    if settings.health.probe_timeout_s > 0:
        wanted.append(probe_topic(prefix))
    if settings.health.broker_dropped_topic:
        wanted.append(settings.health.broker_dropped_topic)
    if settings.discovery.enabled:
        wanted.append(settings.discovery.status_topic)
    if settings.feedback.enabled:
        wanted.append(f"{prefix}/{FEEDBACK_LEVEL}/+")
    for topic in wanted:
        if not any(filter_matches(item, topic) for item in filters):
            filters.append(topic)
    return filters


def _score_json(score: WindowScore) -> bytes:
    document = {
        "origin": ORIGIN,
        "device": score.device,
        "seq": score.seq,
        "rf": round(score.rf, 6),
        "cnn": None if math.isnan(score.cnn) else round(score.cnn, 6),
        "fused": round(score.fused, 6),
        "confirmed": score.confirmed,
        "in_alarm": score.in_alarm,
        "learning": score.learning,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def _format_counters(counters: dict[str, int]) -> str:
    return " ".join(f"{name}={value}" for name, value in counters.items())
