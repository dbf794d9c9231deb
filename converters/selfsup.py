"""Self-supervised training: both models from normal traffic with injected faults.

A smart home has no labels. This mode learns from a stretch of a home's
normal traffic: each device's stream is copied, faults of every kind in
`converters.inject` are injected into the copies (labeled 1), and the
RandomForest and the CNN are trained on the windows of the clean streams and
the copies with the existing trainers. Thresholds and the alarm lifecycle are
chosen with `converters.train.tune_cascade` under the project's false-alarm
budget (`FPR_BUDGET`), on a held-out part of the injected data.

The held-out part is cut in time: the last `TUNING_SHARE` of each device's
normal stream. Training copies are made from messages before the cut only;
tuning copies inject their faults after the cut and score only windows that
end after it (the messages just before the cut only warm the baseline up, as
in the live sidecar). No window the models were fitted on is used to tune
them, and no real label is read anywhere.

Which feature groups the models read (`SELF_SUPERVISED_SPEC`): all four.
The shipped TON_IoT pair switches `timing` and `size` off because that
dataset's timing and payload sizes are artefacts of its export (its SOURCE.md
quirk 5), so they separate its classes for the wrong reason. Here the normal
side is the home's own traffic with its own timing and sizes, and the
anomalous side is that same traffic with a known edit, so a timing or size
feature can only tell the two apart through the edit itself: a flood, a
dropout or a malformed burst are faults of timing and size, and a detector
blind to those groups could not learn them at all. `level` (readings against
the device's learned baseline) was switched off for TON_IoT because levels did
not carry across its day-separated blocks; here each device's baseline is
learned from its own stream just before it is judged, which is exactly what
the sidecar does live, so `level` is on too.

Windows and labels: a window is labeled like the message that ends it, as
in the evaluation. A normal-ending window that still holds an injected
message (the 31 windows after a spike) shows the fault but is labeled 0, so
it is left out of both training and tuning instead of teaching the models
that a visible fault is normal.

Measured with seed 0 (`anomaly-sidecar evaluate --dataset simulation` with a
config pointing `models.directory` at the output), per scored window:
- Trained on the built-in simulation's normal part, the hybrid catches all 4
  of its faults (F1 0.91, false-positive rate 0.02); trained on the normal
  part of another simulation seed (1), still 4 of 4 (F1 0.95, FPR 0.05). The
  shipped TON_IoT pair catches 1 of 4 there (F1 0.32, FPR 0.21).
- Trained on TON_IoT's train split, normal rows only, and scored on its
  validation split, it barely sees TON_IoT's attacks: hybrid F1 0.06, FPR
  0.01, ROC AUC 0.52 (shape features alone: F1 0.14, FPR 0.06, AUC 0.69),
  against F1 0.75, FPR 0.15, AUC 0.79 for the shipped supervised pair, which
  was tuned on that split. Those attacks are network intrusions whose
  telemetry looks unlike any of the injected faults; this mode is for device
  faults, the supervised models for TON_IoT's attacks.

Known limits, in plain words:
- Injected faults are the ten kinds in `converters.inject`, with magnitudes
  chosen there; a real fault unlike all of them (a slow change over weeks, a
  device that lies consistently) is not what these models learned.
- The normal traffic is trusted: a fault already present in it is learned as
  normal.
- A device unlike every device in the normal traffic is served by its own
  baseline, but how well depends on how different it is. Trained on three of
  the simulation's four devices (tests/test_selfsup.py), the held-out fridge
  sensor's injected faults rank above its normal windows with ROC AUC ~0.95;
  a binary door contact, whose rare genuine changes look like faults to a
  model that never saw a contact, only ~0.6. Train on traffic that includes
  each kind of device the home has.
- Per-device score calibration is off in these cards: tuning excerpts are too
  short to spend 64 windows per device on learning a reference.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.ensemble import RandomForestClassifier

from converters.dataset import WindowSet, build_windows
from converters.inject import (
    INJECTOR_NAMES,
    INJECTORS,
    applicable,
    inject,
    interpolate,
)
from converters.simulate import NORMAL_MESSAGES, simulate
from converters.ton_iot import LabeledMessage, load_splits
from converters.train import (
    COST_BATCH,
    FPR_BUDGET,
    LIBRARIES,
    LifecycleChoice,
    best_threshold,
    tune_cascade,
)
from converters.train_cnn import (
    CNN_INPUT,
    CNN_OUTPUT,
    EPOCHS,
    CnnConfirmer,
    cnn_parity,
    export_cnn,
    predict_cnn,
    train_cnn,
)
from converters.train_rf import (
    RF_INPUT,
    RF_OUTPUT,
    export_rf,
    rf_parity,
    rf_scores,
    train_rf,
)
from sidecar.calibration import Calibration
from sidecar.config import Settings
from sidecar.detector import card_path
from sidecar.features import CNN_CHANNELS, FEATURE_NAMES, FeatureSpec
from sidecar.stream import Message
from sidecar.topics import RouteKind, TopicRouter

__all__ = [
    "PROTOCOL_DATASETS",
    "SELF_SUPERVISED_SPEC",
    "TUNING_SHARE",
    "SelfSupervisedConfig",
    "TrainedPair",
    "dataset_config",
    "injected_windows",
    "load_recording",
    "normal_streams",
    "protocol_streams",
    "selfsup_command",
    "train_selfsup",
    "write_models",
]

_LOG = logging.getLogger(__name__)

# All four feature groups on; the module docstring says why each is legitimate
# here. Window, warm-up and memory as in the shipped TON_IoT pair, so the
# sidecar's default `window.length: 32` serves both.
SELF_SUPERVISED_SPEC = FeatureSpec(
    window=32,
    warmup=128,
    memory=1000,
    learn_z=4.0,
    max_keys=32,
    disabled_groups=(),
)
# Share of each device's normal stream, at its end, held out for tuning. A
# quarter keeps, for the built-in simulation's 300 normal messages, 75 messages
# to tune on and 96 scored training windows after the 128-message warm-up.
TUNING_SHARE = 0.25
# Injected copies per device and injector, and the longest excerpt of a
# device's stream one copy is made from. Excerpts keep long recordings (tens
# of thousands of messages a device) from multiplying by the number of
# injectors; 640 messages is the warm-up plus sixteen windows.
COPIES = 3
EXCERPT_MESSAGES = 640
# One injected episode per this many scored messages of an excerpt, at least
# one: episodes stay apart, so most windows of a copy are still normal.
MESSAGES_PER_EPISODE = 160
# Normal variants report this many times as often, and as seldom, as the
# device (see `_normal_variants`).
NORMAL_RATE_FACTOR = 2
# Benchmarks whose protocol names a learnable part (`protocol_streams`).
PROTOCOL_DATASETS = frozenset({"skab", "nab", "mqttset"})
# SKAB's normal-operation recording, apart from the labeled experiments.
SKAB_ANOMALY_FREE = "anomaly-free/anomaly-free.csv"
# Benchmarks exported by a logger at a steady rate (see `dataset_config`).
VALUE_ONLY_DATASETS = frozenset({"skab", "nab"})
VALUE_INJECTORS: tuple[str, ...] = tuple(
    name for name in INJECTOR_NAMES if INJECTORS[name].needs != "nothing"
)
VALUE_ONLY_SPEC = replace(SELF_SUPERVISED_SPEC, disabled_groups=("timing", "size"))
# Per-device calibration is off (see the module docstring).
CALIBRATION = Calibration(windows=0)
# Parts a seed is derived for, so training and tuning copies never coincide.
_PARTS = {"train": 0, "tuning": 1}
TRAINING_MODE = "self-supervised"
# A recording shorter than a day misses a home's daily rhythm (heating, the
# evening's plugs, night-time quiet): what it did not see is an anomaly to
# the models trained on it. Below this, training goes on with a warning.
RECOMMENDED_RECORDING_S = 86_400.0


@dataclass(frozen=True)
class SelfSupervisedConfig:
    """What a self-supervised run injects and how it trains.

    Attributes:
        spec: Windows and baselines of both models.
        injectors: Names in `converters.inject.INJECTORS` to train on.
        copies: Injected copies per device and injector, in each part.
        excerpt: Longest excerpt, in messages, one copy is made from.
        tuning_share: Share of each stream, at its end, held out for tuning.
        cnn_epochs: Passes of the CNN over the training windows.
        seed: Seeds every injection, excerpt and both models.
    """

    spec: FeatureSpec = SELF_SUPERVISED_SPEC
    injectors: tuple[str, ...] = INJECTOR_NAMES
    copies: int = COPIES
    excerpt: int = EXCERPT_MESSAGES
    tuning_share: float = TUNING_SHARE
    cnn_epochs: int = EPOCHS
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as a JSON-ready mapping for a model card."""
        return {
            "injectors": list(self.injectors),
            "copies": self.copies,
            "excerpt_messages": self.excerpt,
            "tuning_share": self.tuning_share,
            "cnn_epochs": self.cnn_epochs,
            "seed": self.seed,
        }


@dataclass
class TrainedPair:
    """Both fitted models, their tuned cascade and what they were fitted on."""

    config: SelfSupervisedConfig
    rf: RandomForestClassifier
    cnn: CnnConfirmer
    choice: LifecycleChoice
    tuning: WindowSet
    rf_tuning: npt.NDArray[np.float64]
    cnn_tuning: npt.NDArray[np.float64]
    summary: dict[str, Any] = field(default_factory=dict)


def _seed(config: SelfSupervisedConfig, *parts: int) -> int:
    sequence = np.random.SeedSequence([config.seed, *parts])
    return int(sequence.generate_state(1)[0])


def _name_key(name: str) -> int:
    """A stable number for a name (`hash` is salted per process)."""
    return zlib.crc32(name.encode())


def _region(
    stream: Sequence[LabeledMessage], part: str, config: SelfSupervisedConfig
) -> tuple[list[LabeledMessage], int]:
    """The messages a part may use and the first of them it may score or edit.

    Training uses everything before the cut; tuning uses what follows it,
    preceded by enough messages to warm a baseline up.
    """
    cut = round(len(stream) * (1.0 - config.tuning_share))
    lead = max(config.spec.warmup, config.spec.window) + 1
    if part == "train":
        return list(stream[:cut]), lead
    start = max(cut - lead, 0)
    return list(stream[start:]), cut - start


def _copies(
    device: str,
    region: list[LabeledMessage],
    first: int,
    part: str,
    config: SelfSupervisedConfig,
) -> dict[str, tuple[list[LabeledMessage], int]]:
    """Injected copies of excerpts of a region, each with its first editable seq."""
    copies: dict[str, tuple[list[LabeledMessage], int]] = {}
    lead = max(config.spec.warmup, config.spec.window) + 1
    usable = applicable(region, config.injectors)
    for kind in config.injectors:
        if kind not in usable:
            _LOG.info(
                "injector skipped device=%s kind=%s reason=no_reading", device, kind
            )
            continue
        for copy in range(config.copies):
            seed = _seed(config, _PARTS[part], _name_key(device), _name_key(kind), copy)
            rng = np.random.default_rng(seed)
            length = min(len(region), config.excerpt)
            # An excerpt either starts at the region's start (keeping `first`)
            # or later, where its own first messages warm its baseline up.
            start = int(rng.integers(0, len(region) - length + 1))
            earliest = max(first - start, lead)
            excerpt = region[start : start + length]
            episodes = max(1, (length - earliest) // MESSAGES_PER_EPISODE)
            try:
                injected = inject(
                    excerpt, kind, seed, episodes=episodes, earliest=earliest
                )
            except ValueError as err:
                _LOG.info(
                    "copy skipped device=%s kind=%s copy=%d reason=%s",
                    device,
                    kind,
                    copy,
                    err,
                )
                continue
            copies[f"{device}#{part}:{kind}:{copy}"] = (injected, earliest)
    return copies


def _normal_variants(
    device: str,
    region: list[LabeledMessage],
    first: int,
    config: SelfSupervisedConfig,
) -> list[tuple[str, tuple[list[LabeledMessage], int]]]:
    """Normal copies of an excerpt at other cadences, each with its first scored seq.

    A model that has seen only a few devices knows only their rhythms; a new
    device whose readings wander slowly against its noise (a room's
    temperature over a day) would look like a drift to it. Reporting twice as
    often (readings interpolated) slows every wave down per message; every
    other message speeds it up. Both stay labeled normal, and each scores only
    what lies at or after the region's first scored message.
    """
    excerpt = region[: config.excerpt]
    factor = NORMAL_RATE_FACTOR
    return [
        (f"{device}#slower", (interpolate(excerpt, factor), first * factor)),
        (f"{device}#faster", (excerpt[::factor], -(-first // factor))),
    ]


def _scored_rows(
    windows: WindowSet,
    streams: Mapping[str, Sequence[LabeledMessage]],
    first_seq: Mapping[str, int],
    window: int,
) -> npt.NDArray[np.bool_]:
    """Rows past each stream's first scored seq, minus normal rows that show a fault."""
    labels = {
        name: np.array([item.label for item in stream], dtype=np.int64)
        for name, stream in streams.items()
    }
    keep = np.zeros(len(windows), dtype=bool)
    for row, (name, seq) in enumerate(
        zip(windows.devices.tolist(), windows.seqs.tolist(), strict=True)
    ):
        if seq < first_seq[name]:
            continue
        own = labels[name]
        shows_fault = own[max(seq - window + 1, 0) : seq + 1].any()
        keep[row] = bool(own[seq]) or not shows_fault
    return keep


def injected_windows(
    streams: Mapping[str, Sequence[LabeledMessage]],
    part: str,
    config: SelfSupervisedConfig,
) -> WindowSet:
    """Windows of one part: each device's clean region and its injected copies.

    Args:
        streams: Device id -> normal messages in time order.
        part: `train` (before each stream's cut) or `tuning` (after it).
        config: What to inject and how.

    Returns:
        Labeled windows; `devices` names the stream each row came from
        (`<device>` for the clean region, `<device>#<part>:<kind>:<copy>` for
        a copy), so the alarm lifecycle replays each copy on its own.
    """
    parts: dict[str, Sequence[LabeledMessage]] = {}
    first_seq: dict[str, int] = {}
    for device in sorted(streams):
        region, first = _region(streams[device], part, config)
        if len(region) <= first:
            _LOG.warning(
                "device skipped part=%s device=%s messages=%d needed=%d",
                part,
                device,
                len(region),
                first + 1,
            )
            continue
        parts[device], first_seq[device] = region, first
        for name, (variant, start) in _normal_variants(device, region, first, config):
            parts[name], first_seq[name] = variant, start
        for name, (copy, earliest) in _copies(
            device, region, first, part, config
        ).items():
            parts[name], first_seq[name] = copy, earliest
    windows = build_windows(parts, config.spec)
    keep = _scored_rows(windows, parts, first_seq, config.spec.window)
    kept = windows.subset(keep)
    _LOG.info(
        "windows built part=%s streams=%d windows=%d anomalous=%d dropped=%d",
        part,
        len(parts),
        len(kept),
        int(kept.labels.sum()),
        int((~keep).sum()),
    )
    return kept


def train_selfsup(
    streams: Mapping[str, Sequence[LabeledMessage]], config: SelfSupervisedConfig
) -> TrainedPair:
    """Fit both models on injected training copies; tune on injected held-out copies.

    Raises:
        ValueError: If a part ends up without normal or without anomalous
            windows (too little traffic for the warm-up and the cut).
        RuntimeError: If no cascade setting keeps the tuning FPR in budget.
    """
    started = time.monotonic()
    train = injected_windows(streams, "train", config)
    tuning = injected_windows(streams, "tuning", config)
    for name, part in (("train", train), ("tuning", tuning)):
        if len(np.unique(part.labels)) < 2:
            message = (
                f"the {name} part has {len(part)} windows of one class only; "
                "record more normal traffic per device"
            )
            raise ValueError(message)

    rf = train_rf(train.vectors, train.labels, config.seed)
    cnn = train_cnn(train.windows, train.labels, config.seed, epochs=config.cnn_epochs)
    rf_tuning = rf_scores(rf, tuning.vectors)
    cnn_tuning = predict_cnn(cnn, tuning.windows).astype(np.float64)
    choice = tune_cascade(tuning, rf_tuning, cnn_tuning)
    _LOG.info(
        "cascade tuned training=%s %s seconds=%.0f",
        TRAINING_MODE,
        " ".join(f"{key}={value}" for key, value in asdict(choice).items()),
        time.monotonic() - started,
    )
    summary = {
        "train": _summary(train),
        "tuning": _summary(tuning),
    }
    return TrainedPair(config, rf, cnn, choice, tuning, rf_tuning, cnn_tuning, summary)


def _summary(windows: WindowSet) -> dict[str, Any]:
    devices = sorted({name.partition("#")[0] for name in windows.devices.tolist()})
    kinds = windows.attack_types[windows.labels == 1].tolist()
    return {
        "windows": len(windows),
        "anomalous_windows": int(windows.labels.sum()),
        "devices": devices,
        "anomalous_windows_by_injector": {
            kind: kinds.count(kind) for kind in sorted(set(kinds))
        },
    }


def _rates(
    labels: npt.NDArray[np.int64], flags: npt.NDArray[np.bool_]
) -> dict[str, float]:
    positives = labels == 1
    hits = float(np.sum(flags & positives))
    recall = hits / max(float(positives.sum()), 1.0)
    precision = hits / max(float(flags.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fpr = float(np.mean(flags[~positives])) if (~positives).any() else 0.0
    return {"f1": f1, "fpr": fpr, "recall": recall}


def write_models(
    trained: TrainedPair, out: Path, source: Mapping[str, Any]
) -> tuple[Path, Path]:
    """Export both models to ONNX in `out`, with cards the sidecar loads.

    Args:
        trained: The fitted, tuned pair.
        out: Folder to write `rf.onnx`, `cnn.onnx` and their cards into.
        source: What the normal traffic was, for the cards' `training_data`.

    Returns:
        The paths of the RF and the CNN files.
    """
    from sidecar.detector import OnnxModel

    config, choice, tuning = trained.config, trained.choice, trained.tuning
    out.mkdir(parents=True, exist_ok=True)
    rf_path, cnn_path = out / "rf.onnx", out / "cnn.onnx"
    export_rf(trained.rf, rf_path)
    export_cnn(trained.cnn, cnn_path, config.spec.window)
    rf_alone = best_threshold(tuning.labels, trained.rf_tuning)
    cnn_alone = best_threshold(tuning.labels, trained.cnn_tuning)
    common: dict[str, Any] = {
        "version": datetime.now(UTC).strftime("%Y%m%d") + f"-ss{config.seed}",
        "training": TRAINING_MODE,
        "injectors": list(config.injectors),
        "seed": config.seed,
        "self_supervision": config.to_dict(),
        "feature_spec": config.spec.to_dict(),
        "lifecycle": {
            "alarm_after": choice.alarm_after,
            "clear_after": choice.clear_after,
        },
        "libraries": _libraries(),
        "training_data": {
            **source,
            "protocol": (
                "normal traffic only, no real labels read; faults injected into "
                "copies (converters.inject); each device's stream cut in time, "
                f"the last {config.tuning_share:.0%} held out; models fit on "
                "copies made before the cut; thresholds and lifecycle tuned on "
                "copies with faults after it"
            ),
            **trained.summary,
        },
        "validation_metrics": {
            "on": "held-out injected copies (tuning part)",
            "hybrid": {"f1": choice.f1, "fpr": choice.fpr, "recall": choice.recall},
            "rf_alone": _rates(tuning.labels, trained.rf_tuning > rf_alone),
            "cnn_alone": _rates(tuning.labels, trained.cnn_tuning > cnn_alone),
        },
        "fpr_budget": FPR_BUDGET,
        "calibration": CALIBRATION.to_dict(),
    }
    settings = Settings().models.model_copy(update={"directory": out})
    cards = {
        "rf": {
            "name": "rf",
            "kind": "RandomForestClassifier front filter",
            "file": rf_path.name,
            "input": RF_INPUT,
            "output": RF_OUTPUT,
            "output_column": 1,
            "features": list(FEATURE_NAMES),
            "thresholds": {"cascade": choice.rf_threshold, "alone": rf_alone},
            "parity": asdict(rf_parity(trained.rf, rf_path, tuning.vectors)),
            **common,
        },
        "cnn": {
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
            "parity": asdict(cnn_parity(trained.cnn, cnn_path, tuning.windows)),
            **common,
        },
    }
    for name, path, inputs in (
        ("rf", rf_path, tuning.vectors),
        ("cnn", cnn_path, tuning.windows),
    ):
        # Written once so the model loads for timing, then again with its cost.
        card_path(path).write_text(json.dumps(cards[name], indent=2) + "\n", "utf-8")
        runtime = OnnxModel(path, settings)
        cards[name]["inference_cost"] = {
            "microseconds_per_row": _cost_us(runtime.score, inputs),
            "batch": COST_BATCH,
            "threads": settings.intra_op_threads,
            "measured_on": "the training machine, onnxruntime CPU",
        }
        _write_card(card_path(path), cards[name])
    return rf_path, cnn_path


# Timing repeats of the inference cost, as converters.train measures it.
_COST_REPEATS = 20


def _cost_us(run: Any, inputs: npt.NDArray[np.float32]) -> float:
    batch = inputs[:COST_BATCH]
    run(batch)
    started = time.perf_counter()
    for _ in range(_COST_REPEATS):
        run(batch)
    elapsed = time.perf_counter() - started
    return round(elapsed / (_COST_REPEATS * max(len(batch), 1)) * 1e6, 3)


def _libraries() -> dict[str, str]:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def _write_card(path: Path, card: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    _LOG.info("model card written path=%s training=%s", path, TRAINING_MODE)


def _recording_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.jsonl"))
        if not files:
            message = f"no *.jsonl files in {path}"
            raise FileNotFoundError(message)
        return files
    if not path.is_file():
        message = f"no such recording: {path}"
        raise FileNotFoundError(message)
    return [path]


def load_recording(
    path: Path, settings: Settings | None = None
) -> dict[str, list[LabeledMessage]]:
    """Read recorded normal traffic, JSON lines, into per-device streams.

    Each line is one message: {"time": seconds, "topic": str, "payload": str}.
    Topics become devices through the sidecar's own topic rules (those of
    `settings`, the defaults when None); topics the sidecar would not score
    (commands, its own output, unknown shapes) are left out.

    Args:
        path: A `.jsonl` file, or a folder whose `*.jsonl` files are all read.
        settings: Whose topic rules and output prefix to apply.

    Raises:
        FileNotFoundError: If the path holds no recording.
        ValueError: If a line is not such an object; the message names the
            file and line.
    """
    settings = settings or Settings()
    router = TopicRouter(
        settings.topics, settings.output.prefix, settings.subscribe.exclude
    )
    streams: dict[str, list[LabeledMessage]] = {}
    skipped = 0
    for file in _recording_files(path):
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    topic = str(record["topic"])
                    payload = str(record["payload"]).encode()
                    received_at = float(record["time"])
                except (ValueError, KeyError, TypeError) as err:
                    message = (
                        f"{file}:{number}: expected a JSON object with time, "
                        f"topic and payload ({err})"
                    )
                    raise ValueError(message) from err
                route = router.route(topic)
                if route.kind is not RouteKind.TELEMETRY:
                    skipped += 1
                    continue
                item = LabeledMessage(
                    route.device, Message(topic, payload, received_at), 0, "normal"
                )
                streams.setdefault(route.device, []).append(item)
    for stream in streams.values():
        stream.sort(key=lambda item: item.message.received_at)
    _LOG.info(
        "recording loaded path=%s devices=%d messages=%d skipped_topics=%d",
        path,
        len(streams),
        sum(len(stream) for stream in streams.values()),
        skipped,
    )
    _warn_if_short(streams)
    return streams


def _warn_if_short(streams: Mapping[str, Sequence[LabeledMessage]]) -> None:
    """Warn when the recording spans less than a day; its models will flap."""
    times = [item.message.received_at for stream in streams.values() for item in stream]
    span = max(times) - min(times) if times else 0.0
    if span < RECOMMENDED_RECORDING_S:
        _LOG.warning(
            "recording spans hours=%.1f, less than the recommended %.0f: models "
            "trained on it take every rhythm it did not see for an anomaly and "
            "raise false alarms; record at least a day of normal traffic",
            span / 3600,
            RECOMMENDED_RECORDING_S / 3600,
        )


def normal_streams(
    dataset: str | None, data: Path | None
) -> tuple[dict[str, list[LabeledMessage]], dict[str, Any]]:
    """Per-device normal traffic from a source, and the source's description.

    `simulation` is the built-in simulation's normal part (seed 0, before any
    fault); `ton_iot` is the normal rows of TON_IoT's train split (labels used
    only to leave attack rows out, never to train); `skab`, `nab` and
    `mqttset` are the parts their evaluation protocols let a detector learn
    from (see `protocol_streams`); otherwise `data` is a JSON-lines recording
    (see `load_recording`).

    Raises:
        ValueError: If neither a dataset nor data is given.
    """
    if dataset == "simulation":
        streams = {
            device: stream[:NORMAL_MESSAGES] for device, stream in simulate().items()
        }
        return streams, {"dataset": "built-in simulation, normal part (seed 0)"}
    if data is None:
        message = "self-supervised training needs --data or --dataset simulation"
        raise ValueError(message)
    if dataset == "ton_iot":
        train = load_splits(data)["train"]
        streams = {
            device: [item for item in stream if item.label == 0]
            for device, stream in train.items()
        }
        return streams, {
            "dataset": "TON_IoT telemetry, train split, normal rows only",
            "folder": str(data),
        }
    if dataset in PROTOCOL_DATASETS:
        return protocol_streams(dataset, data)
    files = _recording_files(data)
    return load_recording(data), {
        "dataset": "recorded normal traffic (JSON lines)",
        "files": [
            {"file": file.name, "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
            for file in files
        ],
    }


def _as_normal(stream: Sequence[LabeledMessage]) -> list[LabeledMessage]:
    """The messages with their labels dropped: the learnable part is trusted."""
    return [replace(item, label=0, attack_type="normal") for item in stream]


def _skab_anomaly_free(folder: Path) -> dict[str, list[LabeledMessage]]:
    """SKAB's anomaly-free recording as one more device, read like the others."""
    from converters.skab import TOPIC_PREFIX as SKAB_PREFIX
    from converters.tabular import parse_time, safe_device, to_message

    path = folder / SKAB_ANOMALY_FREE
    if not path.is_file():
        _LOG.warning("skab anomaly-free file missing path=%s", path)
        return {}
    device = safe_device(SKAB_ANOMALY_FREE)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=";")
        channels = [name for name in reader.fieldnames or [] if name != "datetime"]
        stream = [
            to_message(
                SKAB_PREFIX,
                device,
                parse_time(row["datetime"]),
                {name: float(row[name]) for name in channels},
                0,
                "normal",
            )
            for row in reader
        ]
    return {device: stream}


def protocol_streams(
    dataset: str, data: Path
) -> tuple[dict[str, list[LabeledMessage]], dict[str, Any]]:
    """Normal traffic of a benchmark: only what its protocol lets a detector learn.

    - `skab`: the first 400 rows of every labeled file (the leaderboard's
      fit part), plus the separate anomaly-free recording, which SKAB's
      SOURCE.md describes as normal operation and no protocol scores.
    - `nab`: each series' probationary period, which NAB never scores.
    - `mqttset`: the attack-free start of the legitimate timeline.

    Labels inside those parts are dropped, never read: the learnable part is
    trusted as normal, as a detector deployed on it would have to (SKAB's
    `other/2` holds 296 fault rows there; they are learned as normal).

    Raises:
        ValueError: If the dataset is not one of `PROTOCOL_DATASETS`.
    """
    from converters.cli import load_dataset

    if dataset not in PROTOCOL_DATASETS:
        message = f"no protocol fit part for dataset {dataset!r}"
        raise ValueError(message)
    loaded = load_dataset(dataset, data, argparse.Namespace())
    streams = {
        device: _as_normal(stream)
        for device, stream in loaded.fit_streams.items()
        if stream
    }
    parts = ["the fit part of its evaluation protocol"]
    if dataset == "skab":
        streams.update(_skab_anomaly_free(data))
        parts.append(f"the anomaly-free recording {SKAB_ANOMALY_FREE}")
    return streams, {
        "dataset": f"{dataset}: {' and '.join(parts)}, labels dropped",
        "folder": str(data),
        "protocol_of_evaluation": loaded.protocol,
        "messages": sum(len(stream) for stream in streams.values()),
    }


def dataset_config(dataset: str | None, seed: int) -> SelfSupervisedConfig:
    """The injectors and feature groups a self-supervised run on `dataset` uses.

    SKAB and NAB are logger exports sampled at a steady rate: what they label
    are faults of the measured process, and their message timing and payload
    sizes describe the export, not the device. Their runs inject value faults
    only and read neither timing nor size. Every other source is traffic as a
    broker carries it, where floods, dropouts and malformed payloads are the
    faults, so every injector and every group is used.
    """
    if dataset in VALUE_ONLY_DATASETS:
        return SelfSupervisedConfig(
            spec=VALUE_ONLY_SPEC, injectors=VALUE_INJECTORS, seed=seed
        )
    return SelfSupervisedConfig(seed=seed)


def selfsup_command(
    dataset: str | None, data: Path | None, out: Path, seed: int
) -> int:
    """Train, tune and export a self-supervised pair; return the exit code."""
    started = time.monotonic()
    streams, source = normal_streams(dataset, data)
    config = dataset_config(dataset, seed)
    trained = train_selfsup(streams, config)
    write_models(trained, out, source)
    _LOG.info(
        "training done training=%s out=%s seconds=%.0f",
        TRAINING_MODE,
        out,
        time.monotonic() - started,
    )
    return 0
