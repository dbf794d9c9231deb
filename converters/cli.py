"""The `evaluate` command: load data, score every detector, report and save."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from converters.evaluate import (
    DETECTORS,
    EvaluationInputs,
    detector_metrics,
    evaluate_offline,
    evaluate_through_broker,
    format_table,
)
from converters.simulate import simulate
from converters.ton_iot import LabeledMessage, load_splits
from sidecar.config import Settings
from sidecar.detector import load_cascade

__all__ = ["evaluate_command", "parse_broker"]

_LOG = logging.getLogger(__name__)

PROTOCOL = {
    "ton_iot": (
        "TON_IoT Train_Test files; SOURCE.md leak-free protocol: whitespace "
        "stripped, booleans unified, exact duplicates dropped, rows sorted by ts; "
        "every contiguous block of one type cut in time order 60/20/20 into "
        "train/validation/test; thresholds and lifecycle tuned on validation "
        "only; timing and payload-size features disabled (SOURCE.md quirk 5); "
        "metrics per scored window (each message after a 128-message warm-up "
        "per device)"
    ),
    "simulation": "built-in simulated devices with injected faults (seeded)",
}


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


def _streams(args: argparse.Namespace) -> dict[str, list[LabeledMessage]]:
    if args.dataset == "simulation":
        return simulate()
    if args.data is None:
        message = "--data is required for --dataset ton_iot"
        raise argparse.ArgumentTypeError(message)
    return load_splits(Path(args.data))[args.split]


def _metrics(inputs: EvaluationInputs) -> dict[str, dict[str, Any]]:
    return {
        name: detector_metrics(inputs.windows, inputs.flags[name], inputs.scores[name])
        for name in DETECTORS
    }


def evaluate_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the evaluation the arguments ask for; return the exit code."""
    try:
        streams = _streams(args)
        broker = parse_broker(args.broker) if args.broker else None
    except (argparse.ArgumentTypeError, FileNotFoundError) as err:
        sys.stderr.write(f"anomaly-sidecar evaluate: {err}\n")
        return 2

    models = load_cascade(settings.models, settings.detection, settings.window.length)
    report: dict[str, Any] = {
        "dataset": args.dataset,
        "data": str(args.data) if args.data else None,
        "split": args.split,
        "protocol": PROTOCOL[args.dataset],
        "models": models.versions,
        "messages": sum(len(stream) for stream in streams.values()),
        "devices": sorted(streams),
    }
    offline = _metrics(evaluate_offline(settings, models, streams))
    report.update(offline)
    sys.stdout.write(f"in process ({args.split} split):\n{format_table(offline)}\n")

    if broker is not None:
        host, port = broker
        broker_settings = settings.model_copy(
            update={
                "broker": settings.broker.model_copy(
                    update={"host": host, "port": port}
                )
            }
        )
        inputs, counters = evaluate_through_broker(broker_settings, models, streams)
        through = _metrics(inputs)
        report["through_broker"] = {
            "broker": args.broker,
            **through,
            "sidecar_counters": counters,
        }
        sys.stdout.write(f"through broker {args.broker}:\n{format_table(through)}\n")

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        _LOG.info("evaluation written path=%s", args.json)
    return 0
