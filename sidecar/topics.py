"""Topic to device: ordered rules, own-output exclusion and safe output topics."""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.config import TopicRule

__all__ = ["Route", "RouteKind", "TopicRouter", "device_topic_segment"]

# Device segments keep a readable, wildcard-free alphabet; anything else
# becomes `_`. Long names are cut and suffixed with a digest so that two long
# names cannot collide by truncation.
_UNSAFE_SEGMENT_CHARS = re.compile(r"[^A-Za-z0-9_.:@-]")
MAX_SEGMENT_CHARS = 96
DIGEST_CHARS = 10
# Reserved segments under the output prefix start with `_`; device segments
# never do, so a device can never be mistaken for the status or score topics.
RESERVED_SEGMENT_PREFIX = "_"
MAX_DEVICE_ID_CHARS = 256


class RouteKind(enum.StrEnum):
    """What a topic carries, as far as the detector is concerned."""

    TELEMETRY = "telemetry"
    AVAILABILITY = "availability"
    IGNORE = "ignore"
    OWN_OUTPUT = "own_output"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a topic leads: its kind, device id and channel (sub-topic key)."""

    kind: RouteKind
    device: str = ""
    channel: str = ""


_UNKNOWN = Route(RouteKind.UNKNOWN)
_IGNORE = Route(RouteKind.IGNORE)
_OWN = Route(RouteKind.OWN_OUTPUT)


class TopicRouter:
    """Apply the configured rules, first match wins, to classify a topic.

    Topics under the output prefix are always the sidecar's own output and are
    never routed to a device, whatever the rules say (pitfalls.md #7).

    >>> from sidecar.config import Settings
    >>> router = TopicRouter(Settings().topics, output_prefix="anomalies")
    >>> router.route("zigbee2mqtt/kitchen/floor_light")
    Route(kind=<RouteKind.TELEMETRY: 'telemetry'>, device='kitchen/floor_light', channel='')
    >>> router.route("anomalies/kitchen_floor_light").kind
    <RouteKind.OWN_OUTPUT: 'own_output'>
    """

    def __init__(self, rules: Sequence[TopicRule], output_prefix: str) -> None:
        self._rules = [(re.compile(rule.pattern), rule) for rule in rules]
        self._output_prefix = output_prefix

    def is_own_output(self, topic: str) -> bool:
        """Return whether a topic is under the sidecar's output prefix."""
        prefix = self._output_prefix
        return topic == prefix or topic.startswith(prefix + "/")

    def route(self, topic: str) -> Route:
        """Classify one topic."""
        if self.is_own_output(topic):
            return _OWN
        for pattern, rule in self._rules:
            match = pattern.fullmatch(topic)
            if match is None:
                continue
            if rule.kind == "ignore":
                return _IGNORE
            groups = {name: value or "" for name, value in match.groupdict().items()}
            device = rule.device.format(**groups)
            if not device or len(device) > MAX_DEVICE_ID_CHARS:
                return _UNKNOWN
            channel = rule.channel.format(**groups)
            return Route(RouteKind(rule.kind), device, channel)
        return _UNKNOWN


def device_topic_segment(device: str) -> str:
    """Turn a device id into one safe topic level under the output prefix.

    Wildcards, `/`, `$`, control characters and other unusual characters
    become `_`; a leading `_` or `.` gets an `x` in front so the result never
    looks reserved; over-long names are cut and given a digest suffix.

    >>> device_topic_segment("kitchen/floor_light")
    'kitchen_floor_light'
    >>> device_topic_segment("../+/#")
    'x.._____'
    """
    segment = _UNSAFE_SEGMENT_CHARS.sub("_", device) or "unnamed"
    if segment[0] in (RESERVED_SEGMENT_PREFIX, "."):
        segment = "x" + segment
    if len(segment) > MAX_SEGMENT_CHARS:
        digest = hashlib.sha256(device.encode()).hexdigest()[:DIGEST_CHARS]
        segment = f"{segment[: MAX_SEGMENT_CHARS - DIGEST_CHARS - 1]}-{digest}"
    return segment
