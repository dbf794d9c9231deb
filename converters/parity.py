"""Agreement between a trained model and its ONNX export, and the session to run it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = [
    "DECISION_THRESHOLD",
    "ParityReport",
    "compare_scores",
    "open_session",
    "run_session",
]

# A window is called anomalous when P(anomaly) exceeds one half, the point
# where scikit-learn's `predict` switches class for two classes.
DECISION_THRESHOLD = 0.5
# Pitfalls #14 (onnxruntime #17011, #10273; rf-detr PR #1456): default pools
# take every core and spin, so two sessions on a small hub starve each other.
# One intra-op thread per session, one inter-op thread, no spinning.
SESSION_THREADS = 1
# onnxruntime session config key that stops idle intra-op threads spinning.
_SPINNING_KEY = "session.intra_op.allow_spinning"
_CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True, slots=True)
class ParityReport:
    """How far an exported model's scores stray from the original's.

    Attributes:
        max_abs_diff: Largest absolute difference of P(anomaly) over the rows.
        label_mismatch_rate: Share of rows whose decision at
            `DECISION_THRESHOLD` differs between the two.
        n: Rows compared.
    """

    max_abs_diff: float
    label_mismatch_rate: float
    n: int


def open_session(path: Path, threads: int = SESSION_THREADS) -> ort.InferenceSession:
    """Open an ONNX model on the CPU with a small, non-spinning thread pool.

    Args:
        path: The `.onnx` file.
        threads: Intra-op threads; the inter-op pool always has one.

    Returns:
        A ready `onnxruntime.InferenceSession`.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry(_SPINNING_KEY, "0")
    return ort.InferenceSession(str(path), options, providers=[_CPU_PROVIDER])


def run_session(
    session: ort.InferenceSession,
    input_name: str,
    output_name: str,
    inputs: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Run one named output of a session on one named float32 input.

    Raises:
        TypeError: If the output is not a float32 tensor (a ZipMap output, a
            list of dicts, fails here instead of further down).
    """
    output = session.run([output_name], {input_name: inputs})[0]
    if not isinstance(output, np.ndarray) or output.dtype != np.float32:
        message = (
            f"output {output_name!r} is {type(output).__name__} "
            f"of {getattr(output, 'dtype', 'no dtype')}, expected float32 ndarray"
        )
        raise TypeError(message)
    return output


def compare_scores(
    reference: npt.NDArray[np.floating], exported: npt.NDArray[np.floating]
) -> ParityReport:
    """Compare two P(anomaly) vectors of the same rows.

    >>> report = compare_scores(np.array([0.2, 0.7]), np.array([0.2, 0.4]))
    >>> round(report.max_abs_diff, 6), report.label_mismatch_rate, report.n
    (0.3, 0.5, 2)

    Raises:
        ValueError: If the two are not 1-D vectors of the same length.
    """
    if reference.ndim != 1 or reference.shape != exported.shape:
        message = (
            f"scores must be two 1-D vectors of one length, got shapes "
            f"{reference.shape} and {exported.shape}"
        )
        raise ValueError(message)
    n = len(reference)
    if n == 0:
        return ParityReport(max_abs_diff=0.0, label_mismatch_rate=0.0, n=0)
    reference64 = reference.astype(np.float64)
    exported64 = exported.astype(np.float64)
    mismatches = (reference64 > DECISION_THRESHOLD) != (exported64 > DECISION_THRESHOLD)
    return ParityReport(
        max_abs_diff=float(np.max(np.abs(reference64 - exported64))),
        label_mismatch_rate=float(np.mean(mismatches)),
        n=n,
    )
