"""Capture live broker traffic to JSON lines, for training on a home's own normal.

One line per message: `{"time": <unix seconds>, "topic": ..., "payload": ...,
"retain": ...}`, the format `anomaly-sidecar train --self-supervised --data`
reads. Payloads are written as text; bytes that are not UTF-8 become U+FFFD
(such payloads are junk to the models anyway). The sidecar's own output and
the broker's `$SYS` topics are not recorded, nor its Home Assistant
discovery configs.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from sidecar.config import Settings
from sidecar.discovery import own_config_pattern
from sidecar.mqtt import MqttAdapter
from sidecar.stream import Message
from sidecar.topics import TopicRouter

__all__ = ["RecordSummary", "format_line", "record"]

_LOG = logging.getLogger(__name__)

# Messages waiting for the writer. A home publishes tens a second; this holds
# minutes of that, and past it messages are counted as dropped, not buffered.
RECORD_QUEUE_SIZE = 100_000
# The writer wakes this often to notice the stop event and the time limit.
POLL_S = 0.2
CONNECT_TIMEOUT_S = 30.0
# Appended to the configured client id, so the recorder and a sidecar run
# from the same config can be connected at once.
CLIENT_ID_SUFFIX = "-record"


@dataclass(frozen=True)
class RecordSummary:
    """What one recording run wrote and skipped."""

    written: int
    bytes_written: int
    skipped_own: int
    dropped: int
    reason: str


def record(
    settings: Settings,
    out: Path,
    *,
    max_bytes: int,
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    progress: TextIO | None = None,
) -> RecordSummary:
    """Record until the size cap, the duration or `stop`, whichever comes first.

    Args:
        settings: Broker, subscriptions and output prefix (not recorded).
        out: The JSON-lines file to append to.
        max_bytes: Stop before the file grows past this many bytes.
        duration_s: Stop after this many seconds; None records until stopped.
        stop: Set it to stop (the CLI sets it on SIGINT/SIGTERM).
        progress: Where the progress bar goes; None for no bar.

    Raises:
        TimeoutError: The broker did not accept the subscription in time.
    """
    stop = stop or threading.Event()
    router = TopicRouter(
        settings.topics, settings.output.prefix, settings.subscribe.exclude
    )
    waiting: queue.Queue[Message] = queue.Queue(RECORD_QUEUE_SIZE)
    dropped = 0
    skipped_own = 0

    own_configs = own_config_pattern(settings.discovery)

    def enqueue(message: Message) -> None:
        nonlocal dropped, skipped_own
        topic = message.topic
        if (
            router.is_own_output(topic)
            or topic.startswith("$")
            or own_configs.fullmatch(topic) is not None
        ):
            skipped_own += 1
            return
        try:
            waiting.put_nowait(message)
        except queue.Full:
            dropped += 1

    # Its own client id: a sidecar running with the same config would
    # otherwise take the connection from the recorder and back, in a loop.
    broker = settings.broker.model_copy(
        update={"client_id": f"{settings.broker.client_id}{CLIENT_ID_SUFFIX}"}
    )
    adapter = MqttAdapter(broker, list(settings.subscribe.include), None, enqueue)
    adapter.start()
    written = 0
    size = out.stat().st_size if out.exists() else 0
    reason = "stopped"
    deadline = math.inf if duration_s is None else time.monotonic() + duration_s
    bar = tqdm(
        total=max_bytes,
        initial=size,
        unit="B",
        unit_scale=True,
        desc=f"recording {out.name}",
        file=progress,
        disable=progress is None,
    )
    try:
        if not adapter.subscribed.wait(CONNECT_TIMEOUT_S):
            message = (
                f"no subscription on {settings.broker.host}:{settings.broker.port} "
                f"within {CONNECT_TIMEOUT_S:.0f} s"
            )
            raise TimeoutError(message)
        _LOG.info("recording path=%s max_bytes=%d", out, max_bytes)
        with out.open("a", encoding="utf-8") as handle:
            while True:
                if stop.is_set():
                    break
                if time.monotonic() >= deadline:
                    reason = "duration reached"
                    break
                try:
                    item = waiting.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                line = format_line(item)
                if size + len(line.encode()) > max_bytes:
                    reason = "size cap reached"
                    break
                handle.write(line)
                size += len(line.encode())
                written += 1
                bar.update(len(line.encode()))
    finally:
        bar.close()
        adapter.stop()
    summary = RecordSummary(written, size, skipped_own, dropped, reason)
    _LOG.info(
        "recording ended reason=%r written=%d bytes=%d own_skipped=%d dropped=%d",
        summary.reason,
        summary.written,
        summary.bytes_written,
        summary.skipped_own,
        summary.dropped,
    )
    return summary


def format_line(message: Message) -> str:
    """One recorded message as a JSON line, newline included."""
    document = {
        "time": message.received_at,
        "topic": message.topic,
        "payload": message.payload.decode("utf-8", errors="replace"),
        "retain": message.retain,
    }
    return json.dumps(document, ensure_ascii=False) + "\n"
