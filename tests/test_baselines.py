"""The baselines learn only from the fit part and catch an obvious fault."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from converters.baselines import BASELINES, run_baselines
from converters.dataset import build_windows
from converters.tabular import LabeledStreams, to_message
from sidecar.features import FeatureSpec

FIT = 300
FAULT = range(450, 500)


def _data(fault_level: float = 30.0) -> LabeledStreams:
    rng = np.random.default_rng(0)
    stream = []
    for i in range(600):
        faulty = i in FAULT
        value = fault_level if faulty else 10.0 + rng.normal(0.0, 1.0)
        reading = {"temperature": float(value), "humidity": float(rng.normal(50, 2))}
        stream.append(to_message("t", "meter", 60.0 * i, reading, int(faulty), "x"))
    return LabeledStreams(
        dataset="test",
        streams={"meter": stream},
        fit_streams={"meter": stream[:FIT]},
        scored_from={"meter": FIT},
        protocol="synthetic",
    )


def _run(data: LabeledStreams) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    spec = FeatureSpec()
    windows = build_windows(data.streams, spec)
    fit = windows.subset(windows.seqs < FIT)
    results = run_baselines(data, windows, fit, spec.warmup, seed=0)
    scored = windows.seqs >= FIT
    return {
        name: (
            result.scores[scored],
            result.flags[scored],
            windows.labels[scored],
        )
        for name, result in results.items()
    }


def test_baselines_rank_an_obvious_fault_above_normal_windows() -> None:
    """Test that every baseline scores a +20-sigma fault above normal traffic."""
    results = _run(_data())

    assert set(results) == set(BASELINES)
    for name in ("hst", "zscore"):
        scores, flags, labels = results[name]
        assert roc_auc_score(labels, scores) > 0.9, name
        assert flags[labels == 1].any(), name
    scores, _, labels = results["iforest"]
    assert roc_auc_score(labels, scores) > 0.5


def test_baselines_false_alarm_rate_stays_near_the_fit_budget() -> None:
    """Test that normal windows before the fault are rarely flagged (1 % on fit)."""
    for name, (_, flags, _) in _run(_data()).items():
        # Scored windows before the fault: positions FIT..449.
        before_fault = flags[: FAULT.start - FIT]
        assert before_fault.mean() < 0.1, name


def test_baseline_thresholds_never_read_scored_labels() -> None:
    """Test that relabeling the scored part changes no score and no flag."""
    data = _data()
    relabeled = {
        "meter": data.streams["meter"][:FIT]
        + [
            type(item)(item.device, item.message, 1 - item.label, item.attack_type)
            for item in data.streams["meter"][FIT:]
        ]
    }
    other = LabeledStreams(
        "test", relabeled, data.fit_streams, data.scored_from, "synthetic"
    )

    first, second = _run(data), _run(other)

    for name in BASELINES:
        np.testing.assert_array_equal(first[name][0], second[name][0])
        np.testing.assert_array_equal(first[name][1], second[name][1])


@pytest.mark.parametrize("normal_only", [False, True])
def test_baselines_handle_a_device_without_fit_part(normal_only: bool) -> None:
    """Test that a device first seen after the fit part is judged by pooled models."""
    data = _data()
    late = [
        to_message("t", "late", 60.0 * i, {"temperature": 10.0 + i % 3}, 0, "normal")
        for i in range(200)
    ]
    mixed = LabeledStreams(
        "test",
        {**data.streams, "late": late},
        data.fit_streams,
        {**data.scored_from, "late": 0},
        "synthetic",
        fit_normal_only=normal_only,
    )
    spec = FeatureSpec()
    windows = build_windows(mixed.streams, spec)
    fit = build_windows(mixed.fit_streams, spec)

    results = run_baselines(mixed, windows, fit, spec.warmup)

    for result in results.values():
        assert len(result.scores) == len(windows)
        assert np.isfinite(result.scores).all()
