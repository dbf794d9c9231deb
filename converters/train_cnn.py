"""Train the 1-D CNN confirmer and export it to ONNX.

The CNN reads a window of `sidecar.features.CNN_CHANNELS` channels over the
last `window` messages, float32 (batch, channels, window), and confirms or
clears what the RandomForest flagged. It is small on purpose: two
convolutions, then global max- and mean-pooling so any window length works,
then two dense layers. The exported file outputs the sigmoid probability, not
the logit, so the runner and scikit-learn's forest speak the same scale.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from converters.parity import ParityReport, compare_scores, open_session, run_session
from sidecar.features import CNN_CHANNELS

__all__ = [
    "BATCH_SIZE",
    "CNN_INPUT",
    "CNN_OPSET",
    "CNN_OUTPUT",
    "EPOCHS",
    "LEARNING_RATE",
    "PREDICT_BATCH_SIZE",
    "TORCH_THREADS",
    "CnnConfirmer",
    "cnn_parity",
    "export_cnn",
    "predict_cnn",
    "train_cnn",
]

_LOG = logging.getLogger(__name__)

# Names the runner feeds and fetches.
CNN_INPUT = "window"
CNN_OUTPUT = "score"
# Supported by the TorchScript exporter of torch 2.13 and by onnxruntime since
# 1.13; the model uses only Conv, Relu, ReduceMax/Mean, Gemm and Sigmoid.
CNN_OPSET = 17
# Layer sizes: 32 filters of width 5 per layer, so each unit of the second
# layer sees 9 consecutive messages; ~8,600 weights, a ~36 kB ONNX file.
CONV_CHANNELS = 32
KERNEL_SIZE = 5
HIDDEN_UNITS = 32
# Training schedule, measured on the TON_IoT train split (146,480 windows of
# shape (8, 32)) on a shared 2-core machine with `TORCH_THREADS`: ~3.3 s an
# epoch at batch 256, 6/12/20 epochs in 26/39/69 s. Validation ROC AUC was
# flat over that range (0.722/0.716/0.721) while the training loss kept
# falling, so 8 epochs (~30 s) is enough and leaves room under 2 minutes.
EPOCHS = 8
BATCH_SIZE = 256
# Adam's default rate (Kingma and Ba 2015); stable here without a schedule.
LEARNING_RATE = 1e-3
# Torch intra-op threads for training and prediction. Measured on a 2-core
# machine with one epoch over the TON_IoT train split: 2 threads took 2.3 s
# when the machine was idle but 169 s while another process kept both cores
# busy (OpenMP workers spin-waiting for each other); 1 thread took 3.4 s under
# the same load. One thread loses little when idle and never collapses.
TORCH_THREADS = 1
# Windows per forward pass in `predict_cnn`; (4096, 8, 32) float32 is 4 MB.
PREDICT_BATCH_SIZE = 4096
# Batch size of the example input traced by the exporter. Not 1, so the tracer
# cannot mistake the batch axis for a constant size-1 axis.
_EXPORT_EXAMPLE_BATCH = 2
_BATCH_AXIS = "batch"
# Windows arrive as (n, channels, window).
_WINDOW_NDIM = 3


class CnnConfirmer(torch.nn.Module):
    """Two 1-D convolutions, global max and mean pooling, two dense layers.

    `forward` maps float32 (batch, n_channels, window) to logits (batch,); any
    window length works, the pooling removes the time axis.

    Args:
        n_channels: Input channels, `len(CNN_CHANNELS)` for the sidecar.
    """

    def __init__(self, n_channels: int = len(CNN_CHANNELS)) -> None:
        super().__init__()
        self.n_channels = n_channels
        padding = KERNEL_SIZE // 2
        self.conv1 = torch.nn.Conv1d(
            n_channels, CONV_CHANNELS, KERNEL_SIZE, padding=padding
        )
        self.conv2 = torch.nn.Conv1d(
            CONV_CHANNELS, CONV_CHANNELS, KERNEL_SIZE, padding=padding
        )
        self.hidden = torch.nn.Linear(2 * CONV_CHANNELS, HIDDEN_UNITS)
        self.out = torch.nn.Linear(HIDDEN_UNITS, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Return one logit per window."""
        maps = torch.relu(self.conv2(torch.relu(self.conv1(windows))))
        pooled = torch.cat([maps.amax(dim=2), maps.mean(dim=2)], dim=1)
        logits: torch.Tensor = self.out(torch.relu(self.hidden(pooled)))
        return logits.squeeze(1)


class _WithSigmoid(torch.nn.Module):
    """The confirmer with its logit turned into a probability, for export."""

    def __init__(self, model: CnnConfirmer) -> None:
        super().__init__()
        self.model = model

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(windows))


def train_cnn(
    windows: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer],
    seed: int,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float = LEARNING_RATE,
) -> CnnConfirmer:
    """Fit the confirmer on the CPU with class-balanced logistic loss.

    The global torch random state is left as it was: initial weights and the
    shuffling order both come from `seed` alone, so two calls with one seed
    give the same weights.

    Args:
        windows: float32 windows, shape (n, channels, window).
        labels: 0 for normal, 1 for anomaly, shape (n,).
        seed: Seeds the initial weights and the order of batches.
        epochs: Passes over the data.
        batch_size: Windows per optimiser step.
        lr: Adam learning rate.

    Returns:
        The trained model, in eval mode.

    Raises:
        ValueError: If the shapes disagree or a class is missing.
    """
    inputs = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
    targets_np = np.asarray(labels, dtype=np.float32)
    if inputs.ndim != _WINDOW_NDIM or inputs.shape[0] != len(targets_np):
        message = (
            f"need windows (n, channels, window) and n labels, got "
            f"{tuple(inputs.shape)} and {targets_np.shape}"
        )
        raise ValueError(message)
    n_positive = float(targets_np.sum())
    n_negative = float(len(targets_np)) - n_positive
    if n_positive == 0 or n_negative == 0:
        message = (
            f"labels must hold both classes, got {n_negative:.0f} normal and "
            f"{n_positive:.0f} anomalous"
        )
        raise ValueError(message)
    targets = torch.from_numpy(targets_np)

    with _torch_threads(TORCH_THREADS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CnnConfirmer(n_channels=int(inputs.shape[1]))
        order = torch.Generator().manual_seed(seed)
        loss_fn = torch.nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(n_negative / n_positive)
        )
        optimiser = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            total = 0.0
            shuffled = torch.randperm(len(targets), generator=order)
            for batch in torch.split(shuffled, batch_size):
                optimiser.zero_grad()
                loss = loss_fn(model(inputs[batch]), targets[batch])
                loss.backward()
                optimiser.step()
                total += float(loss.item()) * len(batch)
            _LOG.info(
                "epoch model=cnn epoch=%d/%d loss=%.5f seconds=%.1f",
                epoch,
                epochs,
                total / len(targets),
                time.perf_counter() - started,
            )
    model.eval()
    _LOG.info(
        "trained model=cnn rows=%d anomaly_share=%.3f epochs=%d seed=%d",
        len(targets),
        n_positive / len(targets),
        epochs,
        seed,
    )
    return model


def predict_cnn(
    model: CnnConfirmer,
    windows: npt.NDArray[np.floating],
    batch_size: int = PREDICT_BATCH_SIZE,
) -> npt.NDArray[np.float32]:
    """Return torch's P(anomaly) for each window, float32 shape (n,)."""
    inputs = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        with _torch_threads(TORCH_THREADS), torch.inference_mode():
            scores = [
                torch.sigmoid(model(part)) for part in torch.split(inputs, batch_size)
            ]
    finally:
        model.train(was_training)
    if not scores:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(scores).numpy().astype(np.float32, copy=False)


def export_cnn(model: CnnConfirmer, path: Path, window: int) -> None:
    """Write the confirmer, sigmoid included, as one self-contained ONNX file.

    The file has one input `CNN_INPUT`, float32 (batch, channels, `window`),
    and one output `CNN_OUTPUT`, float32 (batch,) probabilities; the batch
    axis is dynamic.
    """
    example = torch.zeros(_EXPORT_EXAMPLE_BATCH, model.n_channels, window)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # torch 2.13 marks the TorchScript exporter deprecated in favour of
            # the torch.export one ("You are using the legacy TorchScript-based
            # ONNX export") and its own helpers with "The feature will be
            # removed". It still runs in under a second, matches torch
            # exactly on this model and prints nothing. The torch.export one
            # also works (max diff ~3e-8) but takes ~6 s and logs torchvision
            # and pytree warnings; switch when torch drops this one.
            warnings.filterwarnings(
                "ignore",
                message="You are using the legacy TorchScript-based ONNX export",
                category=DeprecationWarning,
            )
            warnings.filterwarnings(
                "ignore",
                message="The feature will be removed",
                category=DeprecationWarning,
            )
            torch.onnx.export(
                _WithSigmoid(model),
                (example,),
                str(path),
                input_names=[CNN_INPUT],
                output_names=[CNN_OUTPUT],
                dynamic_axes={
                    CNN_INPUT: {0: _BATCH_AXIS},
                    CNN_OUTPUT: {0: _BATCH_AXIS},
                },
                opset_version=CNN_OPSET,
                dynamo=False,
                external_data=False,
            )
    finally:
        model.train(was_training)
    _LOG.info(
        "exported model=cnn path=%s bytes=%d opset=%d window=%d",
        path,
        path.stat().st_size,
        CNN_OPSET,
        window,
    )


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def cnn_parity(
    model: CnnConfirmer, path: Path, windows: npt.NDArray[np.floating]
) -> ParityReport:
    """Compare torch and onnxruntime P(anomaly) on the given windows."""
    inputs = np.ascontiguousarray(windows, dtype=np.float32)
    exported = run_session(open_session(path), CNN_INPUT, CNN_OUTPUT, inputs)
    report = compare_scores(predict_cnn(model, inputs), exported)
    _LOG.info(
        "parity model=cnn rows=%d max_abs_diff=%.3g label_mismatch_rate=%.3g",
        report.n,
        report.max_abs_diff,
        report.label_mismatch_rate,
    )
    return report
