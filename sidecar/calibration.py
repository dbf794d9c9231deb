"""Per-device score calibration: each device's scores against its own normal.

A shipped model scores some devices' normal windows higher than others' (a
noisy thermostat looks busier than a quiet door). After its feature warm-up,
each device spends `windows` scored windows learning a reference: the
`quantile` of its own RandomForest and CNN scores. From then on a score is
read relative to that reference,

    calibrated = clip((score - reference) / (1 - reference), 0, 1),

so the same thresholds serve every device, seen in training or not. The
calibration windows raise no alarm. Like the feature warm-up, this assumes a
device behaves normally while it is being learned; a device that is already
faulty when the sidecar first sees it is learned as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Calibration",
    "DeviceCalibration",
    "calibrate_offline",
    "calibrated",
]

FloatArray = npt.NDArray[np.float64]
# A reference is kept below 1 so that the rescaling never divides by zero.
MAX_REFERENCE = 1.0 - 1e-6


@dataclass(frozen=True, slots=True)
class Calibration:
    """How references are learned; fixed when the cascade is tuned.

    Attributes:
        windows: Scored windows per device used to learn its reference; 0
            switches calibration off (scores are used as the models give them).
        quantile: Which quantile of those scores becomes the reference.
    """

    windows: int = 64
    quantile: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready mapping for a model card."""
        return {"windows": self.windows, "quantile": self.quantile}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        """Build the settings from a model card's mapping."""
        return cls(windows=int(data["windows"]), quantile=float(data["quantile"]))


def calibrated(scores: FloatArray, reference: FloatArray | float) -> FloatArray:
    """Rescale scores so the reference maps to 0 and 1 stays 1.

    >>> calibrated(np.array([0.2, 0.6, 1.0]), 0.2).round(2)
    array([0. , 0.5, 1. ])
    """
    ref = np.minimum(reference, MAX_REFERENCE)
    result: FloatArray = np.clip((scores - ref) / (1.0 - ref), 0.0, 1.0)
    return result


@dataclass(slots=True)
class DeviceCalibration:
    """One device's reference, learned online from its first scored windows."""

    settings: Calibration
    seen: list[tuple[float, float]] = field(default_factory=list)
    reference: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.settings.windows == 0:
            self.reference = (0.0, 0.0)

    def learn(self, rf: float, cnn: float) -> None:
        """Record the raw scores of one calibration window."""
        self.seen.append((rf, cnn))
        if len(self.seen) >= self.settings.windows:
            scores = np.array(self.seen, dtype=np.float64)
            rf_ref, cnn_ref = np.quantile(scores, self.settings.quantile, axis=0)
            self.reference = (float(rf_ref), float(cnn_ref))
            self.seen = []


def calibrate_offline(
    rf: FloatArray,
    cnn: FloatArray,
    devices: npt.NDArray[np.str_],
    seqs: npt.NDArray[np.int64],
    settings: Calibration,
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """Calibrate a whole split at once, exactly as the live pipeline does.

    Returns:
        Calibrated RF scores, calibrated CNN scores, and a mask that is True
        for the windows spent learning references (they raise no alarm).
    """
    learning = np.zeros(len(rf), dtype=bool)
    if settings.windows == 0:
        return rf.astype(np.float64), cnn.astype(np.float64), learning
    rf_out = np.zeros(len(rf))
    cnn_out = np.zeros(len(cnn))
    for device in np.unique(devices):
        rows = np.flatnonzero(devices == device)
        rows = rows[np.argsort(seqs[rows], kind="stable")]
        first = rows[: settings.windows]
        learning[first] = True
        if len(first) < settings.windows:
            continue
        rest = rows[settings.windows :]
        rf_ref = float(np.quantile(rf[first], settings.quantile))
        cnn_ref = float(np.quantile(cnn[first], settings.quantile))
        rf_out[rest] = calibrated(rf[rest], rf_ref)
        cnn_out[rest] = calibrated(cnn[rest], cnn_ref)
    return rf_out, cnn_out, learning
