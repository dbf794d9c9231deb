"""Replay labeled message streams into a broker, in order, at a steady rate."""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterator, Mapping, Sequence

from converters.ton_iot import LabeledMessage
from sidecar.config import BrokerSettings
from sidecar.mqtt import MqttAdapter

__all__ = ["interleave", "replay"]

_LOG = logging.getLogger(__name__)

# How long to wait for the replay client to connect before giving up.
CONNECT_TIMEOUT_S = 10.0
# How long to wait for the last QoS 1 acknowledgement at the end.
DRAIN_TIMEOUT_S = 30.0
# Replaying runs ahead of the broker by at most this many unacknowledged
# messages; Mosquitto's max_inflight_messages default is 20 per client, and
# larger windows only queue inside the broker.
REPLAY_INFLIGHT = 20


def interleave(
    streams: Mapping[str, Sequence[LabeledMessage]],
) -> Iterator[LabeledMessage]:
    """Merge per-device streams round-robin, keeping each device's order.

    The devices of a dataset were often recorded at different times; merging
    by position rather than by timestamp keeps every device active throughout
    a replay instead of playing them one after another.
    """
    heap = [(0, device) for device in sorted(streams)]
    heapq.heapify(heap)
    while heap:
        position, device = heapq.heappop(heap)
        messages = streams[device]
        if position < len(messages):
            yield messages[position]
            heapq.heappush(heap, (position + 1, device))


def replay(
    broker: BrokerSettings,
    messages: Sequence[LabeledMessage],
    rate: float,
    qos: int = 1,
) -> int:
    """Publish messages in order at `rate` per second; return how many were sent.

    Raises:
        ConnectionError: If the broker cannot be reached in time.
    """
    settings = broker.model_copy(update={"client_id": f"{broker.client_id}-replay"})
    adapter = MqttAdapter(
        settings, [], None, lambda _message: None, max_inflight=REPLAY_INFLIGHT
    )
    adapter.start()
    if not adapter.connected.wait(CONNECT_TIMEOUT_S):
        adapter.stop()
        message = f"replay could not connect to {broker.host}:{broker.port}"
        raise ConnectionError(message)

    started = time.monotonic()
    last = None
    for index, item in enumerate(messages):
        due = started + index / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        last = adapter.publish(item.message.topic, item.message.payload, qos)
    if last is not None and not last.wait(DRAIN_TIMEOUT_S):
        _LOG.warning("replay drain timed out sent=%d", len(messages))
    adapter.stop()
    _LOG.info(
        "replay done sent=%d seconds=%.1f", len(messages), time.monotonic() - started
    )
    return len(messages)
