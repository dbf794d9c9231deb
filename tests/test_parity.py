"""Training and the live sidecar see the same windows: one feature path, pinned."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from converters.dataset import build_windows
from converters.simulate import simulate
from converters.ton_iot import LabeledMessage
from sidecar.calibration import calibrate_offline
from sidecar.config import Settings
from sidecar.detector import load_cascade
from sidecar.service import build_pipeline
from sidecar.stream import Message

# Both paths run the same float32 arrays through the same ONNX session, so the
# scores must agree to the last bit; a tolerance would hide a drifting path.
SCORE_TOLERANCE = 0.0


def _interleaved(streams: dict[str, list[LabeledMessage]]) -> list[LabeledMessage]:
    from converters.replay import interleave

    return list(interleave(streams))


def test_live_pipeline_scores_equal_training_windows_scores() -> None:
    """Test that the live pipeline's RF scores equal the training path's."""
    settings = Settings()
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    streams = simulate(seed=3)

    windows = build_windows(streams, models.spec)
    raw = models.rf.score(windows.vectors).astype(np.float64)
    offline, _, learning = calibrate_offline(
        raw, raw, windows.devices, windows.seqs, models.cascade.calibration
    )

    pipeline = build_pipeline(settings, models)
    live: dict[tuple[str, int], tuple[float, bool]] = {}
    messages = [item.message for item in _interleaved(streams)]
    for start in range(0, len(messages), settings.limits.batch_size):
        result = pipeline.process(messages[start : start + settings.limits.batch_size])
        live.update({(s.device, s.seq): (s.rf, s.learning) for s in result.scores})

    keys = list(zip(windows.devices.tolist(), windows.seqs.tolist(), strict=True))
    assert len(live) == len(keys)
    assert [live[key][1] for key in keys] == learning.tolist()
    live_scores = np.array([live[key][0] for key in keys])
    np.testing.assert_allclose(live_scores, offline, rtol=0, atol=SCORE_TOLERANCE)


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_pipeline_scores_do_not_depend_on_batching(batch_size: int) -> None:
    """Test that cutting one stream into other batch sizes keeps its scores."""
    settings = Settings()
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    messages = [item.message for item in _interleaved(simulate(seed=5))]

    def scores(size: int) -> dict[tuple[str, int], float]:
        pipeline = build_pipeline(settings, models)
        found: dict[tuple[str, int], float] = {}
        for start in range(0, len(messages), size):
            result = pipeline.process(messages[start : start + size])
            found.update({(s.device, s.seq): s.fused for s in result.scores})
        return found

    reference = scores(64)
    assert scores(batch_size) == pytest.approx(reference, abs=1e-6)


def test_pipeline_scores_ignore_arrival_times_when_timing_is_disabled() -> None:
    """Test that retimed messages score the same when the model reads no timing.

    Replaying through a broker stamps messages with wall-clock receive times;
    the shipped models disable the timing group, so their verdicts must not
    depend on when messages arrive.
    """
    settings = Settings()
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    assert "timing" in models.spec.disabled_groups
    messages = [item.message for item in _interleaved(simulate(seed=7))]
    retimed = [
        dataclasses.replace(message, received_at=1e9 + index * 0.001)
        for index, message in enumerate(messages)
    ]

    def scores(stream: list[Message]) -> dict[tuple[str, int], float]:
        pipeline = build_pipeline(settings, models)
        result = pipeline.process(stream)
        return {(s.device, s.seq): s.fused for s in result.scores}

    assert scores(retimed) == scores(messages)
