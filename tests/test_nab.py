"""The NAB loader and scorer follow NAB's published definition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from converters.nab import (
    PROFILES,
    NabFile,
    alarm_onsets,
    corpus_score,
    load_nab,
    probation_rows,
    scaled_sigmoid,
    score_file,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nab"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"NAB data not found at {DATA} (../shared/data is absent)"
)
STANDARD = PROFILES["standard"]
# One file of 1000 rows (probation 150) with one window of 100 rows.
ONE = NabFile(rows=1000, windows=((500, 599),))


def test_scaled_sigmoid_matches_the_published_anchor_points() -> None:
    """Test that the curve is 0.98661 at a window's start, 0 at its end, -1 far past."""
    assert scaled_sigmoid(-1.0) == pytest.approx(0.98661, abs=1e-5)
    assert scaled_sigmoid(-0.5) == pytest.approx(0.84828, abs=1e-5)
    assert scaled_sigmoid(0.0) == 0.0
    assert scaled_sigmoid(1.0) == pytest.approx(-0.98661, abs=1e-5)
    assert scaled_sigmoid(3.0) == -1.0


def test_probation_is_fifteen_percent_capped_at_750_rows() -> None:
    """Test that the probationary period is floor(15 %) up to 750 rows."""
    assert probation_rows(1000) == 150
    assert probation_rows(4032) == 604
    assert probation_rows(100_000) == 750


def test_perfect_detector_scores_100_and_null_detector_0() -> None:
    """Test the normalisation: first row of every window = 100, nothing = 0."""
    files = {
        "a": ONE,
        "b": NabFile(rows=2000, windows=((400, 449), (1500, 1599))),
        "quiet": NabFile(rows=500, windows=()),
    }
    perfect = {"a": [500], "b": [400, 1500]}
    for profile in PROFILES.values():
        assert corpus_score(files, perfect, profile) == pytest.approx(100.0)
        assert corpus_score(files, {}, profile) == pytest.approx(0.0)


def test_detection_at_window_start_earns_a_tp() -> None:
    """Test that a detection on a window's first row earns exactly A_TP."""
    score = score_file(ONE, [500], STANDARD)
    assert score.raw == pytest.approx(STANDARD.tp)
    assert (score.detected, score.missed, score.false_positives) == (1, 0, 0)


def test_detection_mid_window_earns_the_rescaled_sigmoid() -> None:
    """Test a hand-worked mid-window case: position -(599-549+1)/100 = -0.51."""
    expected = scaled_sigmoid(-0.51) / scaled_sigmoid(-1.0)
    assert score_file(ONE, [549], STANDARD).raw == pytest.approx(expected)
    assert 0.86 < expected < 0.87


def test_only_the_first_detection_in_a_window_counts() -> None:
    """Test that later detections in the same window change nothing."""
    alone = score_file(ONE, [520], STANDARD)
    with_later = score_file(ONE, [520, 560, 599], STANDARD)
    assert with_later == alone


def test_missed_window_costs_a_fn_per_profile() -> None:
    """Test that no detection costs A_FN (twice as much under low-FN)."""
    assert score_file(ONE, [], STANDARD).raw == -1.0
    assert score_file(ONE, [], PROFILES["reward_low_FN_rate"]).raw == -2.0


def test_false_positive_far_from_any_window_costs_a_fp() -> None:
    """Test that a detection before the first window costs the full A_FP."""
    for name in ("standard", "reward_low_FP_rate"):
        profile = PROFILES[name]
        score = score_file(ONE, [200], profile)
        assert score.raw == pytest.approx(-profile.fn - profile.fp)
        assert score.false_positives == 1
    far_after = score_file(ONE, [599 + 3 * 99 + 1], STANDARD)
    assert far_after.raw == pytest.approx(-1.0 - STANDARD.fp)


def test_false_positive_right_after_a_window_costs_little() -> None:
    """Test that the cost grows with distance from the window before it."""
    just_after = score_file(ONE, [500, 600], STANDARD).raw - 1.0
    farther = score_file(ONE, [500, 700], STANDARD).raw - 1.0
    assert -0.01 < just_after < 0
    assert -STANDARD.fp < farther < just_after
    assert just_after == pytest.approx(STANDARD.fp * scaled_sigmoid(1 / 99))


def test_detections_in_the_probationary_period_are_ignored() -> None:
    """Test that a detection before row 150 of 1000 is neither TP nor FP."""
    early = NabFile(rows=1000, windows=((100, 199),))
    assert score_file(ONE, [10], STANDARD) == score_file(ONE, [], STANDARD)
    # A window that ends inside the probation is not scored at all.
    ends_early = NabFile(rows=1000, windows=((100, 120),))
    assert score_file(ends_early, [], STANDARD).raw == 0.0
    # One that straddles it counts, and rows before row 150 cannot catch it.
    assert score_file(early, [120], STANDARD).raw == -1.0
    assert score_file(early, [150], STANDARD).raw > 0.0


def test_alarm_onsets_start_each_run_of_flags() -> None:
    """Test that a detection is where a flag turns on, and a gap ends a run."""
    seqs = np.array([3, 4, 5, 6, 8, 9])
    flags = np.array([True, True, False, True, True, True])
    assert alarm_onsets(seqs, flags) == [3, 6, 8]


def test_normalised_score_is_nan_without_windows() -> None:
    """Test that a corpus without any window has no defined score."""
    assert math.isnan(corpus_score({"a": NabFile(100, ())}, {}, STANDARD))


@pytest.mark.data
@needs_data
def test_load_nab_reads_all_58_series_and_116_windows() -> None:
    """Test that the loader sees the full corpus and labels rows in windows."""
    data, files = load_nab(DATA)

    assert len(files) == 58
    assert sum(len(f.windows) for f in files.values()) == 116
    inside = sum(m.label for stream in data.streams.values() for m in stream)
    assert inside == 33_495
    assert data.scored_from == {d: f.probation for d, f in files.items()}
    taxi = data.streams["realKnownCause.nyc_taxi"]
    assert taxi[0].message.topic == "nab/realKnownCause.nyc_taxi"
