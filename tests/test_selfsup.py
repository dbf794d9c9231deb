"""Specification of self-supervised training: normal traffic plus injected faults."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from converters.dataset import build_windows
from converters.inject import INJECTOR_NAMES, applies, inject
from converters.selfsup import (
    SELF_SUPERVISED_SPEC,
    SelfSupervisedConfig,
    TrainedPair,
    dataset_config,
    injected_windows,
    load_recording,
    normal_streams,
    protocol_streams,
    train_selfsup,
    write_models,
)
from converters.ton_iot import LabeledMessage
from converters.train import FPR_BUDGET
from converters.train_cnn import predict_cnn
from converters.train_rf import rf_scores
from sidecar.__main__ import main
from sidecar.config import DetectionSettings, ModelSettings
from sidecar.detector import load_cascade
from sidecar.record import format_line

# The device kept out of training: a zigbee2mqtt fridge sensor, judged only
# through the baseline it learns of its own normal traffic.
UNSEEN = "kitchen_fridge"
# Small enough for the whole module to train in about 15 s on 2 cores.
CONFIG = SelfSupervisedConfig(seed=0, copies=2, cnn_epochs=4)
# Seeds of the faults put into the unseen device, apart from any training seed.
FAULT_SEED = 100
# Past the warm-up of 128 messages plus the first full window.
EARLIEST = 129
# ROC AUC of the unseen device's faulty windows against its normal ones.
# Measured with CONFIG at training seeds 0, 1 and 2: RF 0.975/0.969/0.954,
# fused (RF + CNN) / 2 0.947/0.958/0.949; 0.9 keeps a margin for library
# versions while staying far above chance (0.5). Held-out devices unlike the
# ones left in training separate worse (seed 0, RF/fused): washer_plug
# 0.87/0.79; esp_living, a bare number with a slow wave, 0.73/0.72;
# front_door, a binary contact whose rare changes look like faults to a model
# that never saw one, 0.68/0.60.
MIN_UNSEEN_AUC = 0.9


@pytest.fixture(scope="module")
def streams() -> dict[str, list[LabeledMessage]]:
    normal, _ = normal_streams("simulation", None)
    return normal


@pytest.fixture(scope="module")
def trained(streams: Mapping[str, list[LabeledMessage]]) -> TrainedPair:
    seen = {device: stream for device, stream in streams.items() if device != UNSEEN}
    return train_selfsup(seen, CONFIG)


def test_unseen_device_faults_score_above_its_normal_traffic(
    streams: Mapping[str, list[LabeledMessage]], trained: TrainedPair
) -> None:
    """Test that a model trained without a device separates that device's faults.

    The held-out device's normal stream and one injected copy per fault kind
    go through the live feature path; every window ending on an injected
    message is ranked against every window of the clean stream.
    """
    normal = streams[UNSEEN]
    parts = {"clean": normal}
    for number, kind in enumerate(INJECTOR_NAMES):
        if applies(kind, normal):
            parts[kind] = inject(normal, kind, FAULT_SEED + number, earliest=EARLIEST)
    windows = build_windows(parts, CONFIG.spec)
    clean = windows.devices == "clean"
    faulty = ~clean & (windows.labels == 1)
    rows = clean | faulty
    rf = rf_scores(trained.rf, windows.vectors)
    cnn = predict_cnn(trained.cnn, windows.windows).astype(np.float64)

    assert UNSEEN not in trained.summary["train"]["devices"]
    assert len(parts) == len(INJECTOR_NAMES) + 1
    assert faulty.sum() > 100
    assert roc_auc_score(faulty[rows], rf[rows]) >= MIN_UNSEEN_AUC
    assert roc_auc_score(faulty[rows], (rf + cnn)[rows] / 2) >= MIN_UNSEEN_AUC


def test_train_selfsup_tunes_within_the_false_alarm_budget(
    trained: TrainedPair,
) -> None:
    """Test that the tuned cascade keeps the held-out FPR within the budget."""
    assert trained.choice.fpr <= FPR_BUDGET
    assert trained.choice.recall > 0.5
    tuned_on = set(trained.tuning.attack_types[trained.tuning.labels == 1].tolist())
    assert tuned_on == set(INJECTOR_NAMES)


def test_tuning_windows_all_come_after_the_training_windows(
    streams: Mapping[str, list[LabeledMessage]],
) -> None:
    """Test that the held-out part is later in time than all training data."""
    seen = {UNSEEN: streams[UNSEEN]}
    train = injected_windows(seen, "train", CONFIG)
    tuning = injected_windows(seen, "tuning", CONFIG)
    assert train.times.max() < tuning.times.min()
    assert set(train.labels.tolist()) == set(tuning.labels.tolist()) == {0, 1}


def test_selfsup_windows_leave_out_normal_windows_that_show_a_fault(
    streams: Mapping[str, list[LabeledMessage]],
) -> None:
    """Test that no kept normal window still holds an injected message.

    After a spike, the next `window - 1` windows contain it but end on a normal
    message; they are neither clean normal traffic nor the labeled fault.
    """
    windows = injected_windows({UNSEEN: streams[UNSEEN]}, "train", CONFIG)
    window = CONFIG.spec.window
    for copy in {name for name in windows.devices.tolist() if ":spike:" in name}:
        rows = windows.devices == copy
        seqs, labels = windows.seqs[rows], windows.labels[rows]
        spiked = seqs[labels == 1]
        assert len(spiked) >= 1
        for seq in seqs[labels == 0].tolist():
            assert not np.any((spiked <= seq) & (spiked > seq - window))


def test_selfsup_spec_reads_every_feature_group() -> None:
    """Test that timing, size, level and shape all reach both models."""
    assert SELF_SUPERVISED_SPEC.disabled_groups == ()
    assert SELF_SUPERVISED_SPEC.feature_mask().all()
    assert SELF_SUPERVISED_SPEC.channel_mask().all()


def test_write_models_writes_cards_the_sidecar_loads(
    trained: TrainedPair, tmp_path: Path
) -> None:
    """Test that the exported pair loads as the sidecar's cascade, cards intact."""
    write_models(trained, tmp_path, {"dataset": "test"})
    models = load_cascade(
        ModelSettings(directory=tmp_path), DetectionSettings(), CONFIG.spec.window
    )
    card = json.loads((tmp_path / "cnn.card.json").read_text(encoding="utf-8"))
    assert models.spec == CONFIG.spec
    assert card["training"] == "self-supervised"
    assert card["injectors"] == list(INJECTOR_NAMES)
    assert card["seed"] == CONFIG.seed
    assert card["parity"]["label_mismatch_rate"] == 0.0
    assert models.cascade.rf_threshold.value == trained.choice.rf_threshold


def test_load_recording_groups_telemetry_by_device(tmp_path: Path) -> None:
    """Test that a JSON-lines recording becomes time-ordered per-device streams."""
    lines = [
        {"time": 20.0, "topic": "zigbee2mqtt/hall", "payload": '{"temperature": 20}'},
        {"time": 10.0, "topic": "zigbee2mqtt/hall", "payload": '{"temperature": 19}'},
        {"time": 15.0, "topic": "tele/plug/SENSOR", "payload": '{"Power": 3}'},
        {"time": 16.0, "topic": "zigbee2mqtt/hall/set", "payload": '{"state": "ON"}'},
    ]
    path = tmp_path / "home.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), "utf-8")
    streams = load_recording(path)
    assert sorted(streams) == ["hall", "plug"]
    assert [item.message.received_at for item in streams["hall"]] == [10.0, 20.0]
    assert all(item.label == 0 for item in streams["hall"] + streams["plug"])


@pytest.mark.parametrize(("span_s", "warned"), [(3600.0, True), (90_000.0, False)])
def test_load_recording_warns_when_it_spans_less_than_a_day(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, span_s: float, warned: bool
) -> None:
    """Test that a short recording is named as one before its models flap."""
    lines = [
        {"time": at, "topic": "zigbee2mqtt/hall", "payload": '{"temperature": 20}'}
        for at in (0.0, span_s)
    ]
    path = tmp_path / "home.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), "utf-8")

    with caplog.at_level(logging.WARNING, logger="converters.selfsup"):
        load_recording(path)

    assert ("record at least a day" in caplog.text) is warned


def test_load_recording_names_the_line_it_cannot_read(tmp_path: Path) -> None:
    """Test that a malformed line is reported with its file and line number."""
    path = tmp_path / "home.jsonl"
    path.write_text('{"time": 1, "topic": "a/b", "payload": "1"}\nnot json\n', "utf-8")
    with pytest.raises(ValueError, match=r"home\.jsonl:2"):
        load_recording(path)


def test_train_command_self_supervised_needs_an_output_folder(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Test that self-supervised training never defaults onto the shipped models."""
    code = main(["train", "--self-supervised", "--dataset", "simulation"])
    assert code == 2
    assert "--out" in capsys.readouterr().err


def test_train_command_supervised_still_needs_ton_iot(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Test that without --self-supervised the labeled TON_IoT path is required."""
    code = main(["train", "--dataset", "simulation", "--out", "out/never"])
    assert code == 2
    assert "--dataset ton_iot" in capsys.readouterr().err


def test_train_from_recording_writes_models_the_sidecar_loads(
    streams: Mapping[str, list[LabeledMessage]], tmp_path: Path
) -> None:
    """Test `train --from-recording`: a `record` file in, a loadable pair out."""
    recording = tmp_path / "home.jsonl"
    with recording.open("w", encoding="utf-8") as lines:
        for stream in streams.values():
            lines.writelines(format_line(item.message) for item in stream)
    out = tmp_path / "models-home"

    code = main(["train", "--from-recording", str(recording), "--out", str(out)])

    assert code == 0
    card = json.loads((out / "rf.card.json").read_text(encoding="utf-8"))
    assert card["training"] == "self-supervised"
    models = load_cascade(
        ModelSettings(directory=out),
        DetectionSettings(),
        card["feature_spec"]["window"],
    )
    assert models.versions["rf"] == card["version"]


def test_train_from_recording_refuses_a_second_data_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Test that --from-recording with --dataset is an error, not a guess."""
    code = main(
        [
            "train",
            "--from-recording",
            str(tmp_path / "home.jsonl"),
            "--dataset",
            "skab",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2
    assert "--from-recording" in capsys.readouterr().err


def _skab_file(path: Path, rows: int, fault_from: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["datetime;Current;Pressure;anomaly;changepoint"]
    for i in range(rows):
        minute, second = divmod(i, 60)
        label = float(i >= fault_from)
        lines.append(f"2020-03-09 10:{minute:02d}:{second:02d};1.{i % 7};0.3;{label};0")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_protocol_streams_learn_skab_only_from_fit_rows_and_anomaly_free(
    tmp_path: Path,
) -> None:
    """Test that SKAB normal traffic is each file's first 400 rows plus anomaly-free.

    The fit part's own labels are dropped, not used: a fault inside it (as
    in SKAB's other/2) is learned as normal, never as a positive example.
    """
    _skab_file(tmp_path / "valve1" / "0.csv", 600, fault_from=500)
    _skab_file(tmp_path / "other" / "2.csv", 450, fault_from=100)
    free = tmp_path / "anomaly-free" / "anomaly-free.csv"
    free.parent.mkdir()
    free.write_text(
        "datetime;Current;Pressure\n2020-02-08 10:00:00;1.0;0.3\n"
        "2020-02-08 10:00:01;1.1;0.3\n",
        encoding="utf-8",
    )

    streams, source = protocol_streams("skab", tmp_path)

    assert {device: len(s) for device, s in streams.items()} == {
        "valve1.0": 400,
        "other.2": 400,
        "anomaly-free.anomaly-free": 2,
    }
    assert all(item.label == 0 for s in streams.values() for item in s)
    assert "anomaly-free" in source["dataset"]


def test_dataset_config_reads_values_only_on_logger_exports() -> None:
    """Test that SKAB and NAB train on value faults without timing or size groups.

    Broker traffic (MQTTset, recordings) keeps every injector and group: its
    floods and malformed payloads are faults of timing and size.
    """
    for dataset in ("skab", "nab"):
        config = dataset_config(dataset, seed=3)
        assert set(config.spec.disabled_groups) == {"timing", "size"}
        assert "flood" not in config.injectors
        assert "level_shift" in config.injectors
        assert config.seed == 3
    assert dataset_config("mqttset", seed=0).injectors == INJECTOR_NAMES
    assert dataset_config(None, seed=0).spec == SELF_SUPERVISED_SPEC
