"""The benchmark's verdict on the issue's targets, and its report as text tables."""

from __future__ import annotations

from typing import Any

__all__ = ["format_report", "targets"]

# The targets of the issue ("Keep up with the broker").
THROUGHPUT_RATIO_TARGET = 0.9
PEER_RATIO_TARGET = 3.0
LATENCY_P99_TARGET_MS = 50.0
PER_DEVICE_BYTES_TARGET = 2 * 1024
FLEET_RSS_DEVICES = "100000"
FLEET_RSS_TARGET_MB = 300.0
# Stages whose runs carry a publish-side accounting.
ACCOUNTED_STAGES = ("ceiling", "sidecar", "peer", "ceiling_shared")
PROFILE_LINES = 10


def _get(report: dict[str, Any], *path: str) -> Any:
    value: Any = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _check(value: float | None, target: float, at_least: bool) -> dict[str, Any]:
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"target": target, "value": value, "met": met}


def _all_runs(report: dict[str, Any]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for stage in ACCOUNTED_STAGES:
        runs += _get(report, stage, "runs") or []
    for stage in ("latency", "latency_at_half_sidecar"):
        runs += _get(report, stage, "runs") or []
    for fleet in (_get(report, "scale") or {}).values():
        runs += fleet["runs"]
    return runs


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """Each target of the issue: its threshold, the measured value, met or not."""
    runs = _all_runs(report)
    # A message that vanished makes `lost` positive. A negative `lost` is one
    # counted twice: the broker's counter is global, so a copy of the
    # sidecar's own output dropped right as it unsubscribes shows there.
    lost = sum(max(run["lost"], 0) for run in runs) if runs else None
    overcounted = sum(min(run["lost"], 0) for run in runs)
    unaccounted = [run for run in runs if run.get("accounted") is False]
    return {
        "throughput_vs_ceiling": _check(
            report.get("ratio"), THROUGHPUT_RATIO_TARGET, at_least=True
        ),
        "throughput_vs_peer": _check(
            report.get("ratio_vs_peer"), PEER_RATIO_TARGET, at_least=True
        ),
        "latency_p99_ms": _check(
            _get(report, "latency_ms", "p99", "median"),
            LATENCY_P99_TARGET_MS,
            at_least=False,
        ),
        "bytes_per_device": _check(
            _get(report, "memory", "scored", "per_device_bytes", "median"),
            PER_DEVICE_BYTES_TARGET,
            at_least=False,
        ),
        "rss_mb_100000_devices": _check(
            _get(report, "memory", "fleet", FLEET_RSS_DEVICES, "rss_mb", "median"),
            FLEET_RSS_TARGET_MB,
            at_least=False,
        ),
        "nothing_lost_silently": {
            "target": 0,
            "value": lost,
            "overcounted": -overcounted,
            "met": None if lost is None else lost == 0 and not unaccounted,
        },
    }


def _number(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}"


def _row(label: str, figure: Any, digits: int = 0) -> str:
    if not isinstance(figure, dict):
        return f"| {label} | | {_number(figure, digits)} | |"
    cells = [_number(figure.get(key), digits) for key in ("min", "median", "max")]
    return f"| {label} | {' | '.join(cells)} |"


def _throughput_rows(report: dict[str, Any]) -> list[str]:
    qos = _get(report, "options", "qos")
    rows = [
        _row(
            f"ceiling: bare paho subscriber, msg/s (QoS {qos})",
            report["ceiling"]["per_s"],
        ),
        _row("sidecar: messages processed, msg/s", report["sidecar"]["per_s"]),
        _row("sidecar: messages received, msg/s", report["sidecar"]["received_per_s"]),
        _row("peer: River HalfSpaceTrees, msg/s", report["peer"]["per_s"]),
    ]
    shared = report.get("ceiling_shared")
    if shared is not None:
        processes = shared["runs"][0]["processes"]
        rows.append(
            _row(
                f"ceiling, {processes} processes on one shared subscription, msg/s",
                shared["per_s"],
            )
        )
    rows += [
        _row("ratio sidecar / ceiling", report["ratio_runs"], 3),
        _row("ratio sidecar / peer", report["ratio_vs_peer_runs"], 3),
    ]
    for stage in ACCOUNTED_STAGES:
        if stage not in report:
            continue
        rows.append(_row(f"{stage}: published", report[stage]["published"]))
        rows.append(
            _row(f"{stage}: broker dropped ($SYS)", report[stage]["broker_dropped"])
        )
        if stage == "sidecar":
            rows.append(_row("sidecar: shed (counted)", report[stage]["shed"]))
        rows.append(_row(f"{stage}: lost", report[stage]["lost"]))
    return rows


def _latency_rows(report: dict[str, Any], key: str, label: str) -> list[str]:
    latency = report.get(key)
    if latency is None:
        return []
    rate = _number(latency["rate"])
    rows = [f"| {label}: paced at {rate} msg/s | | | |"]
    if latency["verdicts_seen"]["max"]:
        rows += [
            _row(f"{label}: publish to verdict {name}, ms", figure, 1)
            for name, figure in latency["latency_ms"].items()
        ]
        rows += [
            _row(f"{label}: sidecar receive to verdict {name}, ms", figure, 1)
            for name, figure in latency["receive_to_verdict_ms"].items()
            if name != "p50"
        ]
    rows += [
        _row(f"{label}: publish to window score {name}, ms", figure, 1)
        for name, figure in latency["score_latency_ms"].items()
        if latency["scores_seen"]["max"]
    ]
    rows.append(_row(f"{label}: verdicts seen", latency["verdicts_seen"]))
    rows.append(_row(f"{label}: shed", latency["shed"]))
    rows.append(_row(f"{label}: broker dropped", latency["broker_dropped"]))
    return rows


def _scale_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for devices, fleet in (report.get("scale") or {}).items():
        count = _number(int(devices))
        rows.append(_row(f"{count} new devices: processed msg/s", fleet["per_s"]))
        rows.append(_row(f"{count} new devices: shed", fleet["shed"]))
    memory = report.get("memory") or {}
    for devices, probe in (memory.get("fleet") or {}).items():
        count = _number(int(devices))
        rows.append(_row(f"{count} devices: resident MB", probe["rss_mb"], 1))
        rows.append(
            _row(f"{count} devices: bytes per device", probe["per_device_bytes"])
        )
    scored = memory.get("scored")
    if scored:
        rows.append(_row("fixed cost (models loaded), MB", scored["fixed_mb"], 1))
        rows.append(
            _row("bytes per device, scored devices", scored["per_device_bytes"])
        )
    return rows


def _target_lines(report: dict[str, Any]) -> list[str]:
    lines = ["", "| target | goal | measured | met |", "| --- | --- | --- | --- |"]
    for name, check in report["targets"].items():
        met = {True: "yes", False: "NO", None: "-"}[check["met"]]
        value = check["value"]
        shown = _number(value, 3) if isinstance(value, float) else _number(value)
        lines.append(f"| {name} | {_number(check['target'], 1)} | {shown} | {met} |")
    return lines


def _profile_lines(report: dict[str, Any]) -> list[str]:
    profile = report.get("profile")
    if profile is None:
        return []
    receive = profile.get("receive_us_per_message")
    worker = profile["us_per_message"]
    slowest = "worker (Pipeline.process)"
    if receive is not None and receive > worker:
        slowest = "receive (paho)"
    lines = [
        "",
        (
            f"Per message: receive (paho, from the ceiling) {_number(receive, 1)} us, "
            f"worker (sidecar pipeline, no profiler) {_number(worker, 1)} us; "
            f"slowest stage: {slowest}."
        ),
        "",
        "Worker profile (cProfile, us per message; own time, then cumulative):",
        "",
        "| function | calls | own us | cumulative us |",
        "| --- | --- | --- | --- |",
    ]
    for entry in profile["top_tottime"][:PROFILE_LINES]:
        lines.append(
            f"| {entry['function']} | {entry['calls']:,} | "
            f"{entry['tottime_us_per_message']:.1f} | "
            f"{entry['cumtime_us_per_message']:.1f} |"
        )
    lines += ["", "Pipeline steps (cumulative us per message, under cProfile):", ""]
    lines += [
        f"- {name}: {value:.1f}"
        for name, value in profile["stages_us_per_message"].items()
    ]
    return lines


def _knob_lines(report: dict[str, Any]) -> list[str]:
    knobs = report.get("knobs")
    if knobs is None:
        return []
    lines = [
        "",
        "Knobs (worker alone, no profiler, us per scored message):",
        "",
        "| limits.batch_size | us per message | ms per batch |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {row['batch_size']} | {row['us_per_message']:.1f} | {row['batch_ms']:.1f} |"
        for row in knobs["batch_size"]
    ]
    lines += ["", "| models.intra_op_threads | us per message |", "| --- | --- |"]
    lines += [
        f"| {row['intra_op_threads']} | {row['us_per_message']:.1f} |"
        for row in knobs["onnx_threads"]
    ]
    queue_s = knobs.get("queue_s_at_sidecar_rate")
    if queue_s is not None:
        lines += [
            "",
            (
                f"A full queue (limits.queue_size) takes {queue_s:.1f} s to drain "
                "at the sidecar's measured rate: the age of a message scored "
                "under sustained overload."
            ),
        ]
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown: figures, targets, and the slowest stage's profile."""
    runs = _get(report, "options", "runs")
    lines = [
        f"| figure (runs: {runs}) | min | median | max |",
        "| --- | --- | --- | --- |",
    ]
    if "ceiling" in report:
        lines += _throughput_rows(report)
    lines += _latency_rows(report, "latency", "latency at 1/2 ceiling")
    lines += _latency_rows(report, "latency_at_half_sidecar", "latency at 1/2 sidecar")
    lines += _scale_rows(report)
    lines.append("")
    lines.append(
        f"ratio (sidecar/ceiling, median of rounds): "
        f"{_number(report.get('ratio'), 3)}; "
        f"ratio_vs_peer: {_number(report.get('ratio_vs_peer'), 3)}; "
        f"shared-subscription ceiling / ceiling: "
        f"{_number(report.get('ratio_shared_vs_ceiling'), 3)}"
    )
    lines += _target_lines(report)
    lines += _profile_lines(report)
    lines += _knob_lines(report)
    return "\n".join(lines) + "\n"
