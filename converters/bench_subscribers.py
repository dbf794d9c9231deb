"""The benchmark's subscribers: the bare ceiling, the River peer, a verdict listener."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

__all__ = [
    "BareSubscriber",
    "CountingProcess",
    "RiverPeer",
    "VerdictListener",
    "VerdictSeen",
]

_LOG = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT_S = 10.0
# paho's default; Mosquitto's max_inflight_messages default is also 20.
SUBSCRIBER_INFLIGHT = 20
# The River peer: HalfSpaceTrees' own defaults (10 trees of height 8, window
# 250) behind a MinMaxScaler, as River's documentation composes it, and one
# model for all devices: one per device costs about 1.1 MB (measured with
# tracemalloc), which no fleet of thousands affords.
RIVER_SEED = 42
# How often a CountingProcess shares its count; the bench waits for counts
# to stay unchanged for much longer (bench_stages.QUIET_S).
COUNT_SHARE_S = 0.02
# Where the sidecar publishes per-window scores (sidecar.service.SCORES_LEVEL).
SCORES_LEVEL = "_scores"


class BareSubscriber:
    """A paho subscriber that does nothing but count what arrives.

    Args:
        host: The broker's address.
        port: The broker's port.
        topic_filter: What to subscribe to (one filter or several).
        qos: The subscription's maximum QoS.
    """

    def __init__(
        self, host: str, port: int, topic_filter: str | list[str], qos: int
    ) -> None:
        self.count = 0
        self._subscribed = threading.Event()
        self._filter = topic_filter
        self._qos = qos
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-{type(self).__name__}-{uuid.uuid4().hex[:8]}",
        )
        self._client.max_inflight_messages_set(SUBSCRIBER_INFLIGHT)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.connect(host, port)
        self._client.loop_start()
        if not self._subscribed.wait(SUBSCRIBE_TIMEOUT_S):
            self.close()
            message = f"no SUBACK from {host}:{port} for {topic_filter!r}"
            raise TimeoutError(message)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: Any,
        properties: Any,
    ) -> None:
        filters = [self._filter] if isinstance(self._filter, str) else self._filter
        client.subscribe([(topic_filter, self._qos) for topic_filter in filters])

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reasons: Any,
        properties: Any,
    ) -> None:
        self._subscribed.set()

    def _on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        self.count += 1


def _count_in_process(
    host: str, port: int, filters: list[str], shared: Any, ready: Any, stop: Any
) -> None:
    """The body of a CountingProcess: subscribe, then publish the count."""
    subscriber = BareSubscriber(host, port, filters, qos=0)
    ready.set()
    while not stop.wait(COUNT_SHARE_S):
        shared.value = subscriber.count
    shared.value = subscriber.count
    subscriber.close()


class CountingProcess:
    """A BareSubscriber in a process of its own, so no other thread slows it.

    In the bench's process it would compete for the GIL with the sidecar
    under test, fall behind, and have the broker drop its messages.

    Args:
        host: The broker's address.
        port: The broker's port.
        filters: What to subscribe to (at QoS 0, the fastest delivery).
    """

    def __init__(self, host: str, port: int, filters: list[str]) -> None:
        context = multiprocessing.get_context("forkserver")
        self._shared: Any = context.Value("q", 0)
        self._stop = context.Event()
        ready = context.Event()
        self._process = context.Process(
            target=_count_in_process,
            args=(host, port, filters, self._shared, ready, self._stop),
            name="bench-counter",
            daemon=True,
        )
        self._process.start()
        if not ready.wait(SUBSCRIBE_TIMEOUT_S):
            self.close()
            message = f"counting subscriber not ready on {host}:{port}"
            raise TimeoutError(message)

    @property
    def count(self) -> int:
        """Messages received so far (at most COUNT_SHARE_S old)."""
        return int(self._shared.value)

    def close(self) -> None:
        """Stop the process."""
        self._stop.set()
        self._process.join(SUBSCRIBE_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()


class RiverPeer(BareSubscriber):
    """What a Python user builds instead: River scoring each message in the callback.

    Every message is decoded (json), scored and learned by a
    MinMaxScaler | HalfSpaceTrees pipeline, one message at a time, in paho's
    callback. Numeric leaves of the JSON object are the features.
    """

    def __init__(self, host: str, port: int, topic_filter: str, qos: int) -> None:
        from river import anomaly, compose, preprocessing

        self.scored = 0
        self.unparsable = 0
        self._model = compose.Pipeline(
            preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=RIVER_SEED)
        )
        super().__init__(host, port, topic_filter, qos)

    def _on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        self.count += 1
        try:
            document = json.loads(message.payload)
        except ValueError:
            self.unparsable += 1
            return
        if not isinstance(document, dict):
            self.unparsable += 1
            return
        features = {
            key: float(value)
            for key, value in document.items()
            if isinstance(value, int | float)
        }
        self._model.score_one(features)
        self._model.learn_one(features)
        self.scored += 1


@dataclass(frozen=True)
class VerdictSeen:
    """One verdict as it reached a subscriber of the output topics."""

    arrived: float
    device: str
    seq: int
    state: str
    received_at: float


class VerdictListener(BareSubscriber):
    """Record every verdict and window score under the output prefix, on arrival.

    Status, probe and health topics, and the rule-based conditions one level
    below a device, are left out. Scores carry no receive time (nan).
    """

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.verdicts: list[VerdictSeen] = []
        self.scores: list[VerdictSeen] = []
        self._lock = threading.Lock()
        self._level = f"{prefix}/"
        self._scores_level = f"{prefix}/{SCORES_LEVEL}/"
        super().__init__(host, port, f"{prefix}/#", qos=1)

    def snapshot(self) -> tuple[list[VerdictSeen], list[VerdictSeen]]:
        """The verdicts and the scores recorded so far."""
        with self._lock:
            return list(self.verdicts), list(self.scores)

    def _on_message(
        self, client: paho.Client, userdata: Any, message: paho.MQTTMessage
    ) -> None:
        arrived = time.time()
        self.count += 1
        topic = message.topic
        is_score = topic.startswith(self._scores_level)
        rest = topic[len(self._level) :]
        if message.retain or not (is_score or _is_device_level(rest)):
            return
        try:
            document = json.loads(message.payload)
            seen = VerdictSeen(
                arrived,
                str(document["device"]),
                int(document["seq"]),
                str(document.get("state", "score")),
                float(document.get("received_at", math.nan)),
            )
        except (ValueError, KeyError, TypeError):
            _LOG.warning("not a verdict or score topic=%s", topic)
            return
        with self._lock:
            (self.scores if is_score else self.verdicts).append(seen)


def _is_device_level(rest: str) -> bool:
    """Whether what follows the prefix is one device segment (a model verdict)."""
    return bool(rest) and not rest.startswith("_") and "/" not in rest
