"""Messages in, verdicts out: routing, windows, the cascade and the lifecycle.

The live worker and the in-process evaluation both drive this class, so what
is measured offline is what runs beside the broker.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from sidecar.calibration import DeviceCalibration
from sidecar.conditions import ConditionVerdict, DeviceWatch, availability_state
from sidecar.config import ConditionSettings, LimitSettings
from sidecar.detector import Cascade
from sidecar.features import DeviceState, FeatureSpec
from sidecar.payload import PayloadKind, Readings, parse_payload
from sidecar.stream import Message
from sidecar.topics import Route, RouteKind, TopicRouter
from sidecar.verdicts import AlarmLifecycle, Transition, Verdict

__all__ = ["BatchResult", "Counters", "Pipeline", "WindowScore"]

_LOG = logging.getLogger(__name__)
# How many of the furthest-off keys a verdict names.
EVIDENCE_KEYS = 3


@dataclass
class Counters:
    """Everything counted on the way; nothing is skipped without a count."""

    received: int = 0
    shed: int = 0
    processed: int = 0
    own_output: int = 0
    broker_stats: int = 0
    ignored: int = 0
    unknown_topic: int = 0
    availability: int = 0
    empty: int = 0
    text: int = 0
    missing: int = 0
    unparsable: int = 0
    binary: int = 0
    oversized: int = 0
    warming: int = 0
    retained_replays: int = 0
    calibrating: int = 0
    windows_scored: int = 0
    cnn_runs: int = 0
    devices_evicted: int = 0
    keys_dropped: int = 0
    verdicts_raised: int = 0
    verdicts_cleared: int = 0
    conditions_raised: int = 0
    conditions_cleared: int = 0
    publish_failures: int = 0
    worker_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain mapping."""
        return {item.name: getattr(self, item.name) for item in fields(self)}


@dataclass(frozen=True, slots=True)
class WindowScore:
    """The cascade's view of one scored window."""

    device: str
    seq: int
    topic: str
    received_at: float
    rf: float
    cnn: float
    fused: float
    confirmed: bool
    in_alarm: bool
    learning: bool = False


@dataclass
class BatchResult:
    """What one batch produced: state changes and every window's scores."""

    verdicts: list[Verdict] = field(default_factory=list)
    scores: list[WindowScore] = field(default_factory=list)
    conditions: list[ConditionVerdict] = field(default_factory=list)


@dataclass(slots=True)
class _Tracked:
    state: DeviceState
    calibration: DeviceCalibration
    watch: DeviceWatch = field(default_factory=DeviceWatch)
    seq: int = -1


_PAYLOAD_COUNTERS = {
    PayloadKind.EMPTY: "empty",
    PayloadKind.TEXT: "text",
    PayloadKind.MISSING: "missing",
    PayloadKind.UNPARSABLE: "unparsable",
    PayloadKind.BINARY: "binary",
    PayloadKind.OVERSIZED: "oversized",
}


class Pipeline:
    """Turn batches of messages into verdicts, keeping per-device state.

    Device state is bounded: past `limits.max_devices`, the device seen least
    recently is evicted and counted; whatever it had raised is cleared with a
    verdict that says why, so no retained alarm outlives its device's state.

    Beside the models, each device's rule-based conditions (silent, frozen,
    unavailable, offline; `sidecar.conditions`) are judged on every message
    and, for what only time shows, by `check`.
    """

    def __init__(
        self,
        router: TopicRouter,
        cascade: Cascade,
        spec: FeatureSpec,
        lifecycle: AlarmLifecycle,
        limits: LimitSettings,
        model_versions: dict[str, str],
        conditions: ConditionSettings | None = None,
    ) -> None:
        self.router = router
        self.cascade = cascade
        self.spec = spec
        self.lifecycle = lifecycle
        self.limits = limits
        self.model_versions = model_versions
        self.conditions = conditions if conditions is not None else ConditionSettings()
        # Conditions and eviction clears found while ingesting, handed out by
        # the next `process` result.
        self._conditions: list[ConditionVerdict] = []
        self._evicted: list[Verdict] = []
        self.counters = Counters()
        self._device_spec = dataclasses.replace(
            spec, max_keys=limits.max_keys_per_device
        )
        self._devices: OrderedDict[str, _Tracked] = OrderedDict()

    @property
    def devices_tracked(self) -> int:
        """How many devices currently have state."""
        return len(self._devices)

    def process(self, batch: Sequence[Message]) -> BatchResult:
        """Route, parse and window every message, then score the ready windows."""
        pending: list[tuple[str, int, Message, DeviceState]] = []
        calibrations = []
        vectors = []
        windows = []
        for message in batch:
            self.counters.processed += 1
            ready = self._ingest(message)
            if ready is None:
                continue
            device, tracked = ready
            features = tracked.state.features()
            pending.append((device, tracked.seq, message, tracked.state))
            calibrations.append(tracked.calibration)
            vectors.append(features.vector)
            windows.append(features.window)

        result = BatchResult(verdicts=self._evicted, conditions=self._conditions)
        self._evicted = []
        self._conditions = []
        self._count_conditions(result.conditions)
        if not pending:
            return result
        scores = self.cascade.score(np.stack(vectors), np.stack(windows), calibrations)
        self.counters.windows_scored += len(pending)
        self.counters.cnn_runs += int(np.count_nonzero(~np.isnan(scores.cnn)))
        self.counters.calibrating += int(np.count_nonzero(scores.learning))
        for row, (device, seq, message, state) in enumerate(pending):
            confirmed = bool(scores.confirmed[row])
            learning = bool(scores.learning[row])
            transition = None if learning else self.lifecycle.step(device, confirmed)
            rf = float(scores.rf[row])
            cnn = float(scores.cnn[row])
            fused = float(scores.fused[row])
            result.scores.append(
                WindowScore(
                    device,
                    seq,
                    message.topic,
                    message.received_at,
                    rf,
                    cnn,
                    fused,
                    confirmed,
                    self.lifecycle.in_alarm(device),
                    learning,
                )
            )
            if transition is None:
                continue
            if transition is Transition.RAISED:
                self.counters.verdicts_raised += 1
            else:
                self.counters.verdicts_cleared += 1
            last_gap, typical_gap = state.cadence()
            result.verdicts.append(
                Verdict(
                    device=device,
                    state=transition,
                    score=fused,
                    rf_score=rf,
                    cnn_score=cnn,
                    topic=self.router.public_topic(message.topic),
                    received_at=message.received_at,
                    seq=seq,
                    models=self.model_versions,
                    evidence=tuple(state.deviations(EVIDENCE_KEYS)),
                    typical_gap_s=typical_gap,
                    last_gap_s=last_gap if math.isfinite(last_gap) else math.nan,
                )
            )
        return result

    def _ingest(self, message: Message) -> tuple[str, _Tracked] | None:
        route = self.router.route(message.topic)
        if route.kind is RouteKind.AVAILABILITY:
            self.counters.availability += 1
            self._announce(route, message)
            return None
        if route.kind is not RouteKind.TELEMETRY:
            self._count_route(route.kind)
            return None

        if message.retain and route.device in self._devices:
            # A retained message for a device already tracked is the broker
            # replaying history after a (re)subscribe (payloads.md rule 6):
            # scoring it again would add a stale reading to the window.
            self.counters.retained_replays += 1
            return None
        readings = self._parse(message, route)
        tracked = self._tracked(route.device, message.received_at)
        before = tracked.state.dropped_keys
        tracked.state.update(readings, len(message.payload), message.received_at)
        self._conditions.extend(
            tracked.watch.observe(
                route.device,
                readings,
                message.received_at,
                self.conditions,
                default_key=route.channel or "value",
                max_keys=self.limits.max_keys_per_device,
            )
        )
        self.counters.keys_dropped += tracked.state.dropped_keys - before
        tracked.seq += 1
        if not tracked.state.ready:
            self.counters.warming += 1
            return None
        return route.device, tracked

    def _parse(self, message: Message, route: Route) -> Readings:
        channel = route.channel
        readings = parse_payload(
            message.payload,
            key=channel or "value",
            max_bytes=self.limits.max_payload_bytes,
        )
        counter = _PAYLOAD_COUNTERS.get(readings.kind)
        if counter is not None:
            setattr(self.counters, counter, getattr(self.counters, counter) + 1)
            _LOG.debug(
                "payload kind=%s topic=%r size=%d",
                readings.kind.value,
                route.public_topic or message.topic,
                len(message.payload),
            )
        if channel and readings.kind is PayloadKind.JSON:
            readings = Readings(
                readings.kind,
                {f"{channel}.{key}": value for key, value in readings.values.items()},
                frozenset(f"{channel}.{key}" for key in readings.missing),
                readings.dropped_keys,
            )
        return readings

    def _count_route(self, kind: RouteKind) -> None:
        if kind is RouteKind.OWN_OUTPUT:
            self.counters.own_output += 1
        elif kind is RouteKind.IGNORE:
            self.counters.ignored += 1
        elif kind is RouteKind.AVAILABILITY:
            self.counters.availability += 1
        else:
            self.counters.unknown_topic += 1

    def _tracked(self, device: str, at: float) -> _Tracked:
        tracked = self._devices.get(device)
        if tracked is not None:
            self._devices.move_to_end(device)
            return tracked
        if len(self._devices) >= self.limits.max_devices:
            evicted, old = self._devices.popitem(last=False)
            self._clear_evicted(evicted, old, at)
            self.lifecycle.forget(evicted)
            self.counters.devices_evicted += 1
            _LOG.debug("device evicted device=%r", evicted)
        tracked = _Tracked(DeviceState(self._device_spec), self.cascade.new_device())
        self._devices[device] = tracked
        return tracked

    def check(self, now: float) -> list[ConditionVerdict]:
        """Judge what only the clock shows (silence, long unavailability)."""
        found = []
        for device, tracked in self._devices.items():
            found.extend(tracked.watch.check(device, now, self.conditions))
        self._count_conditions(found)
        return found

    def _announce(self, route: Route, message: Message) -> None:
        if not self.conditions.offline.enabled:
            return
        online = availability_state(message.payload)
        if online is None:
            return
        change = self._tracked(route.device, message.received_at).watch.announce(
            route.device,
            online,
            message.received_at,
            route.public_topic or message.topic,
        )
        if change is not None:
            self._conditions.append(change)

    def _count_conditions(self, found: Sequence[ConditionVerdict]) -> None:
        for item in found:
            if item.state is Transition.RAISED:
                self.counters.conditions_raised += 1
            else:
                self.counters.conditions_cleared += 1

    def _clear_evicted(self, device: str, old: _Tracked, now: float) -> None:
        """Clear, with a reason, whatever an evicted device had raised."""
        note = (
            f"no longer tracked: more than limits.max_devices="
            f"{self.limits.max_devices} devices; it was seen least recently"
        )
        if self.lifecycle.in_alarm(device):
            self.counters.verdicts_cleared += 1
            self._evicted.append(
                Verdict(
                    device=device,
                    state=Transition.CLEARED,
                    score=math.nan,
                    rf_score=math.nan,
                    cnn_score=math.nan,
                    topic="",
                    received_at=now,
                    seq=old.seq,
                    models=self.model_versions,
                    evidence=(),
                    typical_gap_s=math.nan,
                    last_gap_s=math.nan,
                    note=note,
                )
            )
        for kind in old.watch.raised():
            self._conditions.append(
                ConditionVerdict(
                    device, kind, Transition.CLEARED, now, now, detail=note
                )
            )
