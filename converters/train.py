"""Train both models on TON_IoT, tune thresholds on validation, export with cards.

One command rebuilds the shipped pair:

    anomaly-sidecar train --dataset ton_iot --data ../shared/data/ton_iot_telemetry

With `--leave-out TYPE` (repeatable) every message of those attack types is
removed from the train and validation streams before windows are built, so
neither the models nor their thresholds ever see that type; scoring the test
split then measures how the pair copes with an attack it was not trained on
(its `per_type_recall`). Such a pair is for measurement, not for shipping.

Steps: load the leak-free splits (converters.ton_iot), turn each split into
windows through the live feature code, train the RandomForest and the CNN on
the train split, export both to ONNX with parity checks, tune every
threshold and the alarm lifecycle on the validation split only, measure the
inference cost, and write a model card beside each model. The test split is
not read here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from converters.dataset import WindowSet, build_windows
from converters.ton_iot import FILE_GLOB, LabeledMessage, load_splits
from converters.train_cnn import (
    CNN_INPUT,
    CNN_OUTPUT,
    cnn_parity,
    export_cnn,
    predict_cnn,
    train_cnn,
)
from converters.train_rf import RF_INPUT, RF_OUTPUT, export_rf, rf_parity, train_rf
from sidecar.calibration import Calibration, calibrate_offline
from sidecar.detector import CARD_SUFFIX
from sidecar.features import CNN_CHANNELS, FEATURE_NAMES, FeatureSpec
from sidecar.verdicts import AlarmLifecycle

__all__ = [
    "FPR_BUDGET",
    "TON_IOT_SPEC",
    "LifecycleChoice",
    "best_threshold",
    "leave_out_types",
    "simulate_lifecycle",
    "train_command",
    "tune_cascade",
]

_LOG = logging.getLogger(__name__)

# TON_IoT's message timing and payload sizes are artefacts of how the data was
# sampled and exported (SOURCE.md quirk 5), and levels measured against a
# young baseline do not carry across its day-separated blocks: the models
# shipped from it read only the shape of each device's window. Chosen on the
# validation split: shape-only features ranked attacks best there.
TON_IOT_SPEC = FeatureSpec(
    window=32,
    warmup=128,
    memory=1000,
    learn_z=4.0,
    max_keys=32,
    disabled_groups=("level", "timing", "size"),
)
# Per-device score calibration (sidecar.calibration) tried on validation:
# off, or each device's scores read against the median of its own first 64
# scored windows. The one with the better validation F1 ships.
CALIBRATIONS = (Calibration(windows=0), Calibration(windows=64, quantile=0.5))
# Largest false-positive rate a tuned threshold may have on validation: a
# detector that cries wolf is switched off, and the published windowed-RF
# reference on this data sat at 0.35.
FPR_BUDGET = 0.15
# Shares of validation attacks the front filter may pass on to the CNN; the
# tuning tries each (a permissive filter costs CNN runs, a strict one recall).
RF_FILTER_RECALLS = (0.95, 0.9, 0.8)
# Candidate CNN thresholds (quantiles of its scores on flagged windows): the
# CNN's own veto, from none to moderate.
CNN_QUANTILES = (0.0, 0.25, 0.5)
# Candidate thresholds on the fused score (quantiles on flagged windows).
FUSED_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Lifecycle settings tried on validation: windows to raise, windows to clear.
ALARM_AFTER_CHOICES = (1, 2, 3, 5)
CLEAR_AFTER_CHOICES = (1, 4, 16, 64)
# Inference cost is timed at this batch size, the sidecar's default.
COST_BATCH = 256
COST_REPEATS = 20
LIBRARIES = ("numpy", "scikit-learn", "skl2onnx", "onnx", "onnxruntime", "torch")


@dataclass(frozen=True)
class LifecycleChoice:
    """A tuned cascade: thresholds, lifecycle and its validation figures."""

    rf_threshold: float
    cnn_threshold: float
    fused_threshold: float
    alarm_after: int
    clear_after: int
    f1: float
    fpr: float
    recall: float


def _rates(
    labels: npt.NDArray[np.int64], flags: npt.NDArray[np.bool_]
) -> tuple[float, float, float]:
    positives = labels == 1
    true_positive = float(np.sum(flags & positives))
    recall = true_positive / max(float(positives.sum()), 1.0)
    precision = true_positive / max(float(flags.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = float(np.mean(flags[~positives])) if (~positives).any() else 0.0
    return f1, fpr, recall


def best_threshold(
    labels: npt.NDArray[np.int64],
    scores: npt.NDArray[np.float64],
    fpr_budget: float = FPR_BUDGET,
) -> float:
    """Return the threshold with the best F1 whose FPR stays within the budget.

    >>> labels = np.array([0, 0, 0, 1, 1])
    >>> best_threshold(labels, np.array([0.1, 0.2, 0.3, 0.8, 0.9]), 0.0)
    0.3
    """
    best = (-1.0, 1.0)
    for threshold in np.unique(np.round(scores, 4)):
        f1, fpr, _ = _rates(labels, scores > threshold)
        if fpr <= fpr_budget and f1 > best[0]:
            best = (f1, float(threshold))
    return best[1]


def simulate_lifecycle(
    windows: WindowSet,
    confirmed: npt.NDArray[np.bool_],
    alarm_after: int,
    clear_after: int,
) -> npt.NDArray[np.bool_]:
    """Replay confirmations through the live `AlarmLifecycle`; return in-alarm flags."""
    lifecycle = AlarmLifecycle(alarm_after, clear_after)
    in_alarm = np.zeros(len(confirmed), dtype=bool)
    order = np.lexsort((windows.seqs, windows.devices))
    devices = windows.devices.tolist()
    for row in order.tolist():
        lifecycle.step(devices[row], bool(confirmed[row]))
        in_alarm[row] = lifecycle.in_alarm(devices[row])
    return in_alarm


def tune_cascade(
    windows: WindowSet,
    rf_scores: npt.NDArray[np.float64],
    cnn_scores: npt.NDArray[np.float64],
) -> LifecycleChoice:
    """Pick the filter, CNN and fused thresholds and the lifecycle on validation.

    The choice with the best F1 whose false-positive rate stays within
    `FPR_BUDGET` wins; windows are replayed through the live lifecycle.
    """
    attacks = np.sort(rf_scores[windows.labels == 1])
    best: LifecycleChoice | None = None
    for filter_recall in RF_FILTER_RECALLS:
        cut = int((1.0 - filter_recall) * len(attacks))
        # Never below 0: calibrated scores at or under a device's own median
        # stay out of the CNN's way, so the filter always filters.
        rf_threshold = max(float(attacks[cut]) - 1e-6, 0.0) if len(attacks) else 0.5
        flagged = rf_scores > rf_threshold
        fused = np.where(flagged, (rf_scores + cnn_scores) / 2.0, rf_scores / 2.0)
        for cnn_threshold in _quantiles(cnn_scores[flagged], CNN_QUANTILES):
            vetted = flagged & (cnn_scores > cnn_threshold)
            for fused_threshold in _quantiles(fused[vetted], FUSED_QUANTILES):
                confirmed = vetted & (fused > fused_threshold)
                for alarm_after in ALARM_AFTER_CHOICES:
                    for clear_after in CLEAR_AFTER_CHOICES:
                        flags = simulate_lifecycle(
                            windows, confirmed, alarm_after, clear_after
                        )
                        f1, fpr, recall = _rates(windows.labels, flags)
                        if fpr > FPR_BUDGET or (best is not None and f1 <= best.f1):
                            continue
                        best = LifecycleChoice(
                            rf_threshold,
                            cnn_threshold,
                            fused_threshold,
                            alarm_after,
                            clear_after,
                            f1,
                            fpr,
                            recall,
                        )
    if best is None:
        message = f"no cascade setting keeps validation FPR within {FPR_BUDGET}"
        raise RuntimeError(message)
    return best


def _quantiles(values: npt.NDArray[np.float64], shares: Sequence[float]) -> list[float]:
    """Distinct rounded quantiles of `values`, just below each so it passes."""
    if not len(values):
        return [0.5]
    found = np.unique(np.round(np.quantile(values, shares), 4) - 1e-4)
    return [max(float(value), 0.0) for value in found]


def _inference_cost_us(run: Any, inputs: npt.NDArray[np.float32]) -> float:
    batch = inputs[:COST_BATCH]
    run(batch)
    started = time.perf_counter()
    for _ in range(COST_REPEATS):
        run(batch)
    elapsed = time.perf_counter() - started
    return round(elapsed / (COST_REPEATS * len(batch)) * 1e6, 3)


def _libraries() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def _data_files(folder: Path) -> list[dict[str, str]]:
    files = []
    for path in sorted(folder.glob(FILE_GLOB)):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        files.append({"file": path.name, "sha256": digest})
    return files


def _split_summary(windows: WindowSet) -> dict[str, Any]:
    return {
        "windows": len(windows),
        "attack_windows": int(windows.labels.sum()),
        "devices": sorted(set(windows.devices.tolist())),
    }


def _write_card(path: Path, card: dict[str, Any]) -> None:
    path.write_text(
        json.dumps(card, indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    _LOG.info("model card written path=%s", path)


def leave_out_types(
    streams: Mapping[str, Sequence[LabeledMessage]], types: Sequence[str]
) -> dict[str, list[LabeledMessage]]:
    """Drop every message of the given attack types from each stream.

    >>> from sidecar.stream import Message
    >>> kept = leave_out_types(
    ...     {"d": [LabeledMessage("d", Message("t", b"1", 0.0), 1, "xss")]}, ["xss"]
    ... )
    >>> kept
    {'d': []}
    """
    left_out = set(types)
    return {
        device: [item for item in stream if item.attack_type not in left_out]
        for device, stream in streams.items()
    }


def train_command(
    data: Path, out: Path, seed: int, leave_out: Sequence[str] = ()
) -> int:
    """Train, tune, export and document both models; return the exit code.

    Args:
        data: The TON_IoT folder.
        out: Where the models and their cards are written.
        seed: Seeds both models.
        leave_out: Attack types removed from train and validation (see the
            module docstring); empty for the shipped pair.
    """
    spec = TON_IOT_SPEC
    started = time.monotonic()
    splits = load_splits(data)
    for name in ("train", "validation"):
        splits[name] = leave_out_types(splits[name], leave_out)
    if leave_out:
        _LOG.info("attack types left out types=%s", ",".join(sorted(leave_out)))
    train = build_windows(splits["train"], spec)
    validation = build_windows(splits["validation"], spec)
    _LOG.info(
        "windows built train=%d validation=%d seconds=%.0f",
        len(train),
        len(validation),
        time.monotonic() - started,
    )

    out.mkdir(parents=True, exist_ok=True)
    rf_path, cnn_path = out / "rf.onnx", out / "cnn.onnx"
    rf_model = train_rf(train.vectors, train.labels, seed)
    export_rf(rf_model, rf_path)
    cnn_model = train_cnn(train.windows, train.labels, seed)
    export_cnn(cnn_model, cnn_path, spec.window)

    rf_parity_report = rf_parity(rf_model, rf_path, validation.vectors)
    cnn_parity_report = cnn_parity(cnn_model, cnn_path, validation.windows)
    rf_raw = rf_model.predict_proba(validation.vectors)[:, 1].astype(np.float64)
    cnn_raw = predict_cnn(cnn_model, validation.windows, 4096).astype(np.float64)
    tuned = []
    for candidate in CALIBRATIONS:
        rf_cal, cnn_cal, learning = calibrate_offline(
            rf_raw, cnn_raw, validation.devices, validation.seqs, candidate
        )
        part = validation.subset(~learning)
        choice = tune_cascade(part, rf_cal[~learning], cnn_cal[~learning])
        _LOG.info(
            "cascade tuned calibration=%s %s",
            candidate.to_dict(),
            " ".join(f"{k}={v}" for k, v in asdict(choice).items()),
        )
        tuned.append(
            (choice.f1, choice, candidate, part, rf_cal[~learning], cnn_cal[~learning])
        )
    _, choice, calibration, validation, rf_scores, cnn_scores = max(
        tuned, key=lambda item: item[0]
    )
    rf_alone = best_threshold(validation.labels, rf_scores)
    cnn_alone = best_threshold(validation.labels, cnn_scores)

    version = datetime.now(UTC).strftime("%Y%m%d") + f"-s{seed}"
    common: dict[str, Any] = {
        "version": version,
        "feature_spec": spec.to_dict(),
        "lifecycle": {
            "alarm_after": choice.alarm_after,
            "clear_after": choice.clear_after,
        },
        "seed": seed,
        "libraries": _libraries(),
        "training_data": {
            "dataset": "TON_IoT telemetry (Train_Test_IoT_*.csv)",
            "files": _data_files(data),
            "protocol": (
                "SOURCE.md leak-free protocol; each contiguous block of one type "
                "cut in time order 60/20/20 into train/validation/test; models fit "
                "on train; thresholds and lifecycle tuned on validation; test unread"
            ),
            "left_out_attack_types": sorted(leave_out),
            "train": _split_summary(train),
            "validation": _split_summary(validation),
        },
        "validation_metrics": {
            "hybrid": {"f1": choice.f1, "fpr": choice.fpr, "recall": choice.recall},
            "rf_alone": dict(
                zip(
                    ("f1", "fpr", "recall"),
                    _rates(validation.labels, rf_scores > rf_alone),
                    strict=True,
                )
            ),
            "cnn_alone": dict(
                zip(
                    ("f1", "fpr", "recall"),
                    _rates(validation.labels, cnn_scores > cnn_alone),
                    strict=True,
                )
            ),
        },
        "fpr_budget": FPR_BUDGET,
        "calibration": calibration.to_dict(),
    }
    from sidecar.config import ModelSettings
    from sidecar.detector import OnnxModel

    settings = ModelSettings(directory=out)
    _write_card(
        rf_path.with_suffix("").with_suffix(CARD_SUFFIX),
        {
            "name": "rf",
            "kind": "RandomForestClassifier front filter",
            "file": rf_path.name,
            "input": RF_INPUT,
            "output": RF_OUTPUT,
            "output_column": 1,
            "features": list(FEATURE_NAMES),
            "thresholds": {"cascade": choice.rf_threshold, "alone": rf_alone},
            "parity": asdict(rf_parity_report),
            **common,
        },
    )
    _write_card(
        cnn_path.with_suffix("").with_suffix(CARD_SUFFIX),
        {
            "name": "cnn",
            "kind": "1D-CNN confirmer",
            "file": cnn_path.name,
            "input": CNN_INPUT,
            "output": CNN_OUTPUT,
            "channels": list(CNN_CHANNELS),
            "thresholds": {
                "cascade": choice.cnn_threshold,
                "fused": choice.fused_threshold,
                "alone": cnn_alone,
            },
            "parity": asdict(cnn_parity_report),
            **common,
        },
    )
    rf_runtime = OnnxModel(rf_path, settings)
    cnn_runtime = OnnxModel(cnn_path, settings)
    costs = {
        "rf": _inference_cost_us(rf_runtime.score, validation.vectors),
        "cnn": _inference_cost_us(cnn_runtime.score, validation.windows),
    }
    for name, path in (("rf", rf_path), ("cnn", cnn_path)):
        card_file = path.with_suffix("").with_suffix(CARD_SUFFIX)
        card = json.loads(card_file.read_text(encoding="utf-8"))
        card["inference_cost"] = {
            "microseconds_per_row": costs[name],
            "batch": COST_BATCH,
            "threads": 1,
            "measured_on": "the training machine, onnxruntime CPU",
        }
        _write_card(card_file, card)
    _LOG.info("training done seconds=%.0f", time.monotonic() - started)
    return 0
