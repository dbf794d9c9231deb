"""MQTTset captures to one legitimate timeline with re-timed attacks spliced in.

Follows the dataset's SOURCE.md: every class was captured on its own
network and day, so addresses, ports, client ids and capture dates identify
the class and are never used. What the sidecar can see is what a client
subscribed to `#` receives: each PUBLISH sent to the broker, as topic and
payload. The legitimate capture is replayed on its own clock, moved to start
at time 0; its first 40 % (by time) is the part detectors learn from. Each
attack capture's first `ATTACK_MESSAGES` publishes are then spliced into the
remaining 60 %, at evenly spaced instants, keeping their own inter-arrival
times, and labeled with the capture's class. Metrics are per scored window.

Topics are routed by the sidecar's default rules plus one rule that makes a
single-level topic (`Temperature`, `Door Lock`) its own device, as a user
with flat topics would configure it.

Known limits, in plain words:
- `bruteforce` and `slowite` hold no PUBLISH at all (only CONNECT/CONNACK):
  a subscriber never sees them, so they cannot be spliced and are reported
  as unobservable.
- `malariados` publishes each message on a new topic
  `mqtt-malaria/<client>/data/<n>/10000`. Routed, such a topic carries a
  channel, which the live pipeline reads into the key names while the offline
  window builder does not, so the two would see different readings; these
  messages are left out and counted in `notes` (with 15 clients sharing the
  first 1,000 publishes, none would pass its 128-message warm-up anyway).
- `flood` publishes on the legitimate `Temperature` topic, whose sensor
  reports once a minute; its own warm-up is still running when the flood
  arrives, so the first flood messages are learned as that device's normal.
- Payloads are the capture's first 200 bytes (`payload_head`); longer
  payloads are cut there.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.tabular import LabeledStreams
from converters.ton_iot import LabeledMessage
from sidecar.config import Settings, TopicRule
from sidecar.stream import Message
from sidecar.topics import RouteKind, TopicRouter

__all__ = ["ATTACKS", "ATTACK_MESSAGES", "FIT_SHARE", "load_mqttset"]

_LOG = logging.getLogger(__name__)

LEGITIMATE = "legitimate"
# Capture classes in SOURCE.md, spliced in this order.
ATTACKS = ("flood", "malariados", "malformed", "bruteforce", "slowite")
# Share of the legitimate timeline, from its start, kept free of attacks and
# learned from: long enough for every once-a-second sensor to pass the
# 128-message warm-up many times over.
FIT_SHARE = 0.4
# Publishes taken from the start of each attack capture. The flood capture
# alone holds 56,304 publishes in 23 s; a bound keeps the test part mostly
# normal traffic (about 8,400 legitimate publishes), as on a real broker.
ATTACK_MESSAGES = 1000
# Only this one rule is added to the defaults: a topic of one level is a
# device (the default rules need `<prefix>/<device>`).
FLAT_TOPIC_RULE = TopicRule(pattern=r"(?P<device>[^/$+#][^/]*)")


@dataclass(frozen=True, slots=True)
class _Publish:
    time: float
    topic: str
    payload: bytes


def _publishes(path: Path) -> Iterator[_Publish]:
    """Yield what a subscriber to `#` receives from one capture, in order."""
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["mqtt_type"] != "PUBLISH" or row["direction"] != "to_broker":
                continue
            yield _Publish(
                time=float(row["frame_time_epoch"]),
                topic=row["topic"],
                payload=row["payload_head"].encode("utf-8"),
            )


def _capture(folder: Path, label: str) -> list[_Publish]:
    path = folder / f"mqtt_messages_{label}.csv"
    if not path.is_file():
        message = f"no MQTTset capture {path}"
        raise FileNotFoundError(message)
    return sorted(_publishes(path), key=lambda item: item.time)


def load_mqttset(folder: Path) -> LabeledStreams:
    """Build the spliced timeline and its per-device streams.

    Raises:
        FileNotFoundError: If a capture file is missing.
    """
    legitimate = _capture(folder, LEGITIMATE)
    start = legitimate[0].time
    end = legitimate[-1].time - start
    fit_end = FIT_SHARE * end
    timeline: list[tuple[float, int, _Publish, str]] = [
        (item.time - start, 0, item, "normal") for item in legitimate
    ]

    attacks = {label: _capture(folder, label)[:ATTACK_MESSAGES] for label in ATTACKS}
    observable = [label for label in ATTACKS if attacks[label]]
    gap = (end - fit_end) / (len(observable) + 1)
    notes: dict[str, Any] = {"spliced": {}, "unobservable": []}
    for position, label in enumerate(observable, start=1):
        items = attacks[label]
        at = fit_end + position * gap
        timeline.extend(
            (at + item.time - items[0].time, 1, item, label) for item in items
        )
        notes["spliced"][label] = {"messages": len(items), "at_s": round(at, 1)}
    notes["unobservable"] = [label for label in ATTACKS if not attacks[label]]
    timeline.sort(key=lambda entry: entry[0])

    rules = (FLAT_TOPIC_RULE,)
    settings = Settings()
    router = TopicRouter([*settings.topics, *rules], settings.output.prefix)
    streams: dict[str, list[LabeledMessage]] = {}
    unrouted: dict[str, int] = {}
    for time, is_attack, item, kind in timeline:
        route = router.route(item.topic)
        if route.kind is not RouteKind.TELEMETRY or route.channel:
            # Channelled topics are parsed differently by the live pipeline
            # than by the offline window builder; keep them out of both.
            unrouted[kind] = unrouted.get(kind, 0) + 1
            continue
        message = Message(item.topic, item.payload, time)
        streams.setdefault(route.device, []).append(
            LabeledMessage(route.device, message, is_attack, kind)
        )
    notes["not_routed_to_a_device"] = unrouted
    scored_from = {
        device: sum(1 for item in stream if item.message.received_at < fit_end)
        for device, stream in streams.items()
    }
    _LOG.info(
        "mqttset loaded devices=%d messages=%d attacks=%s unobservable=%s",
        len(streams),
        sum(len(s) for s in streams.values()),
        ",".join(observable),
        ",".join(notes["unobservable"]),
    )
    return LabeledStreams(
        dataset="mqttset",
        streams=streams,
        fit_streams={d: s[: scored_from[d]] for d, s in streams.items()},
        scored_from=scored_from,
        protocol=(
            "MQTTset reduced captures; only what a subscriber to # receives "
            "(PUBLISH to the broker: topic and payload; never addresses, ports, "
            "client ids or capture dates); the legitimate capture replayed on its "
            f"own clock from 0 s; its first {FIT_SHARE:.0%} learned from, attack-"
            f"free; the first {ATTACK_MESSAGES} publishes of each attack capture "
            "re-timed and spliced at evenly spaced instants into the rest, keeping "
            "their own inter-arrival times; topics routed by the default rules "
            "plus one-level topic = device; metrics per scored window"
        ),
        topic_rules=rules,
        notes=notes,
    )
