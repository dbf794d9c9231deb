"""Labeled message streams to model inputs through the live feature path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from converters.ton_iot import LabeledMessage
from sidecar.config import Settings
from sidecar.features import (
    CNN_CHANNELS,
    FEATURE_NAMES,
    DeviceState,
    FeatureSpec,
    WindowSnapshot,
    batch_features,
)
from sidecar.pipeline import channel_readings
from sidecar.topics import RouteKind, TopicRouter

__all__ = ["WindowSet", "build_windows"]

# Windows computed per `batch_features` call: as many as the live pipeline's
# largest batches, while the snapshots waiting stay a few megabytes.
FEATURE_BATCH = 4096


@dataclass(frozen=True)
class WindowSet:
    """Every scored window of a set of streams, with its ground truth.

    Row i describes the window that ended with one message: the features both
    models read, that message's label and attack type, its device, its time
    and its position in the device's stream (0-based, counting every message,
    warm-up included, exactly as the live sidecar's `seq` counts).
    """

    vectors: npt.NDArray[np.float32]
    windows: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    attack_types: npt.NDArray[np.str_]
    devices: npt.NDArray[np.str_]
    times: npt.NDArray[np.float64]
    seqs: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: npt.NDArray[np.bool_]) -> WindowSet:
        """Return the rows where `keep` is True."""
        return WindowSet(
            vectors=self.vectors[keep],
            windows=self.windows[keep],
            labels=self.labels[keep],
            attack_types=self.attack_types[keep],
            devices=self.devices[keep],
            times=self.times[keep],
            seqs=self.seqs[keep],
        )


def build_windows(
    streams: Mapping[str, Sequence[LabeledMessage]],
    spec: FeatureSpec,
    max_payload_bytes: int = 65536,
    router: TopicRouter | None = None,
) -> WindowSet:
    """Replay each device's stream through a fresh `DeviceState`.

    Windows inside the warm-up are not scored, as in the live sidecar. Each
    payload is read as the live pipeline reads it, under its topic's channel
    (`router`: the default topic rules when None), so a device publishing on
    several topics has the same keys offline as live.
    """
    router = router or TopicRouter(Settings().topics, Settings().output.prefix)
    vectors: list[npt.NDArray[np.float32]] = []
    windows: list[npt.NDArray[np.float32]] = []
    snapshots: list[WindowSnapshot] = []
    labels: list[int] = []
    attack_types: list[str] = []
    devices: list[str] = []
    times: list[float] = []
    seqs: list[int] = []
    for device, messages in streams.items():
        state = DeviceState(spec)
        for seq, item in enumerate(messages):
            message = item.message
            route = router.route(message.topic)
            channel = route.channel if route.kind is RouteKind.TELEMETRY else ""
            readings = channel_readings(message.payload, channel, max_payload_bytes)
            state.update(readings, len(message.payload), message.received_at)
            if not state.ready:
                continue
            snapshots.append(state.snapshot())
            if len(snapshots) == FEATURE_BATCH:
                _compute(snapshots, vectors, windows)
            labels.append(item.label)
            attack_types.append(item.attack_type)
            devices.append(device)
            times.append(message.received_at)
            seqs.append(seq)
    _compute(snapshots, vectors, windows)
    n_channels, length = len(CNN_CHANNELS), spec.window
    return WindowSet(
        vectors=np.concatenate(
            [np.zeros((0, len(FEATURE_NAMES)), dtype=np.float32), *vectors]
        ),
        windows=np.concatenate(
            [np.zeros((0, n_channels, length), dtype=np.float32), *windows]
        ),
        labels=np.array(labels, dtype=np.int64),
        attack_types=np.array(attack_types, dtype=np.str_),
        devices=np.array(devices, dtype=np.str_),
        times=np.array(times, dtype=np.float64),
        seqs=np.array(seqs, dtype=np.int64),
    )


def _compute(
    snapshots: list[WindowSnapshot],
    vectors: list[npt.NDArray[np.float32]],
    windows: list[npt.NDArray[np.float32]],
) -> None:
    """Turn the waiting snapshots into features, appended in order; clear them."""
    if snapshots:
        batch_vectors, batch_windows = batch_features(snapshots)
        vectors.append(batch_vectors)
        windows.append(batch_windows)
        snapshots.clear()
