"""`make demo`: embedded broker, the sidecar and replayed traffic, then a summary."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import TextIO

from converters.replay import interleave, replay
from converters.simulate import simulate
from converters.ton_iot import LabeledMessage, load_splits
from sidecar.broker import EmbeddedBroker
from sidecar.config import Settings
from sidecar.detector import load_cascade
from sidecar.service import Service
from sidecar.verdicts import Transition, Verdict

__all__ = ["demo_streams", "run_demo"]

_LOG = logging.getLogger(__name__)

# Per device, the demo replays this many normal test messages before the
# first attack episode and this many of the episode: enough to pass the
# 128-message warm-up and show detections, short enough to end in a minute.
DEMO_NORMAL = 300
DEMO_ATTACK = 200
# Time for the worker to finish the last batches after the replay.
SETTLE_S = 3.0
CONNECT_TIMEOUT_S = 10.0


def demo_streams(data: Path) -> tuple[str, dict[str, list[LabeledMessage]]]:
    """Pick the demo's traffic: a TON_IoT test excerpt, or the simulation."""
    if not any(data.glob("Train_Test_IoT_*.csv")):
        return "built-in simulation (no TON_IoT data found)", simulate()
    streams = {}
    for device, stream in load_splits(data)["test"].items():
        first_attack = next(
            (index for index, item in enumerate(stream) if item.label == 1), len(stream)
        )
        start = max(0, first_attack - DEMO_NORMAL)
        streams[device] = stream[start : first_attack + DEMO_ATTACK]
    return f"TON_IoT test split excerpt from {data}", streams


def run_demo(settings: Settings, data: Path, rate: float, out: TextIO) -> int:
    """Run the demo end to end and write what it caught to `out`."""
    source, streams = demo_streams(data)
    messages = list(interleave(streams))
    verdicts: list[Verdict] = []
    lock = threading.Lock()

    def show(verdict: Verdict) -> None:
        with lock:
            verdicts.append(verdict)
        out.write(
            f"[verdict] {verdict.device:<14} {verdict.state.value:<8} "
            f"score={verdict.score:.2f} seq={verdict.seq:<4} {verdict.reason()}\n"
        )
        out.flush()

    with EmbeddedBroker(port=0) as broker:
        live = settings.model_copy(
            update={
                "broker": settings.broker.model_copy(
                    update={"host": broker.host, "port": broker.port}
                )
            }
        )
        models = load_cascade(live.models, live.detection, live.window.length)
        service = Service(live, models, on_verdict=show)
        service.start()
        service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        out.write(
            f"demo: embedded broker on {broker.host}:{broker.port}; replaying "
            f"{len(messages)} messages from {source} at {rate:.0f}/s\n"
        )
        out.flush()
        replay(live.broker, messages, rate)
        time.sleep(SETTLE_S)
        service.stop()
        counters = service.counters

    _summary(out, streams, verdicts, counters)
    return 0


def _summary(
    out: TextIO,
    streams: dict[str, list[LabeledMessage]],
    verdicts: list[Verdict],
    counters: dict[str, int],
) -> None:
    by_device: dict[str, list[Verdict]] = defaultdict(list)
    for verdict in verdicts:
        by_device[verdict.device].append(verdict)
    out.write("\nsummary\n")
    caught = 0
    attacked = 0
    for device, stream in sorted(streams.items()):
        attack_seqs = [seq for seq, item in enumerate(stream) if item.label == 1]
        raised = [v for v in by_device.get(device, []) if v.state is Transition.RAISED]
        first_attack = attack_seqs[0] if attack_seqs else None
        early = [v for v in raised if first_attack is None or v.seq < first_attack]
        hits = [v for v in raised if first_attack is not None and v.seq >= first_attack]
        if attack_seqs:
            attacked += 1
            caught += bool(hits)
        kind = stream[first_attack].attack_type if first_attack is not None else "-"
        delay = f"{hits[0].seq - first_attack} msgs" if hits and first_attack else "-"
        out.write(
            f"  {device:<14} fault={kind:<12} caught={'yes' if hits else 'no':<4} "
            f"after={delay:<9} false_alarms_before={len(early)}\n"
        )
    out.write(
        f"caught {caught} of {attacked} faulty devices; "
        f"messages received={counters['received']} processed={counters['processed']} "
        f"shed={counters['shed']} unparsable={counters['unparsable']} "
        f"missing={counters['missing']}\n"
    )
