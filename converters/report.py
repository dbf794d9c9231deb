"""An evaluation as a self-contained HTML page with its plots as PNG files.

`write_report` draws, with matplotlib's Agg backend:
- `pr.png`, `roc.png`: precision-recall and ROC curves of every detector on
  the scored windows;
- `timelines.png`: the hybrid's fused score over time for a few devices,
  labeled anomalies shaded, the fit part greyed, raised alarms marked;
- `confusion.png`: each detector's confusion matrix;
- `importances.png`: the RandomForest's feature importances, read from the
  tree ensemble inside `rf.onnx` as the share of split nodes that test each
  feature (ONNX keeps no impurity decrease, so this is a split count, not
  scikit-learn's impurity importance).
The page embeds every image as base64, so it can be mailed on its own; the
PNG files sit beside it.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix, precision_recall_curve, roc_curve

from converters.evaluate import DatasetEvaluation
from sidecar.config import ModelSettings
from sidecar.features import FEATURE_NAMES

__all__ = ["PLOTS", "rf_split_importances", "write_report"]

_LOG = logging.getLogger(__name__)

PLOTS = ("pr", "roc", "timelines", "confusion", "importances")
PAGE = "index.html"
# Devices drawn in the timelines: the ones with the most labeled anomalous
# windows; more would make the figure unreadable.
TIMELINE_DEVICES = 6
# Scores are drawn from at most this many points per device (evenly picked),
# which keeps a NAB-sized series quick to draw.
TIMELINE_POINTS = 5000
DPI = 100
# Curves need normal and anomalous windows alike.
BOTH_CLASSES = 2
_HEADLINE = (
    "f1",
    "precision",
    "recall",
    "fpr",
    "far",
    "mar",
    "roc_auc",
    "nab_standard",
    "nab_low_fp",
    "nab_low_fn",
)


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI)
    plt.close(figure)


def _curves(evaluation: DatasetEvaluation, folder: Path) -> list[str]:
    """Draw the PR and ROC curves; return notes for the page."""
    inputs = evaluation.inputs()
    labels = inputs.windows.labels
    notes = []
    pr, pr_axes = plt.subplots(figsize=(6, 5))
    roc, roc_axes = plt.subplots(figsize=(6, 5))
    if len(np.unique(labels)) == BOTH_CLASSES:
        for name, scores in inputs.scores.items():
            finite = np.nan_to_num(scores, nan=0.0)
            precision, recall, _ = precision_recall_curve(labels, finite)
            pr_axes.plot(recall, precision, label=name)
            fpr, tpr, _ = roc_curve(labels, finite)
            roc_axes.plot(fpr, tpr, label=name)
        pr_axes.legend()
        roc_axes.legend()
    else:
        notes.append("The scored windows hold one class only: no PR or ROC curve.")
    roc_axes.plot([0, 1], [0, 1], color="grey", linestyle=":")
    pr_axes.set(xlabel="recall", ylabel="precision", title="Precision-recall")
    roc_axes.set(xlabel="false-positive rate", ylabel="recall", title="ROC")
    _save(pr, folder / "pr.png")
    _save(roc, folder / "roc.png")
    return notes


def _runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[first, last] index pairs of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(
        zip(
            np.flatnonzero(edges == 1).tolist(),
            (np.flatnonzero(edges == -1) - 1).tolist(),
            strict=True,
        )
    )


def _timelines(evaluation: DatasetEvaluation, folder: Path) -> None:
    windows = evaluation.windows
    devices, counts = np.unique(windows.devices, return_counts=True)
    attacks = np.array([windows.labels[windows.devices == d].sum() for d in devices])
    order = np.lexsort((-counts, -attacks))[:TIMELINE_DEVICES]
    chosen = devices[order].tolist() or ["(no windows)"]
    figure, axes = plt.subplots(
        len(chosen), 1, figsize=(10, 2.2 * len(chosen)), squeeze=False
    )
    score_name = (
        "hybrid" if "hybrid" in evaluation.scores else next(iter(evaluation.scores), "")
    )
    for axis, device in zip(axes[:, 0], chosen, strict=True):
        rows = np.flatnonzero(windows.devices == device)
        rows = rows[np.argsort(windows.seqs[rows], kind="stable")]
        axis.set_title(str(device), fontsize=9, loc="left")
        if not len(rows):
            continue
        seqs = windows.seqs[rows]
        for first, last in _runs(windows.labels[rows] == 1):
            axis.axvspan(seqs[first], seqs[last], color="tab:red", alpha=0.15)
        fit = ~evaluation.scored[rows]
        for first, last in _runs(fit):
            axis.axvspan(seqs[first], seqs[last], color="grey", alpha=0.15)
        step = max(1, len(rows) // TIMELINE_POINTS)
        if score_name:
            axis.plot(
                seqs[::step],
                evaluation.scores[score_name][rows][::step],
                linewidth=0.6,
                label=f"{score_name} score",
            )
            flags = evaluation.flags[score_name][rows]
            onsets = np.flatnonzero(flags & ~np.concatenate([[False], flags[:-1]]))
            axis.plot(
                seqs[onsets],
                np.ones(len(onsets)),
                "v",
                color="black",
                markersize=5,
                label="alarm raised",
            )
        axis.set_ylim(-0.05, 1.1)
    axes[-1, 0].set_xlabel(
        "message position in the device's stream (red: labeled anomalous, "
        "grey: fit part)"
    )
    axes[0, 0].legend(loc="upper right", fontsize=7)
    figure.tight_layout()
    _save(figure, folder / "timelines.png")


def _confusions(evaluation: DatasetEvaluation, folder: Path) -> None:
    inputs = evaluation.inputs()
    names = list(inputs.flags)
    figure, axes = plt.subplots(
        1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False
    )
    for axis, name in zip(axes[0], names, strict=True):
        matrix = confusion_matrix(
            inputs.windows.labels, inputs.flags[name].astype(int), labels=[0, 1]
        )
        axis.imshow(matrix, cmap="Blues")
        for (row, column), count in np.ndenumerate(matrix):
            axis.text(column, row, str(count), ha="center", va="center", fontsize=8)
        axis.set_xticks([0, 1], ["normal", "flagged"], fontsize=7)
        axis.set_yticks([0, 1], ["normal", "anomalous"], fontsize=7)
        axis.set_title(name, fontsize=9)
    figure.tight_layout()
    _save(figure, folder / "confusion.png")


def rf_split_importances(model_path: Path) -> dict[str, float] | None:
    """Share of the split nodes of `rf.onnx`'s trees that test each feature.

    Returns None when the file, the `onnx` package or a tree ensemble is
    missing.
    """
    try:
        import onnx
    except ImportError:
        return None
    if not model_path.is_file():
        return None
    graph = onnx.load(str(model_path)).graph
    for node in graph.node:
        if not node.op_type.startswith("TreeEnsemble"):
            continue
        attributes = {
            a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
        }
        features = list(attributes.get("nodes_featureids", []))
        modes = list(attributes.get("nodes_modes", [b"BRANCH"] * len(features)))
        used = [
            feature
            for feature, mode in zip(features, modes, strict=False)
            if mode not in (b"LEAF", "LEAF")
        ]
        if not used:
            return None
        counts = np.bincount(used, minlength=len(FEATURE_NAMES))
        total = counts.sum()
        return {
            FEATURE_NAMES[i] if i < len(FEATURE_NAMES) else f"feature_{i}": float(
                count / total
            )
            for i, count in enumerate(counts.tolist())
        }
    return None


def _importances(models: ModelSettings, folder: Path) -> list[str]:
    shares = rf_split_importances(models.directory / models.rf)
    if shares is None:
        note = (
            "RF feature importances skipped: no tree ensemble could be read from "
            f"{models.directory / models.rf} (or the onnx package is missing)."
        )
        return [note]
    ranked = sorted(shares.items(), key=lambda item: item[1])
    figure, axis = plt.subplots(figsize=(7, 0.22 * len(ranked) + 1))
    axis.barh([name for name, _ in ranked], [share for _, share in ranked])
    axis.tick_params(axis="y", labelsize=7)
    axis.set_xlabel("share of split nodes in rf.onnx")
    figure.tight_layout()
    _save(figure, folder / "importances.png")
    return []


def _table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    columns = [c for c in _HEADLINE if any(c in m for m in metrics.values())]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["detector", *columns])
    body = []
    for name, values in metrics.items():
        cells = "".join(
            f"<td>{'-' if values.get(c) is None else values.get(c)}</td>"
            for c in columns
        )
        body.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(
    evaluation: DatasetEvaluation,
    metrics: Mapping[str, Mapping[str, Any]],
    models: ModelSettings,
    folder: Path,
) -> Path:
    """Write the PNG plots and the HTML page into `folder`; return the page."""
    folder.mkdir(parents=True, exist_ok=True)
    notes = _curves(evaluation, folder)
    _timelines(evaluation, folder)
    _confusions(evaluation, folder)
    notes += _importances(models, folder)

    sections = []
    for name in PLOTS:
        path = folder / f"{name}.png"
        if path.is_file():
            encoded = base64.b64encode(path.read_bytes()).decode("ascii")
            sections.append(
                f'<h2>{name}</h2><img alt="{name}" src="data:image/png;base64,'
                f'{encoded}">'
            )
    thresholds = "".join(
        f"<li><b>{html.escape(name)}</b>: {html.escape(text)}</li>"
        for name, text in evaluation.thresholds.items()
    )
    page = folder / PAGE
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>Evaluation: {html.escape(evaluation.data.dataset)}</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:auto}"
        "td,th{padding:2px 8px;text-align:right}img{max-width:100%}</style>"
        f"</head><body><h1>Evaluation: {html.escape(evaluation.data.dataset)}</h1>"
        f"<p>{html.escape(evaluation.data.protocol)}</p>"
        f"<p>{int(evaluation.scored.sum())} scored windows of "
        f"{len(evaluation.windows)}; FAR, MAR in %.</p>"
        f"{_table(metrics)}<h2>Thresholds</h2><ul>{thresholds}</ul>"
        + "".join(f"<p><i>{html.escape(note)}</i></p>" for note in notes)
        + "".join(sections)
        + "</body></html>\n",
        encoding="utf-8",
    )
    _LOG.info("report written path=%s plots=%d", page, len(sections))
    return page
