"""The evaluation report writes its page and plots from a tiny evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converters.dataset import WindowSet
from converters.evaluate import DatasetEvaluation
from converters.report import PLOTS, rf_split_importances, write_report
from converters.tabular import LabeledStreams
from sidecar.config import ModelSettings
from sidecar.features import CNN_CHANNELS, FEATURE_NAMES


def _evaluation() -> DatasetEvaluation:
    rng = np.random.default_rng(0)
    per_device = 120
    n = 2 * per_device
    labels = np.zeros(n, dtype=np.int64)
    labels[80:100] = 1
    labels[per_device + 50 : per_device + 60] = 1
    windows = WindowSet(
        vectors=np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32),
        windows=np.zeros((n, len(CNN_CHANNELS), 4), dtype=np.float32),
        labels=labels,
        attack_types=np.where(labels == 1, "fault", "normal"),
        devices=np.repeat(["fridge", "door"], per_device),
        times=np.arange(n, dtype=np.float64),
        seqs=np.tile(np.arange(per_device) + 128, 2),
    )
    scores = {
        "hybrid": np.clip(labels * 0.6 + rng.uniform(0, 0.4, n), 0, 1),
        "zscore": rng.uniform(0, 1, n),
    }
    data = LabeledStreams("tiny", {}, {}, {}, "a tiny synthetic protocol")
    return DatasetEvaluation(
        data=data,
        windows=windows,
        scored=windows.seqs >= 150,
        scores=scores,
        flags={name: values > 0.5 for name, values in scores.items()},
        thresholds={"hybrid": "cards", "zscore": "0.99 quantile"},
    )


def test_write_report_writes_the_page_and_every_plot(tmp_path: Path) -> None:
    """Test that the page embeds each PNG and the PNGs sit beside it."""
    metrics = {"hybrid": {"f1": 0.9, "fpr": 0.01}, "zscore": {"f1": 0.2, "fpr": 0.3}}

    page = write_report(_evaluation(), metrics, ModelSettings(), tmp_path / "report")

    assert page == tmp_path / "report" / "index.html"
    for name in PLOTS:
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000
    text = page.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == len(PLOTS)
    assert "a tiny synthetic protocol" in text
    assert "<td>0.9</td>" in text


def test_write_report_skips_importances_without_a_model(tmp_path: Path) -> None:
    """Test that a missing rf.onnx leaves a note instead of the plot."""
    models = ModelSettings(directory=tmp_path / "nowhere")

    page = write_report(_evaluation(), {}, models, tmp_path / "report")

    assert not (tmp_path / "report" / "importances.png").exists()
    assert "importances skipped" in page.read_text(encoding="utf-8")


def test_rf_split_importances_of_the_shipped_model_sum_to_one() -> None:
    """Test that split shares are read for every feature of the shipped RF."""
    models = ModelSettings()
    shares = rf_split_importances(models.directory / models.rf)

    assert shares is not None
    assert list(shares) == list(FEATURE_NAMES)
    assert sum(shares.values()) == 1.0 or abs(sum(shares.values()) - 1.0) < 1e-9
