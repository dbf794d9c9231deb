"""Per-device calibration: learned online exactly as it is applied offline."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from sidecar.calibration import Calibration, calibrate_offline, calibrated
from sidecar.detector import Cascade, Threshold

SETTINGS = Calibration(windows=8, quantile=0.5)


class _FirstColumn:
    """A scorer that returns the first input column: a model with known output."""

    def score(self, inputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.asarray(inputs.reshape(len(inputs), -1)[:, 0], dtype=np.float32)


def _cascade() -> Cascade:
    return Cascade(
        _FirstColumn(),
        _FirstColumn(),
        Threshold(0.1),
        Threshold(0.0),
        Threshold(0.0),
        SETTINGS,
    )


def test_calibrated_maps_reference_to_zero_and_keeps_one() -> None:
    """Test that the reference maps to 0, 1 stays 1, and lower scores clip to 0."""
    result = calibrated(np.array([0.1, 0.4, 1.0]), 0.4)
    np.testing.assert_allclose(result, [0.0, 0.0, 1.0])


def test_cascade_online_calibration_matches_offline_for_any_batching() -> None:
    """Test that online learning, batch by batch, equals the offline function."""
    rng = np.random.default_rng(0)
    devices = np.array(["a", "b"] * 20)
    seqs = np.repeat(np.arange(20), 2)
    raw = rng.uniform(0.2, 0.9, size=40).astype(np.float32)
    offline, _, learning = calibrate_offline(
        raw.astype(np.float64), raw.astype(np.float64), devices, seqs, SETTINGS
    )

    for batch in (1, 3, 40):
        cascade = _cascade()
        calibrations = {"a": cascade.new_device(), "b": cascade.new_device()}
        online = []
        learned = []
        for start in range(0, 40, batch):
            rows = slice(start, start + batch)
            vectors = raw[rows].reshape(-1, 1)
            scores = cascade.score(
                vectors, vectors, [calibrations[d] for d in devices[rows]]
            )
            online.extend(scores.rf.tolist())
            learned.extend(scores.learning.tolist())
        assert learned == learning.tolist()
        np.testing.assert_allclose(online, offline, rtol=0, atol=1e-7)


def test_cascade_learning_windows_are_never_confirmed() -> None:
    """Test that windows spent learning a device's reference raise nothing."""
    cascade = _cascade()
    device = cascade.new_device()
    vectors = np.full((SETTINGS.windows, 1), 0.99, dtype=np.float32)

    scores = cascade.score(vectors, vectors, [device] * SETTINGS.windows)

    assert scores.learning.all()
    assert not scores.confirmed.any()
    assert device.reference is not None
