"""The detector contract and its ONNX implementation: RF filter, CNN confirmer.

Every score in this module is a probability-like number in [0, 1] where a
higher score means more anomalous. Scoring is kept apart from deciding: a
`Threshold` turns scores into decisions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from sidecar.calibration import Calibration, DeviceCalibration, calibrated
from sidecar.config import DetectionSettings, ModelSettings
from sidecar.errors import ConfigError, ModelLoadError
from sidecar.features import CNN_CHANNELS, FEATURE_NAMES, FeatureSpec

__all__ = [
    "CARD_SUFFIX",
    "Cascade",
    "CascadeScores",
    "ModelCard",
    "OnnxModel",
    "RowLimits",
    "Scorer",
    "Threshold",
    "card_path",
    "load_cascade",
]

_LOG = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
CARD_SUFFIX = ".card.json"


class Scorer(Protocol):
    """Anything that scores a batch of inputs; higher means more anomalous."""

    def score(self, inputs: FloatArray) -> FloatArray:
        """Return one score in [0, 1] per input row."""
        ...


@dataclass(frozen=True, slots=True)
class Threshold:
    """Decide which scores are anomalous: strictly above `value`.

    >>> Threshold(0.5).decide(np.array([0.2, 0.5, 0.9], dtype=np.float32))
    array([False, False,  True])
    """

    value: float

    def decide(
        self, scores: FloatArray | npt.NDArray[np.float64]
    ) -> npt.NDArray[np.bool_]:
        """Return True where a score is above the threshold."""
        return np.asarray(scores > self.value)


@dataclass(frozen=True)
class ModelCard:
    """What a shipped model is, as written beside it by the converters."""

    path: Path
    data: dict[str, Any]

    @property
    def name(self) -> str:
        """The model's short name (`rf`, `cnn`)."""
        return str(self.data["name"])

    @property
    def version(self) -> str:
        """The model's version string."""
        return str(self.data["version"])

    @property
    def spec(self) -> FeatureSpec:
        """The window and baseline settings the model was trained with."""
        return FeatureSpec.from_dict(self.data["feature_spec"])

    def threshold(self, use: str) -> float:
        """Return the threshold tuned for `cascade` or `alone` use."""
        return float(self.data["thresholds"][use])

    def lifecycle(self) -> tuple[int, int]:
        """Return the tuned (alarm_after, clear_after)."""
        lifecycle = self.data["lifecycle"]
        return int(lifecycle["alarm_after"]), int(lifecycle["clear_after"])

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read a card.

        Raises:
            ModelLoadError: If it is missing, not JSON, or lacks required keys.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelLoadError(str(path), f"unreadable model card ({err})") from err
        required = {"name", "version", "input", "output", "feature_spec", "thresholds"}
        missing = sorted(required - set(data))
        if missing:
            raise ModelLoadError(str(path), f"model card lacks keys {missing}")
        return cls(path, data)


def card_path(model_path: Path) -> Path:
    """Return the card file that sits beside a model file."""
    return model_path.with_suffix("").with_suffix(CARD_SUFFIX)


class OnnxModel:
    """One ONNX model served with onnxruntime, fed and read as its card says."""

    def __init__(self, path: Path, settings: ModelSettings) -> None:
        self.path = path
        self.card = ModelCard.load(card_path(path))
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.inter_op_num_threads = settings.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        spinning = "1" if settings.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        try:
            model_bytes = path.read_bytes()
            self._session = ort.InferenceSession(
                model_bytes, options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(str(path), str(err)) from err
        self._input = str(self.card.data["input"])
        self._output = str(self.card.data["output"])
        self._column = self.card.data.get("output_column")
        # Called with (seconds, rows) after every run; the metrics endpoint
        # hangs its latency histogram here.
        self.on_run: Callable[[float, int], None] | None = None
        digest = hashlib.sha256(model_bytes).hexdigest()[:12]
        _LOG.info(
            "model loaded name=%s version=%s path=%s sha256=%s opset=%s seed=%s",
            self.card.name,
            self.card.version,
            path,
            digest,
            self.card.data.get("opset"),
            self.card.data.get("seed"),
        )

    def score(self, inputs: FloatArray) -> FloatArray:
        """Run the model on a batch; return P(anomaly) per row."""
        if not len(inputs):
            return np.zeros(0, dtype=np.float32)
        batch = np.ascontiguousarray(inputs, dtype=np.float32)
        # No NaN or infinity may reach onnxruntime (pitfalls.md #10).
        if not np.isfinite(batch).all():
            batch = np.nan_to_num(batch, nan=0.0, posinf=0.0, neginf=0.0)
        started = time.perf_counter()
        output = self._session.run([self._output], {self._input: batch})[0]
        if self.on_run is not None:
            self.on_run(time.perf_counter() - started, len(batch))
        scores = np.asarray(output, dtype=np.float32)
        if self._column is not None:
            scores = scores[:, int(self._column)]
        return scores.reshape(len(batch))


@dataclass(frozen=True, slots=True)
class RowLimits:
    """Per-row thresholds, for batches where some devices have their own."""

    rf: npt.NDArray[np.float64]
    cnn: npt.NDArray[np.float64]
    fused: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CascadeScores:
    """Scores of one batch of windows.

    Attributes:
        rf: Calibrated RandomForest score for every window (0 while learning).
        cnn: Calibrated CNN score where it ran on a flagged window, NaN
            elsewhere.
        fused: One score per window: (rf + cnn) / 2 when the CNN ran, rf / 2
            otherwise, so every flagged window ranks above every unflagged one.
        confirmed: Whether the window is confirmed as anomalous.
        learning: Whether the window was spent learning its device's reference.
    """

    rf: npt.NDArray[np.float64]
    cnn: npt.NDArray[np.float64]
    fused: npt.NDArray[np.float64]
    confirmed: npt.NDArray[np.bool_]
    learning: npt.NDArray[np.bool_]


class Cascade:
    """RandomForest front filter on every window; CNN confirmer on what it flags.

    Scores are first calibrated per device (see `sidecar.calibration`). A
    window is confirmed when the RF flags it (above `rf_threshold`), the CNN
    scores it above `cnn_threshold`, and the two agree strongly enough that
    their mean is above `fused_threshold`.
    """

    def __init__(
        self,
        rf: Scorer,
        cnn: Scorer,
        rf_threshold: Threshold,
        cnn_threshold: Threshold,
        fused_threshold: Threshold,
        calibration: Calibration,
    ) -> None:
        self.rf = rf
        self.cnn = cnn
        self.rf_threshold = rf_threshold
        self.cnn_threshold = cnn_threshold
        self.fused_threshold = fused_threshold
        self.calibration = calibration

    def new_device(self) -> DeviceCalibration:
        """Return an empty calibration for a device seen for the first time."""
        return DeviceCalibration(self.calibration)

    def score(
        self,
        vectors: FloatArray,
        windows: FloatArray,
        devices: Sequence[DeviceCalibration],
        limits: RowLimits | None = None,
    ) -> CascadeScores:
        """Score a batch: vectors (n, F), windows (n, C, W), each row's device.

        Rows of one device must be in stream order; rows still learning their
        device's reference are scored by both models and teach it. `limits`
        replaces the cascade's thresholds row by row (device overrides).
        """
        n = len(vectors)
        rf_raw = self.rf.score(vectors).astype(np.float64)
        cnn_raw = np.full(n, np.nan)

        # Which rows are still learning: count each device's rows in order.
        pending: dict[int, int] = {}
        learning = np.zeros(n, dtype=bool)
        for row, device in enumerate(devices):
            if device.reference is None:
                done = len(device.seen) + pending.get(id(device), 0)
                learning[row] = done < self.calibration.windows
                pending[id(device)] = pending.get(id(device), 0) + 1
        if learning.any():
            cnn_raw[learning] = self.cnn.score(windows[learning])
            for row in np.flatnonzero(learning).tolist():
                devices[row].learn(float(rf_raw[row]), float(cnn_raw[row]))

        # Every other row now has a reference, learned before or just above.
        scored = ~learning
        references = np.array(
            [d.reference if d.reference is not None else (1.0, 1.0) for d in devices]
        ).reshape(n, 2)
        rf = np.where(scored, calibrated(rf_raw, references[:, 0]), 0.0)
        if limits is None:
            limits = RowLimits(
                np.full(n, self.rf_threshold.value),
                np.full(n, self.cnn_threshold.value),
                np.full(n, self.fused_threshold.value),
            )
        flagged = scored & (rf > limits.rf)
        needed = flagged & np.isnan(cnn_raw)
        if needed.any():
            cnn_raw[needed] = self.cnn.score(windows[needed])
        cnn = np.where(flagged, calibrated(cnn_raw, references[:, 1]), np.nan)
        fused = np.where(flagged, (rf + np.nan_to_num(cnn)) / 2.0, rf / 2.0)
        confirmed = flagged & (np.nan_to_num(cnn) > limits.cnn) & (fused > limits.fused)
        return CascadeScores(rf, cnn, fused, confirmed, learning)


@dataclass(frozen=True)
class LoadedModels:
    """The cascade with the settings it was built from."""

    cascade: Cascade
    spec: FeatureSpec
    versions: dict[str, str]
    alarm_after: int
    clear_after: int
    rf: OnnxModel
    cnn: OnnxModel


def load_cascade(
    models: ModelSettings, detection: DetectionSettings, window_length: int
) -> LoadedModels:
    """Load both models, check they fit together and this config, build the cascade.

    Raises:
        ModelLoadError: If a file is missing or the models disagree with each
            other, with the feature code, or with the configured window.
    """
    rf = OnnxModel(models.directory / models.rf, models)
    cnn = OnnxModel(models.directory / models.cnn, models)
    spec = rf.card.spec
    if cnn.card.spec != spec:
        reason = f"feature spec {cnn.card.spec} differs from the RF's {spec}"
        raise ModelLoadError(str(cnn.path), reason)
    if list(rf.card.data.get("features", [])) != list(FEATURE_NAMES):
        reason = "its feature list differs from this sidecar's feature code"
        raise ModelLoadError(str(rf.path), reason)
    if list(cnn.card.data.get("channels", [])) != list(CNN_CHANNELS):
        reason = "its channel list differs from this sidecar's feature code"
        raise ModelLoadError(str(cnn.path), reason)
    if spec.window != window_length:
        problem = (
            f"window.length: the models in {models.directory} were trained on "
            f"windows of {spec.window} messages (got {window_length}); "
            f"allowed: {spec.window}"
        )
        source = "the configuration"
        raise ConfigError(source, [problem])

    def chosen(configured: float | None, card: ModelCard, use: str) -> Threshold:
        return Threshold(card.threshold(use) if configured is None else configured)

    card_alarm_after, card_clear_after = cnn.card.lifecycle()
    cascade = Cascade(
        rf,
        cnn,
        chosen(detection.rf_threshold, rf.card, "cascade"),
        chosen(detection.cnn_threshold, cnn.card, "cascade"),
        chosen(detection.fused_threshold, cnn.card, "fused"),
        Calibration.from_dict(cnn.card.data["calibration"]),
    )
    return LoadedModels(
        cascade=cascade,
        spec=spec,
        versions={"rf": rf.card.version, "cnn": cnn.card.version},
        alarm_after=detection.alarm_after or card_alarm_after,
        clear_after=detection.clear_after or card_clear_after,
        rf=rf,
        cnn=cnn,
    )
