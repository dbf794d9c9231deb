"""The benchmark's accounting: every message published is received, dropped or shed.

Speed stays out of the test suite; these tests check that a tiny benchmark
against a real Mosquitto loses nothing silently and reports what it should.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mqtt_helpers import BrokerAddress

from converters.bench import spread
from converters.bench_load import device_id, device_index
from converters.bench_offline import KNOB_BATCH_SIZES, KNOB_THREADS, sweep_knobs
from converters.bench_report import format_report, targets
from sidecar.__main__ import main
from sidecar.config import Settings

StartMosquitto = Callable[..., BrokerAddress]

# `$SYS` every second, so the broker's drop counter is current after a run
# (Mosquitto's default is every 10 s).
SYS_INTERVAL_LINE = "sys_interval 1"
# A queue this small overflows within the first fraction of a second of
# full load, so shedding is exercised in every sidecar run.
TINY_QUEUE = 50
FIGURE_KEYS = {"min", "median", "max"}


def _bench(broker: BrokerAddress, tmp_path: Path) -> dict[str, Any]:
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"limits:\n  queue_size: {TINY_QUEUE}\n")
    report = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--broker",
            f"{broker.host}:{broker.port}",
            "--config",
            str(config),
            "--runs",
            "1",
            "--seconds",
            "0.5",
            "--workers",
            "1",
            "--devices",
            "20",
            "--stages",
            "throughput,latency",
            "--json",
            str(report),
        ]
    )
    assert code == 0
    result: dict[str, Any] = json.loads(report.read_text())
    return result


@pytest.mark.broker
def test_bench_accounts_for_every_message(
    start_mosquitto: StartMosquitto,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Test that published = received + broker drops in every run, sheds count.

    One tiny benchmark (a single broker test keeps the suite short) also
    checks the documented keys of the JSON report.
    """
    report = _bench(start_mosquitto(SYS_INTERVAL_LINE), tmp_path)

    runs = [
        *report["ceiling"]["runs"],
        *report["sidecar"]["runs"],
        *report["peer"]["runs"],
        *report["ceiling_shared"]["runs"],
        *report["latency"]["runs"],
        *report["latency_at_half_sidecar"]["runs"],
    ]
    for run in runs:
        assert run["published"] > 0
        assert run["broker_dropped"] is not None
        # Negative is a copy counted twice, never a message missing: the
        # sidecar can receive a verdict of its own published between the
        # bench's last count of its output and its unsubscribe.
        assert run["lost"] <= 0
    # Nothing but load reaches a bare subscriber: every message is received
    # or in the broker's drop counter (the sidecar's own output also has
    # copies in that counter, which `lost` takes into account).
    bare = ("ceiling", "peer", "ceiling_shared")
    for run in [run for stage in bare for run in report[stage]["runs"]]:
        assert run["published"] == run["received"] + run["broker_dropped"]
    for run in report["sidecar"]["runs"]:
        assert run["accounted"]
        assert run["shed"] > 0
        assert run["received"] == run["processed"] + run["shed"] + run["queue_depth"]
    assert report["targets"]["nothing_lost_silently"]["met"] is True
    assert "| target |" in capsys.readouterr().out

    # The documented keys: ratios, latency, every figure as min/median/max.
    assert isinstance(report["ratio"], float)
    assert isinstance(report["ratio_vs_peer"], float)
    assert isinstance(report["ratio_shared_vs_ceiling"], float)
    assert report["ceiling_shared"]["runs"][0]["processes"] == 2
    assert set(report["latency_ms"]) == {"p50", "p99", "max"}
    for figure in report["latency_ms"].values():
        assert set(figure) == FIGURE_KEYS
    for stage in ("ceiling", "sidecar", "peer", "ceiling_shared"):
        for name in ("per_s", "published", "received", "broker_dropped", "lost"):
            assert set(report[stage][name]) == FIGURE_KEYS


def test_spread_ignores_missing_values() -> None:
    """Test that min/median/max skip None and are None when nothing is left."""
    assert spread([3, None, 1, 2]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert spread([None]) == {"min": None, "median": None, "max": None}


def test_targets_flag_a_lost_message() -> None:
    """Test that one message unaccounted for fails the nothing-lost target."""
    run = {"published": 10, "received": 8, "broker_dropped": 1, "lost": 1}
    checks = targets({"ceiling": {"runs": [run]}})

    assert checks["nothing_lost_silently"]["met"] is False
    table = format_report({"options": {"runs": 1}, "targets": checks})
    assert "| nothing_lost_silently | 0 | 1 | NO |" in table


def test_device_ids_round_trip() -> None:
    """Test that device numbers survive the trip through their ids."""
    assert device_index(device_id(42)) == 42
    assert device_index("kitchen_fridge") is None


def test_sweep_knobs_times_every_batch_size_and_thread_count() -> None:
    """Test that the knob sweep reports each setting and the report shows them."""
    knobs = sweep_knobs(Settings(), devices=2, messages=40)

    assert [row["batch_size"] for row in knobs["batch_size"]] == list(KNOB_BATCH_SIZES)
    assert [row["intra_op_threads"] for row in knobs["onnx_threads"]] == list(
        KNOB_THREADS
    )
    for row in [*knobs["batch_size"], *knobs["onnx_threads"]]:
        assert row["us_per_message"] > 0
    table = format_report({"options": {"runs": 1}, "targets": {}, "knobs": knobs})
    assert "| limits.batch_size | us per message | ms per batch |" in table
    assert "| models.intra_op_threads | us per message |" in table
