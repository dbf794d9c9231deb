"""Train the RandomForest front filter and export it to ONNX.

The forest reads the feature vector of `sidecar.features.FEATURE_NAMES` and
gives P(normal), P(anomaly). Two export traps are handled here:

- Tree thresholds (pitfalls #15, scikit-learn #11165): scikit-learn compares
  float32 inputs with float64 thresholds, ONNX with float32 ones. Features are
  cast to float32 before training, so every threshold lies between two float32
  training values, and skl2onnx rounds it to the float32 that keeps every
  float32 input on the same branch.
- ZipMap (pitfalls #16, sklearn-onnx #202, #218): by default the probability
  output is a list of dicts. It is switched off, so output `RF_OUTPUT` is a
  float32 array of shape (n, 2), columns in `model.classes_` order, [0, 1].
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.ensemble import RandomForestClassifier

from converters.parity import ParityReport, compare_scores, open_session, run_session

__all__ = [
    "RF_INPUT",
    "RF_LABEL_OUTPUT",
    "RF_ML_OPSET",
    "RF_OPSET",
    "RF_OUTPUT",
    "export_rf",
    "rf_parity",
    "rf_scores",
    "train_rf",
]

_LOG = logging.getLogger(__name__)

# Names the runner feeds and fetches; the label output is exported but unused.
RF_INPUT = "features"
RF_OUTPUT = "probabilities"
RF_LABEL_OUTPUT = "label"
# skl2onnx names the graph with a random UUID unless told; a fixed name makes
# two exports of one forest byte-identical.
RF_GRAPH_NAME = "rf_front_filter"
# Default ONNX domain opset: supported by onnxruntime since 1.13 and well
# inside skl2onnx 1.20's tested range (up to 22).
RF_OPSET = 17
# ai.onnx.ml opset 3 lets TreeEnsembleClassifier carry its thresholds as a
# tensor; skl2onnx still emits the classic op, read by every onnxruntime.
RF_ML_OPSET = 3
# Hyper-parameters, chosen on the TON_IoT validation split (never the test
# split): 100 trees of depth <= 12, leaves of >= 100 windows and half the
# features per split ranked validation windows best (ROC AUC 0.763, against
# 0.708 for leaves of 5 rows, which memorise the heavily overlapping windows
# of the train split) and export to about 54,000 nodes.
N_ESTIMATORS = 100
MAX_DEPTH = 12
MIN_SAMPLES_LEAF = 100
MAX_FEATURES = 0.5
# Training builds trees on both cores of a 2-core machine. Prediction runs on
# one: with several, scikit-learn adds the trees' probabilities in whatever
# order its threads finish, so the last bit changes from run to run.
N_JOBS = 2
PREDICT_N_JOBS = 1
# The anomaly share differs between datasets and devices (TON_IoT train is
# ~50 % overall); weighing classes by inverse frequency keeps either side from
# dominating the splits when it is not.
CLASS_WEIGHT = "balanced"
# Column of P(anomaly) in `predict_proba` and in `RF_OUTPUT` (classes [0, 1]).
_ANOMALY_COLUMN = 1
_N_CLASSES = 2


def train_rf(
    vectors: npt.NDArray[np.floating], labels: npt.NDArray[np.integer], seed: int
) -> RandomForestClassifier:
    """Fit the forest on float32 feature vectors.

    Args:
        vectors: Feature vectors, shape (n, n_features); cast to float32 first.
        labels: 0 for normal, 1 for anomaly, shape (n,).
        seed: Seeds bootstrap sampling and feature choice.

    Returns:
        The fitted forest; its classes are [0, 1] and it predicts on
        `PREDICT_N_JOBS` threads, so its probabilities are reproducible.

    Raises:
        ValueError: If the labels do not hold both classes 0 and 1.
    """
    features = np.ascontiguousarray(vectors, dtype=np.float32)
    targets = np.asarray(labels, dtype=np.int64)
    present = np.unique(targets).tolist()
    if present != [0, 1]:
        message = f"labels must hold both classes 0 and 1, got {present}"
        raise ValueError(message)
    model = RandomForestClassifier(
        n_estimators=N_ESTIMATORS,
        max_depth=MAX_DEPTH,
        min_samples_leaf=MIN_SAMPLES_LEAF,
        max_features=MAX_FEATURES,
        class_weight=CLASS_WEIGHT,
        n_jobs=N_JOBS,
        random_state=seed,
    )
    model.fit(features, targets)
    model.set_params(n_jobs=PREDICT_N_JOBS)
    _LOG.info(
        "trained model=rf rows=%d features=%d anomaly_share=%.3f nodes=%d seed=%d",
        len(targets),
        features.shape[1],
        float(targets.mean()),
        _node_count(model),
        seed,
    )
    return model


def rf_scores(
    model: RandomForestClassifier, vectors: npt.NDArray[np.floating]
) -> npt.NDArray[np.float64]:
    """Return scikit-learn's P(anomaly) for float32-cast vectors, shape (n,)."""
    features = np.ascontiguousarray(vectors, dtype=np.float32)
    probabilities = np.asarray(model.predict_proba(features), dtype=np.float64)
    return probabilities[:, _ANOMALY_COLUMN]


def export_rf(model: RandomForestClassifier, path: Path) -> None:
    """Write the forest as a self-contained ONNX file.

    The file has one input `RF_INPUT`, float32 (batch, n_features), and two
    outputs: `RF_LABEL_OUTPUT`, int64 (batch,), and `RF_OUTPUT`, float32
    (batch, 2) with P(normal), P(anomaly).

    Raises:
        ValueError: If the model does not have exactly the classes [0, 1].
    """
    classes = np.asarray(model.classes_).tolist()
    if classes != [0, 1]:
        message = f"expected a forest over classes [0, 1], got {classes}"
        raise ValueError(message)
    n_features = int(model.n_features_in_)
    payload = _convert(model, n_features)
    path.write_bytes(payload)
    _LOG.info(
        "exported model=rf path=%s bytes=%d opset=%d ml_opset=%d",
        path,
        len(payload),
        RF_OPSET,
        RF_ML_OPSET,
    )


def rf_parity(
    model: RandomForestClassifier, path: Path, vectors: npt.NDArray[np.floating]
) -> ParityReport:
    """Compare scikit-learn and onnxruntime P(anomaly) on the given rows."""
    features = np.ascontiguousarray(vectors, dtype=np.float32)
    # scikit-learn first: its error names a feature-count mismatch plainly.
    reference = rf_scores(model, features)
    probabilities = run_session(open_session(path), RF_INPUT, RF_OUTPUT, features)
    report = compare_scores(reference, probabilities[:, _ANOMALY_COLUMN])
    _LOG.info(
        "parity model=rf rows=%d max_abs_diff=%.3g label_mismatch_rate=%.3g",
        report.n,
        report.max_abs_diff,
        report.label_mismatch_rate,
    )
    return report


def _convert(model: RandomForestClassifier, n_features: int) -> bytes:
    # `final_types` pins the output names, so the runner's lookup by name does
    # not depend on skl2onnx's defaults staying the same.
    options: dict[int, dict[str, Any]] = {id(model): {"zipmap": False}}
    onnx_model = convert_sklearn(
        model,
        name=RF_GRAPH_NAME,
        initial_types=[(RF_INPUT, FloatTensorType([None, n_features]))],
        final_types=[
            (RF_LABEL_OUTPUT, Int64TensorType([None])),
            (RF_OUTPUT, FloatTensorType([None, _N_CLASSES])),
        ],
        options=options,
        target_opset={"": RF_OPSET, "ai.onnx.ml": RF_ML_OPSET},
    )
    return bytes(onnx_model.SerializeToString())


def _node_count(model: RandomForestClassifier) -> int:
    return sum(int(tree.tree_.node_count) for tree in model.estimators_)
