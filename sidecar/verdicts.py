"""The alarm lifecycle per device and the JSON verdicts it publishes."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sidecar.features import KeyDeviation

__all__ = [
    "ORIGIN",
    "OWN_OUTPUT_MARK",
    "AlarmLifecycle",
    "Transition",
    "Verdict",
]

# Keys whose values are personal data (OwnTracks positions, payloads.md
# section 7): a verdict names them but never carries their values.
PRIVATE_KEYS = frozenset({"lat", "lon", "latitude", "longitude"})
# Every JSON document the sidecar publishes opens with this field, so a copy
# that comes back under any topic (a bridge or an echo that renames the
# prefix) is still known as output and never read as a device's telemetry.
ORIGIN = "anomaly-sidecar"
OWN_OUTPUT_MARK = b'{"origin":"anomaly-sidecar"'
# Rounding keeps verdicts short; scores and baselines need no more digits.
SCORE_DIGITS = 4


class Transition(enum.StrEnum):
    """A change of a device's alarm state."""

    RAISED = "raised"
    CLEARED = "cleared"


class AlarmLifecycle:
    """Turn per-window confirmations into raised and cleared transitions.

    A device enters alarm after `alarm_after` consecutive confirmed windows,
    stays in alarm without repeating itself, and is cleared after
    `clear_after` consecutive windows that were not confirmed.

    >>> lifecycle = AlarmLifecycle(alarm_after=2, clear_after=2)
    >>> [lifecycle.step("plug", hit) for hit in (True, True, True, False, False)]
    [None, <Transition.RAISED: 'raised'>, None, None, <Transition.CLEARED: 'cleared'>]
    """

    def __init__(self, alarm_after: int, clear_after: int) -> None:
        self.alarm_after = alarm_after
        self.clear_after = clear_after
        self._in_alarm: set[str] = set()
        self._streak: dict[str, int] = {}

    @property
    def alarms(self) -> int:
        """How many devices are in alarm now."""
        return len(self._in_alarm)

    def in_alarm(self, device: str) -> bool:
        """Return whether a device is currently in alarm."""
        return device in self._in_alarm

    def step(
        self,
        device: str,
        confirmed: bool,
        alarm_after: int | None = None,
        clear_after: int | None = None,
    ) -> Transition | None:
        """Record one scored window of a device; return a transition if any.

        `alarm_after` and `clear_after` replace the lifecycle's own counts for
        this device (device overrides).
        """
        alarm_after = alarm_after or self.alarm_after
        clear_after = clear_after or self.clear_after
        alarmed = device in self._in_alarm
        # The streak counts windows that argue for leaving the current state.
        argues_for_change = confirmed != alarmed
        streak = self._streak.get(device, 0) + 1 if argues_for_change else 0
        if not alarmed and streak >= alarm_after:
            self._in_alarm.add(device)
            self._streak.pop(device, None)
            return Transition.RAISED
        if alarmed and streak >= clear_after:
            self._in_alarm.discard(device)
            self._streak.pop(device, None)
            return Transition.CLEARED
        if streak:
            self._streak[device] = streak
        else:
            self._streak.pop(device, None)
        return None

    def adopt(self, device: str) -> None:
        """Hold a device in alarm that a previous run left raised.

        It is cleared as any alarm is, after `clear_after` quiet windows.
        """
        self._in_alarm.add(device)
        self._streak.pop(device, None)

    def forget(self, device: str) -> None:
        """Drop a device's state (it was evicted)."""
        self._in_alarm.discard(device)
        self._streak.pop(device, None)


def _rounded(value: float) -> float | None:
    return round(value, SCORE_DIGITS) if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class Verdict:
    """One published statement about a device's state, with its reason."""

    device: str
    state: Transition
    score: float
    rf_score: float
    cnn_score: float
    topic: str
    received_at: float
    seq: int
    models: dict[str, str]
    evidence: tuple[KeyDeviation, ...]
    typical_gap_s: float
    last_gap_s: float
    # Set when the verdict is not the models' judgement (an evicted device).
    note: str = ""

    def reason(self) -> str:
        """Say in one line which readings stood out against the baseline."""
        if self.note:
            return self.note
        if self.state is Transition.CLEARED:
            return "readings back within the device's usual range and rhythm"
        parts = []
        for item in self.evidence:
            if item.key.rsplit(".", 1)[-1].lower() in PRIVATE_KEYS:
                parts.append(f"{item.key} {abs(item.z):.1f} spreads from usual")
            else:
                parts.append(
                    f"{item.key}={item.value:g} vs usual {item.mean:.4g}"
                    f"\u00b1{item.spread:.2g} (z={item.z:+.1f})"
                )
        if not parts:
            parts.append("window shape unlike the device's history")
        return "; ".join(parts)

    def to_json(self) -> bytes:
        """Encode the verdict as the JSON published on `<prefix>/<device>`."""
        evidence: list[dict[str, Any]] = []
        for item in self.evidence:
            private = item.key.rsplit(".", 1)[-1].lower() in PRIVATE_KEYS
            evidence.append(
                {
                    "key": item.key,
                    "value": None if private else _rounded(item.value),
                    "usual": None if private else _rounded(item.mean),
                    "spread": None if private else _rounded(item.spread),
                    "z": _rounded(item.z),
                }
            )
        document = {
            "origin": ORIGIN,
            "device": self.device,
            "state": self.state.value,
            "score": _rounded(self.score),
            "rf_score": _rounded(self.rf_score),
            "cnn_score": _rounded(self.cnn_score),
            "topic": self.topic,
            "time": datetime.fromtimestamp(self.received_at, UTC).isoformat(),
            "received_at": self.received_at,
            "seq": self.seq,
            "models": self.models,
            "reason": self.reason(),
            "evidence": evidence,
            "cadence": {
                "last_gap_s": _rounded(self.last_gap_s),
                "typical_gap_s": _rounded(self.typical_gap_s),
            },
        }
        return json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
