"""Messages in, verdicts out: routing, windows, the cascade and the lifecycle.

The live worker and the in-process evaluation both drive this class, so what
is measured offline is what runs beside the broker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, TypeVar

import numpy as np

from sidecar.calibration import DeviceCalibration
from sidecar.conditions import (
    ConditionKind,
    ConditionVerdict,
    DeviceWatch,
    KeyState,
    availability_state,
)
from sidecar.config import ConditionSettings, LimitSettings
from sidecar.detector import Cascade, RowLimits
from sidecar.features import (
    DeviceState,
    FeatureSpec,
    WindowSnapshot,
    batch_features,
)
from sidecar.overrides import NO_RULES, DeviceRules, FeedbackStore, OverrideTable
from sidecar.payload import PayloadKind, Readings, parse_payload
from sidecar.stream import Message
from sidecar.topics import Route, RouteKind, TopicRouter, device_topic_segment
from sidecar.verdicts import OWN_OUTPUT_MARK, AlarmLifecycle, Transition, Verdict

__all__ = ["BatchResult", "Counters", "Pipeline", "WindowScore"]

_LOG = logging.getLogger(__name__)
# How many of the furthest-off keys a verdict names.
EVIDENCE_KEYS = 3
# Levels below the output prefix of a verdict a run can carry over:
# `<device>` (the models' verdict) and `<device>/<kind>` (a condition).
ADOPTED_LEVELS = 2


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
    ignored_by_override: int = 0
    verdicts_muted: int = 0
    feedback_marks: int = 0
    # Feedback for a topic level no tracked device has, or in words other
    # than false_positive and reset; counted, and logged every 10 s at most.
    feedback_unknown: int = 0
    # Feedback dropped because more than service.FEEDBACK_QUEUE_SIZE waited.
    feedback_dropped: int = 0
    alarms_adopted: int = 0
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
    # Devices that started or stopped being tracked (new, or evicted).
    devices_changed: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Tracked:
    state: DeviceState
    calibration: DeviceCalibration
    watch: DeviceWatch = field(default_factory=DeviceWatch)
    rules: DeviceRules = NO_RULES
    topic: str = ""
    seq: int = -1
    # Whether `topic` is a telemetry topic yet: a device first seen through
    # its availability (zigbee2mqtt's retained `.../availability`) takes its
    # first telemetry topic instead, for topic overrides and verdicts.
    telemetry: bool = False


_AnyVerdict = TypeVar("_AnyVerdict", Verdict, ConditionVerdict)


def _verdict_time(item: Verdict | ConditionVerdict) -> float:
    return item.received_at if isinstance(item, Verdict) else item.at


def _or(value: float | None, default: float) -> float:
    return default if value is None else value


def channel_readings(payload: bytes, channel: str, max_bytes: int) -> Readings:
    """Parse a payload the way the pipeline does for a topic's channel.

    A scalar payload is read under the channel's name; JSON keys are prefixed
    with it, so a device publishing on several topics (Tasmota `STATE` and
    `SENSOR`) keeps them apart. Training replays streams through this too.

    >>> channel_readings(b'{"Power": 12}', "SENSOR", 65536).values
    {'SENSOR.Power': 12.0}
    """
    readings = parse_payload(payload, key=channel or "value", max_bytes=max_bytes)
    if channel and readings.kind is PayloadKind.JSON:
        readings = Readings(
            readings.kind,
            {f"{channel}.{key}": value for key, value in readings.values.items()},
            frozenset(f"{channel}.{key}" for key in readings.missing),
            readings.dropped_keys,
        )
    return readings


def _own_verdict(payload: bytes, max_bytes: int) -> dict[str, Any] | None:
    """A raised verdict of ours as a mapping, or None for anything else."""
    if len(payload) > max_bytes or not payload.startswith(OWN_OUTPUT_MARK):
        # Only what this sidecar wrote (it opens with its origin) is taken
        # over: anyone may leave a retained message under the prefix.
        return None
    try:
        document = json.loads(payload)
    except ValueError:
        return None
    if (
        not isinstance(document, dict)
        or not isinstance(document.get("device"), str)
        or document.get("state") != Transition.RAISED.value
    ):
        return None
    return document


def _timestamp(text: Any) -> float:
    """Unix seconds of a verdict's ISO 8601 time."""
    return datetime.fromisoformat(str(text)).timestamp()


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
        overrides: OverrideTable | None = None,
        feedback: FeedbackStore | None = None,
    ) -> None:
        self.router = router
        self.cascade = cascade
        self.spec = spec
        self.lifecycle = lifecycle
        self.limits = limits
        self.model_versions = model_versions
        self.conditions = conditions if conditions is not None else ConditionSettings()
        self.overrides = overrides if overrides is not None else OverrideTable([])
        self.feedback = feedback
        # Conditions and eviction clears found while ingesting, handed out by
        # the next `process` result.
        self._conditions: list[ConditionVerdict] = []
        self._evicted: list[Verdict] = []
        self._devices_changed: list[str] = []
        self.counters = Counters()
        self._device_spec = dataclasses.replace(
            spec, max_keys=limits.max_keys_per_device
        )
        self._devices: OrderedDict[str, _Tracked] = OrderedDict()
        # Verdict topic level -> device id, for feedback; rebuilt on the first
        # look after the tracked devices changed.
        self._segments: dict[str, str] | None = None

    @property
    def devices_tracked(self) -> int:
        """How many devices currently have state."""
        return len(self._devices)

    def tracks(self, device: str) -> bool:
        """Return whether a device currently has state and is not ignored."""
        tracked = self._devices.get(device)
        return tracked is not None and not tracked.rules.ignore

    def device_ids(self) -> list[str]:
        """The devices that currently have state, least recently seen first."""
        return list(self._devices)

    def process(self, batch: Sequence[Message]) -> BatchResult:
        """Route, parse and window every message, then score the ready windows."""
        pending: list[tuple[str, int, Message, DeviceState]] = []
        rules: list[DeviceRules] = []
        calibrations = []
        # Each message's window is captured as it arrives; all are computed
        # together once the batch is ingested.
        snapshots: list[WindowSnapshot] = []
        for message in batch:
            self.counters.processed += 1
            ready = self._ingest(message)
            if ready is None:
                continue
            device, tracked = ready
            snapshots.append(tracked.state.snapshot())
            pending.append((device, tracked.seq, message, tracked.state))
            rules.append(tracked.rules)
            calibrations.append(tracked.calibration)

        result = BatchResult(
            verdicts=self._unmuted(self._evicted),
            conditions=self._unmuted(self._conditions),
            devices_changed=self._devices_changed,
        )
        self._evicted = []
        self._devices_changed = []
        self._conditions = []
        self._count_conditions(result.conditions)
        if not pending:
            return result
        limits = self._limits([item[0] for item in pending], rules)
        vectors, windows = batch_features(snapshots)
        del snapshots
        for _, _, _, state in pending:
            state.release()
        scores = self.cascade.score(vectors, windows, calibrations, limits)
        self.counters.windows_scored += len(pending)
        self.counters.cnn_runs += int(np.count_nonzero(~np.isnan(scores.cnn)))
        self.counters.calibrating += int(np.count_nonzero(scores.learning))
        for row, (device, seq, message, state) in enumerate(pending):
            confirmed = bool(scores.confirmed[row])
            learning = bool(scores.learning[row])
            own = rules[row]
            transition = (
                None
                if learning
                else self.lifecycle.step(
                    device, confirmed, own.alarm_after, own.clear_after
                )
            )
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
            # Only raises are muted (see _unmuted).
            if transition is Transition.RAISED and own.muted(message.received_at):
                self.counters.verdicts_muted += 1
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
        tracked = self._tracked(route.device, message.received_at, message.topic)
        if not tracked.telemetry:
            tracked.telemetry = True
            if tracked.topic != message.topic:
                tracked.topic = message.topic
                if self.overrides:
                    tracked.rules = self.overrides.resolve(route.device, message.topic)
                self._devices_changed.append(route.device)
        if tracked.rules.ignore:
            self.counters.ignored_by_override += 1
            return None
        readings = self._parse(message, route)
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
        readings = channel_readings(
            message.payload, route.channel, self.limits.max_payload_bytes
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

    def _tracked(self, device: str, at: float, topic: str) -> _Tracked:
        tracked = self._devices.get(device)
        if tracked is not None:
            self._devices.move_to_end(device)
            return tracked
        if len(self._devices) >= self.limits.max_devices:
            evicted, old = self._devices.popitem(last=False)
            self._clear_evicted(evicted, old, at)
            self._devices_changed.append(evicted)
            self._segments = None
            self.lifecycle.forget(evicted)
            self.counters.devices_evicted += 1
            _LOG.debug("device evicted device=%r", evicted)
        tracked = _Tracked(DeviceState(self._device_spec), self.cascade.new_device())
        self._devices_changed.append(device)
        self._segments = None
        tracked.topic = topic
        if self.overrides:
            tracked.rules = self.overrides.resolve(device, topic)
        self._devices[device] = tracked
        return tracked

    def check(self, now: float) -> list[ConditionVerdict]:
        """Judge what only the clock shows (silence, long unavailability)."""
        found = []
        for device, tracked in self._devices.items():
            if not tracked.rules.ignore:
                found.extend(tracked.watch.check(device, now, self.conditions))
        found = self._unmuted(found)
        self._count_conditions(found)
        return found

    def swap_models(
        self,
        cascade: Cascade,
        spec: FeatureSpec,
        versions: dict[str, str],
        alarm_after: int,
        clear_after: int,
    ) -> None:
        """Serve new models from the next batch on.

        Per-device score calibration belongs to the old models and is learned
        again. Windows and baselines are kept when the feature spec is the
        same; otherwise every device warms up again. Alarm states are kept.
        """
        self.cascade = cascade
        self.model_versions = versions
        self.lifecycle.alarm_after = alarm_after
        self.lifecycle.clear_after = clear_after
        same_features = spec == self.spec
        if not same_features:
            self.spec = spec
            self._device_spec = dataclasses.replace(
                spec, max_keys=self.limits.max_keys_per_device
            )
        for tracked in self._devices.values():
            tracked.calibration = cascade.new_device()
            if not same_features:
                tracked.state = DeviceState(self._device_spec)
        _LOG.info(
            "models swapped versions=%s devices=%d windows_kept=%s",
            versions,
            len(self._devices),
            same_features,
        )

    def apply_overrides(self, overrides: OverrideTable) -> None:
        """Use new override rules from now on, for known devices too."""
        self.overrides = overrides
        for device, tracked in self._devices.items():
            tracked.rules = overrides.resolve(device, tracked.topic)

    def clear_unwatched(self, at: float) -> BatchResult:
        """Clear what a reload stopped watching: ignored devices, conditions off.

        A restart clears them while taking over the previous run's alarms;
        a live reload must not leave them standing either.
        """
        result = BatchResult()
        for device, tracked in self._devices.items():
            ignored = tracked.rules.ignore
            if ignored and self.lifecycle.in_alarm(device):
                self.lifecycle.forget(device)
                self.counters.verdicts_cleared += 1
                note = "no longer watched: ignored by an override"
                result.verdicts.append(self._note_verdict(device, tracked, at, note))
            for kind in tracked.watch.raised():
                if ignored or not getattr(self.conditions, kind.value).enabled:
                    why = (
                        "no longer watched: ignored by an override"
                        if ignored
                        else f"{kind.value} no longer watched"
                    )
                    change = tracked.watch.drop(device, kind, at, why)
                    if change is not None:
                        result.conditions.append(change)
        self._count_conditions(result.conditions)
        return result

    def device_for_segment(self, segment: str) -> str | None:
        """The tracked device whose verdict topic level is `segment`, if any."""
        if self._segments is None:
            self._segments = {
                device_topic_segment(name): name for name in self._devices
            }
        return self._segments.get(segment)

    def mark_false_positive(self, segment: str, at: float) -> list[Verdict]:
        """Apply a user's false-positive mark to the device behind a topic level.

        The device's fused threshold goes up a step (remembered in the
        feedback file) and, if it is in alarm, the alarm is cleared.
        """
        if self.feedback is None:
            return []
        device = self.device_for_segment(segment)
        if device is None:
            self.counters.feedback_unknown += 1
            return []
        marks = self.feedback.mark(device)
        self.counters.feedback_marks += 1
        tracked = self._devices[device]
        base = tracked.rules.fused_threshold
        if base is None:
            base = self.cascade.fused_threshold.value
        threshold = self.feedback.raise_threshold(device, base)
        _LOG.info(
            "false positive marked device=%r marks=%d fused_threshold=%.3f",
            device,
            marks,
            threshold,
        )
        if not self.lifecycle.in_alarm(device):
            return []
        self.lifecycle.forget(device)
        self.counters.verdicts_cleared += 1
        return [
            self._note_verdict(
                device,
                tracked,
                at,
                f"marked false positive by a user ({marks} so far); its fused "
                f"threshold is now {threshold:.2f}",
            )
        ]

    def reset_feedback(self, segment: str) -> None:
        """Take back every false-positive mark of the device behind a topic level.

        Its fused threshold is the configured one again from its next window.
        Marks of a device not tracked now are kept (its id is not known from
        the topic level alone, which is made safe for MQTT).
        """
        if self.feedback is None:
            return
        device = self.device_for_segment(segment)
        if device is None:
            self.counters.feedback_unknown += 1
            return
        marks = self.feedback.reset(device)
        _LOG.info("false positive marks reset device=%r marks=%d", device, marks)

    def adopt(self, level: str, payload: bytes, at: float) -> BatchResult:
        """Take over an alarm a previous run left retained under the prefix.

        `level` is the topic below the output prefix (`<device>` for a model
        verdict, `<device>/<kind>` for a condition) and `payload` the
        retained verdict. A raised one is held as if this run had raised it,
        so it is cleared as usual; where this run already knows better (the
        device is ignored now, the condition is switched off, or it has
        already recovered) the result clears it at once. Anything else (a
        cleared verdict, a payload that is not ours) is passed over.
        """
        parts = level.split("/")
        document = _own_verdict(payload, self.limits.max_payload_bytes)
        if document is None or len(parts) > ADOPTED_LEVELS:
            return BatchResult()
        device = document["device"]
        if device_topic_segment(device) != parts[0]:
            return BatchResult()
        tracked = self._tracked(device, at, str(document.get("topic") or ""))
        result = BatchResult(devices_changed=self._devices_changed)
        self._devices_changed = []
        if len(parts) == 1 and self.lifecycle.in_alarm(device):
            # Raised by this run; the broker replays it after a reconnect.
            return result
        if len(parts) == 1:
            self.counters.alarms_adopted += 1
            if tracked.rules.ignore:
                note = "no longer watched: ignored by an override"
                result.verdicts.append(self._note_verdict(device, tracked, at, note))
                self.counters.verdicts_cleared += 1
            else:
                self.lifecycle.adopt(device)
            _LOG.info("alarm carried over device=%r kind=model", device)
            return result
        try:
            kind = ConditionKind(parts[1])
            since = _timestamp(document["since"])
            keys = [
                KeyState(
                    str(item["key"]),
                    _timestamp(item["since"]),
                    int(item["messages"]),
                    math.nan if item.get("value") is None else float(item["value"]),
                )
                for item in document.get("keys", [])
            ]
        except (KeyError, TypeError, ValueError, OverflowError):
            return result
        if kind in tracked.watch.raised():
            return result
        self.counters.alarms_adopted += 1
        watched = getattr(self.conditions, kind.value).enabled
        change = (
            tracked.watch.adopt(device, kind, since, keys, at)
            if watched and not tracked.rules.ignore
            else ConditionVerdict(
                device,
                kind,
                Transition.CLEARED,
                at,
                since,
                detail=f"{kind.value} no longer watched",
            )
        )
        if change is not None:
            result.conditions.append(change)
        self._count_conditions(result.conditions)
        _LOG.info(
            "alarm carried over device=%r kind=%s cleared=%s",
            device,
            kind.value,
            change is not None,
        )
        return result

    def _limits(
        self, devices: Sequence[str], rules: Sequence[DeviceRules]
    ) -> RowLimits | None:
        """Per-row thresholds where overrides or feedback change them; else None."""
        feedback = self.feedback
        if not any(item.changes_thresholds for item in rules) and (
            feedback is None or not any(feedback.marks(d) for d in devices)
        ):
            return None
        cascade = self.cascade
        rf = []
        cnn = []
        fused = []
        for device, item in zip(devices, rules, strict=True):
            rf.append(_or(item.rf_threshold, cascade.rf_threshold.value))
            cnn.append(_or(item.cnn_threshold, cascade.cnn_threshold.value))
            base = _or(item.fused_threshold, cascade.fused_threshold.value)
            if feedback is not None:
                base = feedback.raise_threshold(device, base)
            fused.append(base)
        return RowLimits(np.array(rf), np.array(cnn), np.array(fused))

    def _unmuted(self, found: list[_AnyVerdict]) -> list[_AnyVerdict]:
        if not self.overrides:
            return found
        kept = []
        for item in found:
            tracked = self._devices.get(item.device)
            rules = tracked.rules if tracked is not None else NO_RULES
            # Only raises are muted: a clear swallowed by a mute window would
            # leave the alarm standing in Home Assistant until the next one.
            if item.state is Transition.RAISED and rules.muted(_verdict_time(item)):
                self.counters.verdicts_muted += 1
            else:
                kept.append(item)
        return kept

    def _note_verdict(
        self, device: str, tracked: _Tracked, at: float, note: str
    ) -> Verdict:
        return Verdict(
            device=device,
            state=Transition.CLEARED,
            score=math.nan,
            rf_score=math.nan,
            cnn_score=math.nan,
            topic=self.router.public_topic(tracked.topic) if tracked.topic else "",
            received_at=at,
            seq=tracked.seq,
            models=self.model_versions,
            evidence=(),
            typical_gap_s=math.nan,
            last_gap_s=math.nan,
            note=note,
        )

    def _announce(self, route: Route, message: Message) -> None:
        if not self.conditions.offline.enabled:
            return
        online = availability_state(message.payload)
        if online is None:
            return
        tracked = self._tracked(route.device, message.received_at, message.topic)
        change = tracked.watch.announce(
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
            self._evicted.append(self._note_verdict(device, old, now, note))
        for kind in old.watch.raised():
            # Cleared with the time the condition began, so its duration holds.
            cleared = old.watch.drop(device, kind, now, note)
            if cleared is not None:
                self._conditions.append(cleared)
