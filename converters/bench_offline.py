"""Benchmark stages without a broker: memory per device, and the worker's profile.

Memory is measured in a fresh process per probe (resident set size from
psutil), so nothing an earlier stage allocated hides or inflates it. The
profile runs the sidecar's own pipeline on the benchmark's readings with
cProfile, since cProfile sees only the thread it runs in.
"""

from __future__ import annotations

import cProfile
import gc
import logging
import multiprocessing
import pstats
import time
from typing import Any

from converters.bench_load import TOPIC_PREFIX, device_id, payloads
from sidecar.config import Settings
from sidecar.detector import LoadedModels, load_cascade
from sidecar.pipeline import Pipeline
from sidecar.service import build_pipeline
from sidecar.stream import Message

__all__ = [
    "KNOB_BATCH_SIZES",
    "KNOB_THREADS",
    "SCORED_DEVICES",
    "learning_messages",
    "measure_memory",
    "prewarm",
    "profile_worker",
    "sweep_knobs",
]

_LOG = logging.getLogger(__name__)

# Receive times of synthetic readings are this far apart; the shipped models
# read no timing (their cards switch the timing group off).
READING_GAP_S = 0.05
# Extra healthy readings per device after warm-up, so every device is being
# scored afterwards.
SCORED_SPARE = 2
# Readings per device in the memory probe of a whole fleet: a device's
# window and baseline arrays are allocated at its first reading of each key
# (every benchmark reading has both keys) and reused from then on, so one
# reading reaches its steady size before scoring.
FLEET_READINGS = 1
# Devices brought all the way to scoring in the memory probe, which adds
# what scoring keeps per device (alarm lifecycle, calibration): enough for
# their state (MBs) to stand well clear of the RSS noise (100s of kB).
SCORED_DEVICES = 300
BYTES_PER_MB = 1024 * 1024
# A probe loads both models and feeds up to 300,000 readings; minutes only
# when something is wrong.
PROBE_TIMEOUT_S = 600.0
# Lines of the profile kept, by own time and by cumulative time.
PROFILE_TOP = 12
# Batch sizes and onnxruntime intra-op thread counts the knob sweep tries
# (`limits.batch_size`, `models.intra_op_threads`): from a batch a few
# devices fill to four times the default, and the 2 cores of a small hub.
KNOB_BATCH_SIZES = (16, 64, 256, 1024)
KNOB_THREADS = (1, 2)
# The pipeline's steps, named by their functions in sidecar/, for the
# per-stage split of the profile.
STAGE_FUNCTIONS = {
    "route": "topics",
    "parse_payload": "payload",
    "update": "features",
    "features": "features",
    "score": "detector",
    "step": "verdicts",
}


def learning_messages(models: LoadedModels) -> int:
    """Messages a new device takes before its windows count (warm-up, calibration)."""
    spec = models.spec
    return max(spec.warmup, spec.window) + 1 + models.cascade.calibration.windows


def _readings(devices: int, per_device: int, first: int = 0) -> list[Message]:
    """Healthy readings, round robin over devices first..first+devices-1."""
    pool = payloads(seed=-1)
    topics = [f"{TOPIC_PREFIX}{device_id(first + device)}" for device in range(devices)]
    start = time.time() - per_device * READING_GAP_S
    messages = []
    for position in range(per_device):
        received_at = start + position * READING_GAP_S
        for slot, topic in enumerate(topics):
            payload = pool[(position * devices + slot) % len(pool)]
            messages.append(Message(topic, payload, received_at))
    return messages


def _feed(pipeline: Pipeline, messages: list[Message], batch_size: int) -> None:
    for offset in range(0, len(messages), batch_size):
        pipeline.process(messages[offset : offset + batch_size])


def prewarm(
    pipeline: Pipeline, models: LoadedModels, devices: int, batch_size: int
) -> int:
    """Feed each device healthy readings until it is scored; return how many each."""
    per_device = learning_messages(models) + SCORED_SPARE
    _feed(pipeline, _readings(devices, per_device), batch_size)
    return per_device


def _rss() -> int:
    import psutil

    gc.collect()
    return int(psutil.Process().memory_info().rss)


def _memory_probe(
    settings: Settings, fleets: list[int], scored: bool, results: Any
) -> None:
    """The body of one probe process: fixed cost, then each fleet size in turn.

    The process grows from one fleet size to the next (100, then 9,900 more
    for 10,000, ...), so the models load once per probe.
    """
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    pipeline = build_pipeline(settings, models)
    batch_size = settings.limits.batch_size
    # Run every code path once (both models, the lifecycle) before the
    # fixed cost is read, so lazily built buffers count as fixed.
    prewarm(pipeline, models, 1, batch_size)
    fixed = _rss()
    per_device = learning_messages(models) + SCORED_SPARE if scored else FLEET_READINGS
    tracked = 0
    probes = []
    for devices in sorted(fleets):
        messages = _readings(devices - tracked, per_device, first=1 + tracked)
        started = time.perf_counter()
        _feed(pipeline, messages, batch_size)
        seconds = time.perf_counter() - started
        del messages
        tracked = devices
        resident = _rss()
        probes.append(
            {
                "devices": devices,
                "readings_per_device": per_device,
                "fixed_mb": fixed / BYTES_PER_MB,
                "rss_mb": resident / BYTES_PER_MB,
                "per_device_bytes": (resident - fixed) / devices,
                "devices_tracked": pipeline.devices_tracked - 1,
                "feed_seconds": round(seconds, 2),
            }
        )
    results.put(probes)


def measure_memory(
    settings: Settings, fleets: list[int], scored: bool = False
) -> list[dict[str, Any]]:
    """Resident memory of a fresh pipeline process tracking each fleet size.

    Args:
        settings: The sidecar's settings; `max_devices` is raised to the
            largest fleet so no device is evicted.
        fleets: Device counts, measured in one process as it grows.
        scored: Feed every device until it is scored (else FLEET_READINGS).

    Returns:
        One probe per fleet size, smallest first.
    """
    largest = max(fleets) + 1
    limits = settings.limits.model_copy(
        update={"max_devices": max(settings.limits.max_devices, largest)}
    )
    settings = settings.model_copy(update={"limits": limits})
    context = multiprocessing.get_context("spawn")
    results: Any = context.Queue()
    process = context.Process(
        target=_memory_probe,
        args=(settings, fleets, scored, results),
        name="bench-memory",
        daemon=True,
    )
    process.start()
    try:
        probes: list[dict[str, Any]] = results.get(timeout=PROBE_TIMEOUT_S)
    finally:
        process.join(PROBE_TIMEOUT_S)
    return probes


def profile_worker(
    settings: Settings, models: LoadedModels, devices: int, messages: int
) -> dict[str, Any]:
    """Time and profile the worker's pipeline on scored healthy readings.

    Every device is pre-warmed first, so each profiled message is scored:
    the worker's steady state under the benchmark's load.
    """
    pipeline = build_pipeline(settings, models)
    batch_size = settings.limits.batch_size
    prewarm(pipeline, models, devices, batch_size)
    readings = _readings(devices, max(1, messages // devices))

    started = time.perf_counter()
    _feed(pipeline, readings, batch_size)
    plain_us = (time.perf_counter() - started) / len(readings) * 1e6

    profiler = cProfile.Profile()
    profiler.enable()
    _feed(pipeline, readings, batch_size)
    profiler.disable()
    stats = pstats.Stats(profiler)
    return {
        "messages": len(readings),
        "us_per_message": round(plain_us, 2),
        "stages_us_per_message": _stage_split(stats, len(readings)),
        "top_tottime": _top(stats, "tottime", len(readings)),
        "top_cumtime": _top(stats, "cumulative", len(readings)),
    }


def _timed_feed(
    settings: Settings, models: LoadedModels, devices: int, messages: int
) -> float:
    """Microseconds per scored message of a fresh pipeline, no profiler."""
    pipeline = build_pipeline(settings, models)
    batch_size = settings.limits.batch_size
    prewarm(pipeline, models, devices, batch_size)
    readings = _readings(devices, max(1, messages // devices))
    started = time.perf_counter()
    _feed(pipeline, readings, batch_size)
    return (time.perf_counter() - started) / len(readings) * 1e6


def sweep_knobs(settings: Settings, devices: int, messages: int) -> dict[str, Any]:
    """The worker's cost per message at each batch size and ONNX thread count.

    Each setting gets a fresh pipeline (and for threads, freshly loaded
    models), pre-warmed so every timed message is scored. A batch holds its
    messages' verdicts until it is done, so `batch_ms` (batch size times the
    cost per message) is what batching adds to latency at full load.
    """
    batches = []
    models = load_cascade(settings.models, settings.detection, settings.window.length)
    for batch_size in KNOB_BATCH_SIZES:
        limits = settings.limits.model_copy(update={"batch_size": batch_size})
        sized = settings.model_copy(update={"limits": limits})
        cost = _timed_feed(sized, models, devices, messages)
        batches.append(
            {
                "batch_size": batch_size,
                "us_per_message": round(cost, 2),
                "batch_ms": round(cost * batch_size / 1e3, 2),
            }
        )
    threads = []
    for count in KNOB_THREADS:
        update = {"intra_op_threads": count}
        threaded = settings.model_copy(
            update={"models": settings.models.model_copy(update=update)}
        )
        loaded = load_cascade(
            threaded.models, threaded.detection, threaded.window.length
        )
        cost = _timed_feed(threaded, loaded, devices, messages)
        threads.append({"intra_op_threads": count, "us_per_message": round(cost, 2)})
    return {"messages": messages, "batch_size": batches, "onnx_threads": threads}


def _stats_rows(stats: pstats.Stats) -> dict[tuple[str, int, str], Any]:
    rows: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    return rows


def _stage_split(stats: pstats.Stats, messages: int) -> dict[str, float]:
    """Cumulative µs per message in each step of the pipeline (under cProfile)."""
    split: dict[str, float] = {}
    for (path, _line, name), row in _stats_rows(stats).items():
        module = STAGE_FUNCTIONS.get(name)
        if module is not None and path.endswith(f"sidecar/{module}.py"):
            key = f"{module}.{name}"
            split[key] = round(split.get(key, 0.0) + row[3] / messages * 1e6, 2)
    return dict(sorted(split.items(), key=lambda item: -item[1]))


def _top(stats: pstats.Stats, order: str, messages: int) -> list[dict[str, Any]]:
    """The first PROFILE_TOP functions by `order`, with µs per message."""
    column = 2 if order == "tottime" else 3
    rows = sorted(
        _stats_rows(stats).items(), key=lambda item: item[1][column], reverse=True
    )
    return [
        {
            "function": f"{_short(path)}:{line}({name})",
            "calls": row[1],
            "tottime_us_per_message": round(row[2] / messages * 1e6, 2),
            "cumtime_us_per_message": round(row[3] / messages * 1e6, 2),
        }
        for (path, line, name), row in rows[:PROFILE_TOP]
    ]


def _short(path: str) -> str:
    """A path from its package folder on (sidecar/features.py, numpy/...)."""
    for marker in ("site-packages/", "/sidecar/", "/converters/"):
        if marker in path:
            head = marker.strip("/") + "/" if marker != "site-packages/" else ""
            return head + path.split(marker, 1)[1]
    return path
