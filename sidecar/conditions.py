"""Rule-based device conditions the models cannot see: silent, frozen, unavailable.

The models judge the shape of a window of readings. Some failures leave no
window to judge: a freezer sensor whose battery died sends nothing, a Zigbee
thermometer whose temperature froze keeps sending the same number, a Home
Assistant sensor reports `unavailable` for hours, a bridge announces the
device offline. Each of these is a first-class condition here, judged
against the device's own learned rhythm and history, raised once and cleared
when the evidence goes away.

Shortcomings, named: silence is judged from messages alone, so a device that
only ever published once is never judged (it has no rhythm yet); a frozen key
is judged on exact repetition of a value, so a sensor that freezes while
adding noise is left to the models; a value the key has rested at before (the
value of its longest earlier run, such as a plug's 0 W when switched off) is
never called frozen.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sidecar.config import ConditionSettings
from sidecar.payload import PayloadKind, Readings
from sidecar.verdicts import ORIGIN, Transition

__all__ = [
    "ConditionKind",
    "ConditionVerdict",
    "DeviceWatch",
    "KeyState",
    "availability_state",
]

# A device's peak gap decays by this factor per message so that one long gap
# (a restart, a moved device) stops setting the expectation after about a
# hundred messages (0.98 ** 100 = 0.13).
PEAK_GAP_DECAY = 0.98
# Verdict numbers need no more digits than this.
DIGITS = 3
# Availability payloads, lower-cased: zigbee2mqtt (`online`/`offline`, or JSON
# {"state": ...}), Tasmota LWT (`Online`/`Offline`), Shelly Gen1 `online`
# (`true`/`false`), ESPHome `<node>/status` (`online`/`offline`); payloads.md
# sections 1, 2, 4 and 5.
OFFLINE_WORDS = frozenset({"offline", "false", "0", "disconnected"})
ONLINE_WORDS = frozenset({"online", "true", "1", "connected"})
# Longest availability payload worth decoding; longer ones are not a state.
MAX_AVAILABILITY_BYTES = 256


class ConditionKind(enum.StrEnum):
    """Which condition a verdict is about; also the last level of its topic."""

    SILENT = "silent"
    FROZEN = "frozen"
    UNAVAILABLE = "unavailable"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class KeyState:
    """One key taking part in a frozen or unavailable condition."""

    key: str
    since: float
    messages: int
    value: float = math.nan


@dataclass(frozen=True, slots=True)
class ConditionVerdict:
    """A raised or cleared condition of one device, with its reason."""

    device: str
    kind: ConditionKind
    state: Transition
    at: float
    since: float
    expected_s: float = math.nan
    keys: tuple[KeyState, ...] = ()
    detail: str = ""

    def reason(self) -> str:
        """Say in one line what was seen and against what expectation."""
        lasted = _duration(self.at - self.since)
        if self.state is Transition.CLEARED:
            return self.detail or f"{self.kind.value} condition over after {lasted}"
        if self.kind is ConditionKind.SILENT:
            return (
                f"no message for {lasted}; expected one within "
                f"{_duration(self.expected_s)} from its recent rhythm"
            )
        if self.kind is ConditionKind.FROZEN:
            parts = [
                f"{item.key} stuck at {item.value:g} for "
                f"{_duration(self.at - item.since)} over {item.messages} messages"
                for item in self.keys
            ]
            return "; ".join(parts) + " while the device keeps reporting"
        if self.kind is ConditionKind.UNAVAILABLE:
            parts = [
                f"{item.key} unavailable for {_duration(self.at - item.since)}"
                for item in self.keys
            ]
            return (
                "; ".join(parts) + f" (limit {_duration(self.expected_s)})"
                if parts
                else "unavailable"
            )
        return self.detail or f"announced offline {lasted} ago"

    def to_json(self) -> bytes:
        """Encode as the JSON published on `<prefix>/<device>/<kind>`."""
        document: dict[str, Any] = {
            "origin": ORIGIN,
            "device": self.device,
            "kind": self.kind.value,
            "state": self.state.value,
            "time": datetime.fromtimestamp(self.at, UTC).isoformat(),
            "since": datetime.fromtimestamp(self.since, UTC).isoformat(),
            "duration_s": round(self.at - self.since, DIGITS),
            "expected_s": (
                round(self.expected_s, DIGITS)
                if math.isfinite(self.expected_s)
                else None
            ),
            "reason": self.reason(),
            "keys": [
                {
                    "key": item.key,
                    "since": datetime.fromtimestamp(item.since, UTC).isoformat(),
                    "messages": item.messages,
                    "value": item.value if math.isfinite(item.value) else None,
                }
                for item in self.keys
            ],
        }
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()


def _or_inf(value: float) -> float:
    """A time, or infinity where it is not set (NaN), for `min`."""
    return math.inf if math.isnan(value) else value


def _duration(seconds: float) -> str:
    """Say a duration the way a person would read it.

    >>> _duration(42.0), _duration(5400.0), _duration(9000.0), _duration(200000.0)
    ('42 s', '90 min', '2.5 h', '2.3 d')
    """
    if not math.isfinite(seconds):
        return "an unknown time"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def availability_state(payload: bytes) -> bool | None:
    """Read an availability announcement: True online, False offline, None unknown.

    >>> availability_state(b"Offline"), availability_state(b'{"state":"online"}')
    (False, True)
    >>> availability_state(b"maybe") is None
    True
    """
    if len(payload) > MAX_AVAILABILITY_BYTES:
        return None
    text = payload.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except ValueError:
            return None
        text = str(document.get("state", "")) if isinstance(document, dict) else ""
    word = text.strip().lower()
    if word in OFFLINE_WORDS:
        return False
    if word in ONLINE_WORDS:
        return True
    return None


@dataclass(slots=True)
class _KeyWatch:
    value: float = math.nan
    run_start: float = math.nan
    run_messages: int = 0
    longest_run_s: float = 0.0
    resting_value: float = math.nan
    distinct: set[float] | None = field(default_factory=set)
    frozen: bool = False
    missing_since: float = math.nan
    missing_messages: int = 0
    unavailable: bool = False


@dataclass(slots=True)
class DeviceWatch:
    """The conditions of one device: its rhythm, per-key runs and availability.

    Small on purpose (a few floats per device and per key): it lives beside
    the window of every tracked device.
    """

    last_seen: float = math.nan
    peak_gap_s: float = 0.0
    gaps: int = 0
    silent_since: float = math.nan
    offline_since: float = math.nan
    keys: dict[str, _KeyWatch] = field(default_factory=dict)
    frozen_keys: tuple[str, ...] = ()
    frozen_since: float = math.nan
    unavailable_keys: tuple[str, ...] = ()
    unavailable_since: float = math.nan
    announced_online: bool = False

    def observe(
        self,
        device: str,
        readings: Readings,
        at: float,
        settings: ConditionSettings,
        default_key: str = "value",
        max_keys: int = 32,
    ) -> list[ConditionVerdict]:
        """Learn from one telemetry message; return conditions it changed."""
        verdicts = []
        if math.isfinite(self.last_seen):
            gap = max(at - self.last_seen, 0.0)
            self.peak_gap_s = max(gap, self.peak_gap_s * PEAK_GAP_DECAY)
            self.gaps += 1
        if math.isfinite(self.silent_since):
            verdicts.append(
                ConditionVerdict(
                    device,
                    ConditionKind.SILENT,
                    Transition.CLEARED,
                    at,
                    self.silent_since,
                    detail=f"reporting again after {_duration(at - self.last_seen)}",
                )
            )
            self.silent_since = math.nan
        self.last_seen = at

        missing = set(readings.missing)
        if readings.kind is PayloadKind.EMPTY:
            missing.add(default_key)
        for key, value in readings.values.items():
            watch = self._key(key, max_keys)
            if watch is not None:
                self._observe_value(watch, value, at)
        for key in missing:
            watch = self._key(key, max_keys)
            if watch is not None:
                if math.isnan(watch.missing_since):
                    watch.missing_since = at
                watch.missing_messages += 1
        if settings.frozen.enabled:
            verdicts.extend(self._judge_frozen(device, at, settings))
        if settings.unavailable.enabled:
            verdicts.extend(self._judge_unavailable(device, at, settings))
        return verdicts

    def check(
        self, device: str, now: float, settings: ConditionSettings
    ) -> list[ConditionVerdict]:
        """Judge what only the passing of time shows: silence and unavailability."""
        verdicts = []
        expected = self.expected_gap_s(settings)
        if (
            settings.silent.enabled
            and math.isfinite(expected)
            and math.isnan(self.silent_since)
            and math.isnan(self.offline_since)
            and now - self.last_seen > expected
        ):
            self.silent_since = self.last_seen
            verdicts.append(
                ConditionVerdict(
                    device,
                    ConditionKind.SILENT,
                    Transition.RAISED,
                    now,
                    self.last_seen,
                    expected_s=expected,
                )
            )
        if settings.unavailable.enabled:
            verdicts.extend(self._judge_unavailable(device, now, settings))
        return verdicts

    def announce(
        self, device: str, online: bool, at: float, topic: str
    ) -> ConditionVerdict | None:
        """Apply an availability announcement; return the change, if any."""
        self.announced_online = online
        if not online and math.isnan(self.offline_since):
            self.offline_since = at
            return ConditionVerdict(
                device,
                ConditionKind.OFFLINE,
                Transition.RAISED,
                at,
                at,
                detail=f"announced offline on {topic}",
            )
        if online and math.isfinite(self.offline_since):
            since = self.offline_since
            self.offline_since = math.nan
            if math.isfinite(self.last_seen):
                # Silence is judged from here: the time spent announced
                # offline is not the device failing to report.
                self.last_seen = max(self.last_seen, at)
            return ConditionVerdict(
                device,
                ConditionKind.OFFLINE,
                Transition.CLEARED,
                at,
                since,
                detail=f"announced online on {topic} after {_duration(at - since)}",
            )
        return None

    def adopt(
        self,
        device: str,
        kind: ConditionKind,
        since: float,
        keys: list[KeyState],
        at: float,
    ) -> ConditionVerdict | None:
        """Take over a condition a previous run raised (its retained verdict).

        Without this a restarted sidecar, which starts with no state, would
        never clear what the last run left raised. The condition is held as
        if this run had raised it, so it clears as usual; what this run has
        already seen to the contrary (the device reported, announced itself
        online, or showed the key changed or readable) clears it at once,
        which the returned verdict says. A condition this run has raised
        itself (its own retained verdict, replayed after a reconnect) is left
        as it is.
        """
        if kind in self.raised():
            return None
        if kind is ConditionKind.SILENT:
            if math.isfinite(self.last_seen):
                return self._cleared_on_adopt(device, kind, at, since)
            self.silent_since = since
        elif kind is ConditionKind.OFFLINE:
            if self.announced_online:
                return self._cleared_on_adopt(device, kind, at, since)
            self.offline_since = since
        else:
            held = tuple(
                sorted(item.key for item in keys if self._adopt_key(kind, item))
            )
            if not held:
                return self._cleared_on_adopt(device, kind, at, since)
            setattr(self, f"{kind.value}_keys", held)
            setattr(self, f"{kind.value}_since", since)
        return None

    def _adopt_key(self, kind: ConditionKind, item: KeyState) -> bool:
        """Hold one key's adopted state; False if this run saw it end."""
        watch = self.keys.get(item.key)
        if kind is ConditionKind.FROZEN:
            if watch is not None and watch.value != item.value:
                return False
            if watch is None:
                watch = self.keys[item.key] = _KeyWatch(value=item.value)
            # The key was judged variable and stuck; keep judging it so.
            watch.distinct = None
            watch.frozen = True
            watch.run_start = min(_or_inf(watch.run_start), item.since)
            watch.run_messages += item.messages
            return True
        if watch is not None and math.isnan(watch.missing_since):
            return False
        if watch is None:
            watch = self.keys[item.key] = _KeyWatch()
        watch.missing_since = min(_or_inf(watch.missing_since), item.since)
        watch.missing_messages += item.messages
        watch.unavailable = True
        return True

    @staticmethod
    def _cleared_on_adopt(
        device: str, kind: ConditionKind, at: float, since: float
    ) -> ConditionVerdict:
        return ConditionVerdict(
            device,
            kind,
            Transition.CLEARED,
            at,
            since,
            detail=f"{kind.value} no more: this run saw the device recover "
            "after a restart",
        )

    def expected_gap_s(self, settings: ConditionSettings) -> float:
        """How long a silence is still usual for this device; NaN until learned."""
        if self.gaps < settings.silent.min_gaps:
            return math.nan
        return max(settings.silent.min_s, settings.silent.factor * self.peak_gap_s)

    def raised(self) -> list[ConditionKind]:
        """Return every condition currently raised."""
        kinds = []
        if math.isfinite(self.silent_since):
            kinds.append(ConditionKind.SILENT)
        if self.frozen_keys:
            kinds.append(ConditionKind.FROZEN)
        if self.unavailable_keys:
            kinds.append(ConditionKind.UNAVAILABLE)
        if math.isfinite(self.offline_since):
            kinds.append(ConditionKind.OFFLINE)
        return kinds

    def drop(
        self, device: str, kind: ConditionKind, at: float, why: str
    ) -> ConditionVerdict | None:
        """Stop holding a raised condition (it is no longer watched); its clear."""
        since = {
            ConditionKind.SILENT: self.silent_since,
            ConditionKind.FROZEN: self.frozen_since,
            ConditionKind.UNAVAILABLE: self.unavailable_since,
            ConditionKind.OFFLINE: self.offline_since,
        }[kind]
        if kind not in self.raised():
            return None
        if kind is ConditionKind.SILENT:
            self.silent_since = math.nan
        elif kind is ConditionKind.FROZEN:
            self.frozen_keys, self.frozen_since = (), math.nan
        elif kind is ConditionKind.UNAVAILABLE:
            self.unavailable_keys, self.unavailable_since = (), math.nan
        else:
            self.offline_since = math.nan
        return ConditionVerdict(device, kind, Transition.CLEARED, at, since, detail=why)

    def _key(self, key: str, max_keys: int) -> _KeyWatch | None:
        watch = self.keys.get(key)
        if watch is None and len(self.keys) < max_keys:
            watch = self.keys[key] = _KeyWatch()
        return watch

    @staticmethod
    def _observe_value(watch: _KeyWatch, value: float, at: float) -> None:
        watch.missing_since = math.nan
        watch.missing_messages = 0
        if value == watch.value:
            watch.run_messages += 1
            return
        if math.isfinite(watch.run_start) and not watch.frozen:
            run_s = at - watch.run_start
            if run_s > watch.longest_run_s:
                watch.longest_run_s = run_s
                watch.resting_value = watch.value
        if watch.distinct is not None:
            watch.distinct.add(value)
        watch.value = value
        watch.run_start = at
        watch.run_messages = 1

    def _judge_frozen(
        self, device: str, at: float, settings: ConditionSettings
    ) -> list[ConditionVerdict]:
        rules = settings.frozen
        for watch in self.keys.values():
            if watch.distinct is not None and len(watch.distinct) >= rules.min_distinct:
                # Variable enough to judge; the values themselves are no longer
                # needed, which keeps a device's watch small.
                watch.distinct = None
            variable = watch.distinct is None
            watch.frozen = (
                variable
                and watch.value != watch.resting_value
                and watch.run_messages >= rules.min_messages
                and at - watch.run_start
                >= max(rules.min_s, rules.run_factor * watch.longest_run_s)
            )
        frozen = tuple(sorted(key for key, watch in self.keys.items() if watch.frozen))
        return self._transition(device, ConditionKind.FROZEN, frozen, at, math.nan)

    def _judge_unavailable(
        self, device: str, at: float, settings: ConditionSettings
    ) -> list[ConditionVerdict]:
        limit = settings.unavailable.after_s
        for watch in self.keys.values():
            watch.unavailable = (
                math.isfinite(watch.missing_since) and at - watch.missing_since >= limit
            )
        gone = tuple(
            sorted(key for key, watch in self.keys.items() if watch.unavailable)
        )
        return self._transition(device, ConditionKind.UNAVAILABLE, gone, at, limit)

    def _transition(
        self,
        device: str,
        kind: ConditionKind,
        keys: tuple[str, ...],
        at: float,
        expected: float,
    ) -> list[ConditionVerdict]:
        name = kind.value
        before: tuple[str, ...] = getattr(self, f"{name}_keys")
        if keys == before:
            return []
        setattr(self, f"{name}_keys", keys)
        since: float = getattr(self, f"{name}_since")
        if not keys:
            setattr(self, f"{name}_since", math.nan)
            return [
                ConditionVerdict(
                    device,
                    kind,
                    Transition.CLEARED,
                    at,
                    since,
                    detail=f"{', '.join(before)} {kind.value} no more",
                )
            ]
        states = tuple(self._key_state(key, kind) for key in keys)
        if not before:
            since = min(item.since for item in states)
            setattr(self, f"{name}_since", since)
        return [
            ConditionVerdict(
                device,
                kind,
                Transition.RAISED,
                at,
                since,
                expected_s=expected,
                keys=states,
            )
        ]

    def _key_state(self, key: str, kind: ConditionKind) -> KeyState:
        watch = self.keys[key]
        if kind is ConditionKind.FROZEN:
            return KeyState(key, watch.run_start, watch.run_messages, watch.value)
        return KeyState(key, watch.missing_since, watch.missing_messages)
