"""Specification of the alarm lifecycle and of the published verdict JSON."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sidecar.features import KeyDeviation
from sidecar.verdicts import AlarmLifecycle, Transition, Verdict

REQUIRED_KEYS = frozenset(
    {
        "device",
        "state",
        "score",
        "rf_score",
        "cnn_score",
        "topic",
        "time",
        "seq",
        "models",
        "reason",
        "evidence",
    }
)
# 2024-05-03T07:06:40.250000+00:00
RECEIVED_AT = 1714720000.25
# Invented OwnTracks position: digits chosen to be unmistakable in any output.
LATITUDE = 48.1357
USUAL_LATITUDE = 47.2468
LATITUDE_SPREAD = 0.0123


def _reject_constant(name: str) -> Any:
    """Fail on NaN or Infinity tokens, which strict JSON parsers refuse."""
    message = f"non-standard JSON constant {name}"
    raise AssertionError(message)


def _decode(verdict: Verdict) -> dict[str, Any]:
    """Decode a verdict as a strict JSON parser would."""
    document: dict[str, Any] = json.loads(
        verdict.to_json(), parse_constant=_reject_constant
    )
    return document


def _verdict(**changes: Any) -> Verdict:
    """Build a plausible raised verdict, with `changes` applied."""
    verdict = Verdict(
        device="fridge_plug",
        state=Transition.RAISED,
        score=0.91234567,
        rf_score=0.8,
        cnn_score=0.95,
        topic="zigbee2mqtt/fridge_plug",
        received_at=RECEIVED_AT,
        seq=7,
        models={"rf": "rf.onnx", "cnn": "cnn.onnx"},
        evidence=(KeyDeviation("power", 812.0, 95.5, 4.2, 170.6),),
        typical_gap_s=60.0,
        last_gap_s=61.5,
    )
    return replace(verdict, **changes)


def _steps(lifecycle: AlarmLifecycle, device: str, hits: str) -> list[str]:
    """Feed `hits` ("1" confirmed, "0" quiet); spell transitions as R, C or `.`."""
    spelled = {None: ".", Transition.RAISED: "R", Transition.CLEARED: "C"}
    return [spelled[lifecycle.step(device, hit == "1")] for hit in hits]


@pytest.mark.parametrize(
    ("alarm_after", "hits", "expected"),
    [
        (1, "1", "R"),
        (2, "11", ".R"),
        (3, "111", "..R"),
        (5, "11111", "....R"),
        (3, "11", ".."),
    ],
)
def test_alarm_lifecycle_raises_after_consecutive_confirmations(
    alarm_after: int, hits: str, expected: str
) -> None:
    """Test that an alarm is raised exactly at the `alarm_after`th confirmation."""
    lifecycle = AlarmLifecycle(alarm_after=alarm_after, clear_after=3)

    assert "".join(_steps(lifecycle, "plug", hits)) == expected


def test_alarm_lifecycle_never_repeats_while_in_alarm() -> None:
    """Test that further confirmations while in alarm raise nothing new."""
    lifecycle = AlarmLifecycle(alarm_after=2, clear_after=3)

    transitions = _steps(lifecycle, "plug", "1" * 50)

    assert transitions.count("R") == 1
    assert lifecycle.in_alarm("plug")


@pytest.mark.parametrize(
    ("clear_after", "quiet", "expected"), [(1, "0", "C"), (3, "000", "..C")]
)
def test_alarm_lifecycle_clears_after_consecutive_quiet_windows(
    clear_after: int, quiet: str, expected: str
) -> None:
    """Test that an alarm clears exactly at the `clear_after`th quiet window."""
    lifecycle = AlarmLifecycle(alarm_after=1, clear_after=clear_after)
    lifecycle.step("plug", True)

    assert "".join(_steps(lifecycle, "plug", quiet)) == expected
    assert not lifecycle.in_alarm("plug")


def test_alarm_lifecycle_quiet_windows_outside_alarm_do_nothing() -> None:
    """Test that quiet windows without an alarm never clear anything."""
    lifecycle = AlarmLifecycle(alarm_after=2, clear_after=1)

    assert set(_steps(lifecycle, "plug", "0" * 20)) == {"."}


@pytest.mark.parametrize(
    ("hits", "expected"),
    [
        ("1101", "...."),
        ("11011", "....."),
        ("110111", ".....R"),
        ("1111100100", "..R......."),
        ("11100100", "..R....."),
        ("111000", "..R..C"),
        ("1110010001", "..R.....C."),
    ],
)
def test_alarm_lifecycle_interrupted_streak_resets(hits: str, expected: str) -> None:
    """Test that one window against the streak restarts the count toward a change."""
    lifecycle = AlarmLifecycle(alarm_after=3, clear_after=3)

    assert "".join(_steps(lifecycle, "plug", hits)) == expected


def test_alarm_lifecycle_devices_are_independent() -> None:
    """Test that one device's windows never move another device's state."""
    lifecycle = AlarmLifecycle(alarm_after=2, clear_after=2)

    first = [lifecycle.step("plug", True), lifecycle.step("sensor", True)]
    second = [lifecycle.step("plug", True), lifecycle.step("sensor", False)]

    assert first == [None, None]
    assert second == [Transition.RAISED, None]
    assert lifecycle.in_alarm("plug")
    assert not lifecycle.in_alarm("sensor")


def test_alarm_lifecycle_forget_drops_alarm_and_streak() -> None:
    """Test that a forgotten device starts over: no alarm and no partial streak."""
    lifecycle = AlarmLifecycle(alarm_after=2, clear_after=2)
    _steps(lifecycle, "plug", "11")
    _steps(lifecycle, "sensor", "1")

    lifecycle.forget("plug")
    lifecycle.forget("sensor")

    assert not lifecycle.in_alarm("plug")
    assert _steps(lifecycle, "plug", "0") == ["."]
    assert _steps(lifecycle, "sensor", "1") == ["."]


def test_alarm_lifecycle_forget_unknown_device_is_harmless() -> None:
    """Test that forgetting a device never seen does nothing."""
    lifecycle = AlarmLifecycle(alarm_after=1, clear_after=1)

    lifecycle.forget("never-seen")

    assert not lifecycle.in_alarm("never-seen")


def test_verdict_to_json_has_the_published_keys() -> None:
    """Test that a verdict encodes as JSON with every documented key."""
    document = _decode(_verdict())

    assert document.keys() >= REQUIRED_KEYS
    assert document["device"] == "fridge_plug"
    assert document["state"] == "raised"
    assert document["topic"] == "zigbee2mqtt/fridge_plug"
    assert document["seq"] == 7
    assert document["models"] == {"rf": "rf.onnx", "cnn": "cnn.onnx"}
    assert document["score"] == 0.9123
    assert document["evidence"] == [
        {"key": "power", "value": 812.0, "usual": 95.5, "spread": 4.2, "z": 170.6}
    ]


def test_verdict_to_json_time_is_iso_8601_utc() -> None:
    """Test that `time` is ISO 8601 in UTC and equals the receive time."""
    document = _decode(_verdict())

    moment = datetime.fromisoformat(document["time"])

    assert moment.utcoffset() == timedelta(0)
    assert moment == datetime(2024, 5, 3, 7, 6, 40, 250000, tzinfo=UTC)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_verdict_to_json_non_finite_numbers_are_null(bad: float) -> None:
    """Test that non-finite scores and evidence encode as null, never NaN."""
    verdict = _verdict(
        score=bad,
        rf_score=bad,
        cnn_score=bad,
        evidence=(KeyDeviation("power", bad, bad, bad, bad),),
        typical_gap_s=bad,
        last_gap_s=bad,
    )

    document = _decode(verdict)

    assert document["score"] is None
    assert document["rf_score"] is None
    assert document["cnn_score"] is None
    assert document["evidence"] == [
        {"key": "power", "value": None, "usual": None, "spread": None, "z": None}
    ]
    assert b"NaN" not in verdict.to_json()
    assert b"Infinity" not in verdict.to_json()


@pytest.mark.parametrize("key", ["lat", "lon", "LAT", "location.lat", "gps.longitude"])
def test_verdict_private_key_values_are_withheld(key: str) -> None:
    """Test that private keys are named but their values appear nowhere."""
    evidence = (KeyDeviation(key, LATITUDE, USUAL_LATITUDE, LATITUDE_SPREAD, 72.5),)
    verdict = _verdict(evidence=evidence, topic="owntracks/alice/phone")

    encoded = verdict.to_json().decode()
    document = _decode(verdict)

    assert document["evidence"][0]["key"] == key
    assert document["evidence"][0]["value"] is None
    assert document["evidence"][0]["usual"] is None
    assert document["evidence"][0]["spread"] is None
    assert key in document["reason"]
    for digits in ("48.1", "47.2", "0.012", "1357", "2468"):
        assert digits not in encoded
        assert digits not in verdict.reason()


def test_verdict_reason_names_the_deviating_reading() -> None:
    """Test that a raised verdict's reason names each key with value and usual."""
    evidence = (
        KeyDeviation("power", 812.0, 95.5, 4.2, 170.6),
        KeyDeviation("voltage", 199.0, 230.1, 1.5, -20.7),
    )

    reason = _verdict(evidence=evidence).reason()

    assert reason.split("; ") == [
        "power=812 vs usual 95.5\u00b14.2 (z=+170.6)",
        "voltage=199 vs usual 230.1\u00b11.5 (z=-20.7)",
    ]


def test_verdict_reason_without_evidence_blames_the_window_shape() -> None:
    """Test that a raised verdict without key evidence still gives a reason."""
    assert _verdict(evidence=()).reason() == "window shape unlike the device's history"


def test_verdict_reason_for_cleared_says_back_to_normal() -> None:
    """Test that a cleared verdict says the device is back to normal."""
    verdict = _verdict(state=Transition.CLEARED)

    assert "back within" in verdict.reason()
    assert _decode(verdict)["state"] == "cleared"
