"""Score the models and the baselines on a dataset, in process or through a broker.

Three detectors are scored side by side on the same windows (and, on
request, the baselines of `converters.baselines` beside them):
- `hybrid`: the live cascade with its alarm lifecycle; a window counts as
  flagged while its device is in alarm; ranked by the fused score.
- `rf`: the RandomForest alone, each window against its own tuned threshold.
- `cnn`: the CNN alone on every window, against its own tuned threshold.

Metrics are per scored window (one per message after a device's warm-up).
Detection delay is measured per attack episode (a contiguous run of one
attack type on one device) from its first message to its first flagged
window, in the data's own time. Datasets whose protocol defines more (SKAB's
false-alarm and missed-alarm rates, NAB's score) get those too, from
`dataset_metrics`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from converters.baselines import run_baselines
from converters.dataset import WindowSet, build_windows
from converters.nab import PROFILES, REPORT_KEYS, NabFile, alarm_onsets, corpus_score
from converters.replay import interleave, replay
from converters.tabular import LabeledStreams, check_routing
from converters.ton_iot import LabeledMessage
from sidecar.calibration import calibrate_offline
from sidecar.config import Settings
from sidecar.detector import LoadedModels
from sidecar.mqtt import MqttAdapter
from sidecar.pipeline import WindowScore
from sidecar.service import Service, build_pipeline
from sidecar.stream import Message
from sidecar.topics import SCORES_LEVEL

__all__ = [
    "DETECTORS",
    "DatasetEvaluation",
    "EvaluationInputs",
    "dataset_metrics",
    "detector_metrics",
    "evaluate_dataset",
    "evaluate_offline",
    "evaluate_through_broker",
    "format_table",
]

_LOG = logging.getLogger(__name__)

DETECTORS = ("hybrid", "rf", "cnn")
# Messages per second when replaying through a broker: well under what the
# sidecar processes, so nothing is shed and both runs see the same windows.
BROKER_REPLAY_RATE = 1000.0
# After the replay, scores still in flight get this long to arrive.
SCORE_SETTLE_S = 20.0
CONNECT_TIMEOUT_S = 10.0
SECONDS_PER_HOUR = 3600.0
# Datasets whose protocol reports false-alarm and missed-alarm rates in %
# (SKAB's leaderboard), and those scored by the NAB scorer.
OUTLIER_RATE_DATASETS = frozenset({"skab"})
NAB_DATASETS = frozenset({"nab"})


@dataclass(frozen=True)
class EvaluationInputs:
    """The labeled windows of a split and every detector's view of them."""

    windows: WindowSet
    scores: dict[str, npt.NDArray[np.float64]]
    flags: dict[str, npt.NDArray[np.bool_]]


def _episodes(windows: WindowSet) -> list[npt.NDArray[np.int64]]:
    """Index arrays of each contiguous attack run of one type on one device."""
    episodes: list[npt.NDArray[np.int64]] = []
    for device in np.unique(windows.devices):
        rows = np.flatnonzero(windows.devices == device)
        rows = rows[np.argsort(windows.seqs[rows], kind="stable")]
        start = None
        for position, row in enumerate(rows):
            attack = windows.labels[row] == 1
            same = (
                start is not None
                and windows.attack_types[row] == windows.attack_types[rows[start]]
            )
            if attack and not same:
                if start is not None:
                    episodes.append(rows[start:position])
                start = position
            elif not attack and start is not None:
                episodes.append(rows[start:position])
                start = None
        if start is not None:
            episodes.append(rows[start:])
    return episodes


def _false_alarm_onsets(windows: WindowSet, flags: npt.NDArray[np.bool_]) -> int:
    """Count flag onsets (a flagged window after an unflagged one) on normal windows."""
    onsets = 0
    for device in np.unique(windows.devices):
        rows = np.flatnonzero(windows.devices == device)
        rows = rows[np.argsort(windows.seqs[rows], kind="stable")]
        previous = np.concatenate([[False], flags[rows][:-1]])
        onsets += int(np.sum(flags[rows] & ~previous & (windows.labels[rows] == 0)))
    return onsets


def detector_metrics(
    windows: WindowSet,
    flags: npt.NDArray[np.bool_],
    scores: npt.NDArray[np.float64],
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1, FPR, ROC AUC, per-type recall, delay."""
    labels = windows.labels
    negatives = labels == 0
    fpr = float(np.mean(flags[negatives])) if negatives.any() else float("nan")
    per_type = {
        str(kind): round(float(np.mean(flags[windows.attack_types == kind])), 4)
        for kind in sorted(set(windows.attack_types[labels == 1].tolist()))
    }
    delays = []
    type_delays: dict[str, list[float]] = {}
    detected = 0
    carried = 0
    episodes = _episodes(windows)
    for rows in episodes:
        hits = rows[flags[rows]]
        if len(hits):
            detected += 1
            carried += bool(flags[rows[0]])
            delays.append(float(windows.times[hits[0]] - windows.times[rows[0]]))
            kind = str(windows.attack_types[rows[0]])
            type_delays.setdefault(kind, []).append(delays[-1])
    false_alarms = _false_alarm_onsets(windows, flags)
    hours = (
        float(windows.times.max() - windows.times.min()) / SECONDS_PER_HOUR
        if len(windows)
        else 0.0
    )
    both_classes = len(np.unique(labels)) == 2
    return {
        "accuracy": round(float(accuracy_score(labels, flags)), 4),
        "precision": round(float(precision_score(labels, flags, zero_division=0)), 4),
        "recall": round(float(recall_score(labels, flags, zero_division=0)), 4),
        "f1": round(float(f1_score(labels, flags, zero_division=0)), 4),
        "fpr": round(fpr, 4),
        "roc_auc": round(float(roc_auc_score(labels, scores)), 4)
        if both_classes
        else None,
        "per_type_recall": per_type,
        "median_delay_s": round(float(np.median(delays)), 2) if delays else None,
        "per_type_median_delay_s": {
            kind: round(float(np.median(values)), 2)
            for kind, values in sorted(type_delays.items())
        },
        # Alarm onsets on a normal window, against the wall-clock span of the
        # scored windows (all devices share one timeline in a live replay).
        "false_alarms": false_alarms,
        "false_alarms_per_hour": round(false_alarms / hours, 2) if hours else None,
        "episodes": len(episodes),
        "episodes_detected": detected,
        # Episodes whose first window was already flagged, usually because an
        # alarm from the attack just before was still standing; their delay
        # counts as 0.
        "episodes_flagged_at_start": carried,
        "windows": len(labels),
        "attack_windows": int(labels.sum()),
    }


def _standalone_scores(
    models: LoadedModels, windows: WindowSet
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    rf = models.rf.score(windows.vectors).astype(np.float64)
    cnn = np.concatenate(
        [
            models.cnn.score(windows.windows[start : start + 4096])
            for start in range(0, max(len(windows), 1), 4096)
        ]
    ).astype(np.float64)
    return rf, cnn


def _scored_part(
    models: LoadedModels, windows: WindowSet
) -> tuple[WindowSet, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Calibrate standalone scores per device; keep the windows past learning."""
    rf_raw, cnn_raw = _standalone_scores(models, windows)
    rf, cnn, learning = calibrate_offline(
        rf_raw, cnn_raw, windows.devices, windows.seqs, models.cascade.calibration
    )
    keep = ~learning
    return windows.subset(keep), rf[keep], cnn[keep]


def _hybrid_in_process(
    settings: Settings,
    models: LoadedModels,
    streams: Mapping[str, Sequence[LabeledMessage]],
) -> dict[tuple[str, int], WindowScore]:
    """Run the live pipeline over the streams, without a broker."""
    pipeline = build_pipeline(settings, models)
    found: dict[tuple[str, int], WindowScore] = {}
    batch_size = settings.limits.batch_size
    ordered = [item.message for item in interleave(streams)]
    for start in range(0, len(ordered), batch_size):
        result = pipeline.process(ordered[start : start + batch_size])
        for score in result.scores:
            if not score.learning:
                found[(score.device, score.seq)] = score
    return found


def _inputs_from_scores(
    windows: WindowSet,
    hybrid: Mapping[tuple[str, int], WindowScore],
    rf: npt.NDArray[np.float64],
    cnn: npt.NDArray[np.float64],
    models: LoadedModels,
) -> EvaluationInputs:
    keys = list(zip(windows.devices.tolist(), windows.seqs.tolist(), strict=True))
    missing = sum(1 for key in keys if key not in hybrid)
    if missing:
        _LOG.warning(
            "windows without a hybrid score missing=%d of=%d", missing, len(keys)
        )
    fused = np.array([hybrid[key].fused if key in hybrid else 0.0 for key in keys])
    alarm = np.array([hybrid[key].in_alarm if key in hybrid else False for key in keys])
    return EvaluationInputs(
        windows=windows,
        scores={"hybrid": fused, "rf": rf, "cnn": cnn},
        flags={
            "hybrid": alarm,
            "rf": rf > models.rf.card.threshold("alone"),
            "cnn": cnn > models.cnn.card.threshold("alone"),
        },
    )


def evaluate_offline(
    settings: Settings,
    models: LoadedModels,
    streams: Mapping[str, Sequence[LabeledMessage]],
) -> EvaluationInputs:
    """Score every detector on the streams through the in-process pipeline."""
    windows = build_windows(streams, models.spec, settings.limits.max_payload_bytes)
    windows, rf, cnn = _scored_part(models, windows)
    hybrid = _hybrid_in_process(settings, models, streams)
    return _inputs_from_scores(windows, hybrid, rf, cnn, models)


class _ScoreCollector:
    """Subscribe to the sidecar's score topics and keep each window's scores."""

    def __init__(self, settings: Settings) -> None:
        self.scores: dict[tuple[str, int], WindowScore] = {}
        self.lock = threading.Lock()
        self._prefix = f"{settings.output.prefix}/{SCORES_LEVEL}/"
        broker = settings.broker.model_copy(
            update={"client_id": f"{settings.broker.client_id}-scores"}
        )
        self.adapter = MqttAdapter(broker, [self._prefix + "#"], None, self._on_message)

    def _on_message(self, message: Message) -> None:
        document = json.loads(message.payload)
        device = str(document["device"])
        cnn = document["cnn"]
        score = WindowScore(
            device=device,
            seq=int(document["seq"]),
            topic=message.topic,
            received_at=message.received_at,
            rf=float(document["rf"]),
            cnn=float("nan") if cnn is None else float(cnn),
            fused=float(document["fused"]),
            confirmed=bool(document["confirmed"]),
            in_alarm=bool(document["in_alarm"]),
            learning=bool(document["learning"]),
        )
        with self.lock:
            self.scores[(device, score.seq)] = score


def evaluate_through_broker(
    settings: Settings,
    models: LoadedModels,
    streams: Mapping[str, Sequence[LabeledMessage]],
    rate: float = BROKER_REPLAY_RATE,
) -> tuple[EvaluationInputs, dict[str, int]]:
    """Replay the streams into the configured broker and score what comes back.

    The sidecar runs as in production (its own MQTT connection, queue and
    worker) with per-window scores published, which a collector reads back.

    Returns:
        The evaluation inputs and the sidecar's counters after the run.
    """
    settings = settings.model_copy(
        update={"output": settings.output.model_copy(update={"publish_scores": True})}
    )
    collector = _ScoreCollector(settings)
    collector.adapter.start()
    service = Service(settings, models)
    service.start()
    if not (
        collector.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        and service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
    ):
        service.stop()
        collector.adapter.stop()
        message = f"cannot reach broker {settings.broker.host}:{settings.broker.port}"
        raise ConnectionError(message)

    ordered = list(interleave(streams))
    replay(settings.broker, ordered, rate)
    windows = build_windows(streams, models.spec, settings.limits.max_payload_bytes)
    deadline = time.monotonic() + SCORE_SETTLE_S
    while time.monotonic() < deadline:
        with collector.lock:
            if len(collector.scores) >= len(windows):
                break
        time.sleep(0.2)
    service.stop()
    collector.adapter.stop()

    windows, rf, cnn = _scored_part(models, windows)
    inputs = _inputs_from_scores(windows, collector.scores, rf, cnn, models)
    return inputs, service.counters


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Render the detectors' headline metrics side by side as text.

    Protocol-specific columns (FAR, MAR, NAB scores) appear when any
    detector has them.
    """
    columns = [
        "accuracy",
        "precision",
        "recall",
        "f1",
        "fpr",
        "roc_auc",
        "median_delay_s",
    ]
    columns += [
        name
        for name in ("far", "mar", "nab_standard", "nab_low_fp", "nab_low_fn")
        if any(name in metrics for metrics in results.values())
    ]
    lines = ["detector  " + "  ".join(f"{name:>14}" for name in columns)]
    for detector, metrics in results.items():
        cells = []
        for name in columns:
            value = metrics.get(name)
            cells.append(f"{'-' if value is None else value:>14}")
        lines.append(f"{detector:<8}  " + "  ".join(cells))
    return "\n".join(lines)


@dataclass(frozen=True)
class DatasetEvaluation:
    """Every detector's view of every window of a dataset, fit part included.

    Attributes:
        data: The dataset's streams and protocol.
        windows: Every window of `data.streams` past warm-up (and past
            per-device calibration, when the models calibrate).
        scored: Which windows count in the metrics (past each device's fit
            part).
        scores: Detector -> one score per window, higher is more anomalous.
        flags: Detector -> whether it flags each window.
        thresholds: Detector -> how its threshold was chosen.
    """

    data: LabeledStreams
    windows: WindowSet
    scored: npt.NDArray[np.bool_]
    scores: dict[str, npt.NDArray[np.float64]]
    flags: dict[str, npt.NDArray[np.bool_]]
    thresholds: dict[str, str]

    def inputs(self) -> EvaluationInputs:
        """Return the scored part only, as `detector_metrics` reads it."""
        keep = self.scored
        return EvaluationInputs(
            windows=self.windows.subset(keep),
            scores={name: values[keep] for name, values in self.scores.items()},
            flags={name: values[keep] for name, values in self.flags.items()},
        )


def _fit_is_prefix(data: LabeledStreams) -> bool:
    """Whether each fit stream is the start of its stream, up to `scored_from`."""
    for device, fit in data.fit_streams.items():
        stream = data.streams.get(device)
        if stream is None or len(fit) != data.scored_from.get(device, 0):
            return False
        if fit and fit[-1] is not stream[len(fit) - 1]:
            return False
    return True


def _tuned_on(models: LoadedModels) -> str:
    """Where the cards say their thresholds were tuned."""
    on = models.rf.card.data.get("validation_metrics", {}).get("on")
    return str(on) if on else "TON_IoT validation"


def evaluate_dataset(
    settings: Settings,
    models: LoadedModels,
    data: LabeledStreams,
    *,
    baselines: bool = False,
    seed: int = 0,
) -> DatasetEvaluation:
    """Score the hybrid, RF, CNN and optionally the baselines on one dataset.

    All detectors see the same windows; the baselines learn only from the
    dataset's fit part (see `converters.baselines`).
    """
    settings = data.settings_for(settings)
    check_routing(data.streams, settings)
    max_bytes = settings.limits.max_payload_bytes
    windows = build_windows(data.streams, models.spec, max_bytes)
    windows, rf, cnn = _scored_part(models, windows)
    hybrid = _hybrid_in_process(settings, models, data.streams)
    inputs = _inputs_from_scores(windows, hybrid, rf, cnn, models)
    starts = np.array(
        [data.scored_from.get(str(device), 0) for device in windows.devices],
        dtype=np.int64,
    )
    scored = windows.seqs >= starts
    scores = dict(inputs.scores)
    flags = dict(inputs.flags)
    tuned_on = _tuned_on(models)
    thresholds = {
        "hybrid": f"model cards (tuned on {tuned_on}); alarm lifecycle",
        "rf": f"RF card threshold for use alone ({tuned_on})",
        "cnn": f"CNN card threshold for use alone ({tuned_on})",
    }
    if baselines:
        fit_windows = (
            windows.subset(~scored)
            if _fit_is_prefix(data)
            else build_windows(data.fit_streams, models.spec, max_bytes)
        )
        for name, result in run_baselines(
            data, windows, fit_windows, models.spec.warmup, seed
        ).items():
            scores[name] = result.scores
            flags[name] = result.flags
            thresholds[name] = result.threshold
    _LOG.info(
        "dataset evaluated dataset=%s windows=%d scored=%d detectors=%s",
        data.dataset,
        len(windows),
        int(scored.sum()),
        ",".join(scores),
    )
    return DatasetEvaluation(data, windows, scored, scores, flags, thresholds)


def _nab_scores(
    evaluation: DatasetEvaluation, flags: npt.NDArray[np.bool_]
) -> dict[str, float]:
    """The three normalised NAB scores of a detector's alarm onsets, and their count."""
    data, windows = evaluation.data, evaluation.windows
    files = {
        device: NabFile(len(stream), tuple(data.windows.get(device, ())))
        for device, stream in data.streams.items()
    }
    detections = {}
    for device in files:
        rows = np.flatnonzero(windows.devices == device)
        rows = rows[np.argsort(windows.seqs[rows], kind="stable")]
        detections[device] = alarm_onsets(windows.seqs[rows], flags[rows])
    scores: dict[str, float] = {
        REPORT_KEYS[name]: round(corpus_score(files, detections, profile), 2)
        for name, profile in PROFILES.items()
    }
    # How many alarm onsets the NAB scorer saw, past each file's probation.
    scores["nab_detections"] = sum(
        sum(1 for row in rows if row >= files[device].probation)
        for device, rows in detections.items()
    )
    return scores


def dataset_metrics(evaluation: DatasetEvaluation) -> dict[str, dict[str, Any]]:
    """Per detector: the window metrics, plus what the dataset's protocol adds.

    SKAB adds `far` and `mar` (false-alarm and missed-alarm rates, in %);
    NAB adds `nab_standard`, `nab_low_fp` and `nab_low_fn`.
    """
    inputs = evaluation.inputs()
    results: dict[str, dict[str, Any]] = {}
    for name in evaluation.scores:
        metrics = detector_metrics(
            inputs.windows, inputs.flags[name], inputs.scores[name]
        )
        if evaluation.data.dataset in OUTLIER_RATE_DATASETS:
            metrics["far"] = round(100.0 * metrics["fpr"], 2)
            metrics["mar"] = round(100.0 * (1.0 - metrics["recall"]), 2)
        if evaluation.data.dataset in NAB_DATASETS:
            metrics.update(_nab_scores(evaluation, evaluation.flags[name]))
        metrics["threshold"] = evaluation.thresholds[name]
        results[name] = metrics
    return results
