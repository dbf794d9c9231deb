"""The `evaluate` command: load data, score every detector, report and save."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from converters.evaluate import (
    DETECTORS,
    EvaluationInputs,
    dataset_metrics,
    detector_metrics,
    evaluate_dataset,
    evaluate_through_broker,
    format_table,
)
from converters.tabular import LabeledStreams, TableError
from sidecar.config import Settings
from sidecar.detector import ModelCard, card_path, load_cascade
from sidecar.errors import ModelLoadError

__all__ = ["DATASETS", "evaluate_command", "load_dataset", "parse_broker"]

_LOG = logging.getLogger(__name__)

DATASETS = ("ton_iot", "skab", "nab", "mqttset", "csv", "simulation")
# Where each dataset lives under the shared data folder, when --data is not
# given.
DATA_FOLDERS = {
    "ton_iot": "ton_iot_telemetry",
    "skab": "skab",
    "nab": "nab",
    "mqttset": "mqttset_reduced_messages",
}
TON_IOT_PROTOCOL = (
    "TON_IoT Train_Test files; SOURCE.md leak-free protocol: whitespace "
    "stripped, booleans unified, exact duplicates dropped, rows sorted by ts; "
    "every contiguous block of one type cut in time order 60/20/20 into "
    "train/validation/test; thresholds and lifecycle tuned on validation "
    "only; timing and payload-size features disabled (SOURCE.md quirk 5); "
    "metrics per scored window (each message after a 128-message warm-up "
    "per device); baselines learn from the normal messages of the train split"
)
SIMULATION_PROTOCOL = (
    "built-in simulated devices with injected faults (seeded); every window "
    "scored; baselines learn from the first half of each device's messages "
    "(normal traffic: each device turns faulty later), which are scored too"
)
# Share of each simulated device's messages the baselines learn from: the
# simulation sends 300 normal messages, then 120 faulty ones.
SIMULATION_FIT_SHARE = 0.5


def parse_broker(text: str) -> tuple[str, int]:
    """Split `HOST:PORT`.

    Raises:
        argparse.ArgumentTypeError: If it is not HOST:PORT with a valid port.
    """
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        message = f"--broker must be HOST:PORT, got {text!r}"
        raise argparse.ArgumentTypeError(message)
    return host, int(port)


def _prefix_fit(streams: dict[str, list[Any]], share: float) -> dict[str, list[Any]]:
    return {device: s[: int(len(s) * share)] for device, s in streams.items()}


def load_dataset(
    dataset: str, data: Path | None, args: argparse.Namespace
) -> LabeledStreams:
    """Load one dataset as labeled streams with its protocol.

    Raises:
        argparse.ArgumentTypeError: If a required option is missing.
        FileNotFoundError: If the data are not where they should be.
        TableError: If a user table cannot be read.
    """
    if dataset == "simulation":
        from converters.simulate import simulate

        streams = simulate()
        return LabeledStreams(
            "simulation",
            streams,
            _prefix_fit(streams, SIMULATION_FIT_SHARE),
            dict.fromkeys(streams, 0),
            SIMULATION_PROTOCOL,
        )
    if data is None:
        message = f"--data is required for --dataset {dataset}"
        raise argparse.ArgumentTypeError(message)
    if dataset == "ton_iot":
        from converters.ton_iot import load_splits

        splits = load_splits(data)
        return LabeledStreams(
            "ton_iot",
            splits[args.split],
            splits["train"],
            dict.fromkeys(splits[args.split], 0),
            TON_IOT_PROTOCOL,
            fit_normal_only=True,
        )
    if dataset == "skab":
        from converters.skab import load_skab

        return load_skab(data)
    if dataset == "nab":
        from converters.nab import load_nab

        return load_nab(data)[0]
    if dataset == "mqttset":
        from converters.mqttset import load_mqttset

        return load_mqttset(data)
    from converters.tabular import load_table

    return load_table(
        data,
        time_column=args.time_column,
        device_column=args.device_column,
        label_column=args.label_column,
        value_columns=args.columns.split(",") if args.columns else None,
        fit_share=args.fit_share,
    )


def _with_models(settings: Settings, folder: Path | None) -> Settings:
    """Point the settings at another model folder, window length included."""
    if folder is None:
        return settings
    models = settings.models.model_copy(update={"directory": folder})
    spec = ModelCard.load(card_path(folder / models.rf)).spec
    return settings.model_copy(
        update={
            "models": models,
            "window": settings.window.model_copy(update={"length": spec.window}),
        }
    )


def _metrics(inputs: EvaluationInputs) -> dict[str, dict[str, Any]]:
    return {
        name: detector_metrics(inputs.windows, inputs.flags[name], inputs.scores[name])
        for name in DETECTORS
    }


def evaluate_command(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    """Run the evaluation the arguments ask for; return the exit code."""
    started = time.monotonic()
    try:
        broker = parse_broker(args.broker) if args.broker else None
        settings = _with_models(settings, args.models)
        data = load_dataset(args.dataset, args.data, args)
    except (
        argparse.ArgumentTypeError,
        FileNotFoundError,
        TableError,
        ModelLoadError,
    ) as err:
        sys.stderr.write(f"anomaly-sidecar evaluate: {err}\n")
        return 2

    models = load_cascade(settings.models, settings.detection, settings.window.length)
    report: dict[str, Any] = {
        "dataset": args.dataset,
        "data": str(args.data) if args.data else None,
        "split": args.split if args.dataset == "ton_iot" else None,
        "protocol": data.protocol,
        "models": models.versions,
        "models_directory": str(settings.models.directory),
        "messages": sum(len(stream) for stream in data.streams.values()),
        "devices": sorted(data.streams),
    }
    if data.notes:
        report["notes"] = data.notes
    try:
        evaluation = evaluate_dataset(
            settings, models, data, baselines=args.baselines, seed=args.seed
        )
    except TableError as err:
        sys.stderr.write(f"anomaly-sidecar evaluate: {err}\n")
        return 2
    offline = dataset_metrics(evaluation)
    report.update(offline)
    report["scored_windows"] = int(evaluation.scored.sum())
    out.write(f"in process ({args.dataset}):\n{format_table(offline)}\n")

    if broker is not None:
        host, port = broker
        broker_settings = data.settings_for(settings).model_copy(
            update={
                "broker": settings.broker.model_copy(
                    update={"host": host, "port": port}
                )
            }
        )
        inputs, counters = evaluate_through_broker(
            broker_settings, models, data.streams
        )
        through = _metrics(inputs)
        report["through_broker"] = {
            "broker": args.broker,
            **through,
            "sidecar_counters": counters,
        }
        out.write(f"through broker {args.broker}:\n{format_table(through)}\n")

    if args.report is not None:
        from converters.report import write_report

        page = write_report(evaluation, offline, settings.models, args.report)
        report["report"] = str(page)
        out.write(f"report written to {page}\n")

    report["runtime_s"] = round(time.monotonic() - started, 1)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _LOG.info("evaluation written path=%s", args.json)
    return 0
