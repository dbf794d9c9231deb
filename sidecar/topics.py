"""Topic to device: ordered rules, own-output exclusion and safe output topics."""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.config import SECRET_GROUP_PREFIX, TopicRule

__all__ = [
    "SECRET_MASK",
    "Route",
    "RouteKind",
    "TopicRouter",
    "device_topic_segment",
    "filter_matches",
]

# Device segments keep a readable, wildcard-free alphabet; anything else
# becomes `_`. Changed or cut names are suffixed with a digest of the id so
# that two ids cannot collide by cleaning or truncation.
_UNSAFE_SEGMENT_CHARS = re.compile(r"[^A-Za-z0-9_.:@-]")
MAX_SEGMENT_CHARS = 96
DIGEST_CHARS = 10
# How a segment made from a changed id ends; an id that already ends so is
# given a digest of its own too, so it can never take another id's segment.
_DIGEST_ENDING = re.compile(rf"-[0-9a-f]{{{DIGEST_CHARS}}}$")
# Reserved segments under the output prefix start with `_`; device segments
# never do, so a device can never be mistaken for the status or score topics.
RESERVED_SEGMENT_PREFIX = "_"
# Reserved levels under the output prefix; device segments never start with
# `_` (see device_topic_segment), so they cannot collide.
STATUS_LEVEL = "_status"
SCORES_LEVEL = "_scores"
HEALTH_LEVEL = "_health"
PROBE_LEVEL = "_probe"
FEEDBACK_LEVEL = "_feedback"
# A topic with one of them as a level below the first is a copy of our
# output whose prefix a bridge renamed (alerts/_status for anomalies/_status).
_RESERVED_LEVEL = re.compile(
    "/(?:"
    + "|".join(
        re.escape(level)
        for level in (
            STATUS_LEVEL,
            SCORES_LEVEL,
            HEALTH_LEVEL,
            PROBE_LEVEL,
            FEEDBACK_LEVEL,
        )
    )
    + ")(?:/|$)"
)
MAX_DEVICE_ID_CHARS = 256
# What replaces a secret topic level wherever the sidecar echoes a topic.
SECRET_MASK = "***"
# Routes of this many distinct topics are remembered (least recently used
# forgotten first). Trying the rules' regular expressions cost about 50 us per
# message in the benchmark's profile; a fleet reuses its topics, so a cache
# lookup replaces that. Only topics up to ROUTE_CACHE_MAX_CHARS are cached, so
# a cache filled with hostile topics stays within a few MB.
ROUTE_CACHE_SIZE = 16_384
ROUTE_CACHE_MAX_CHARS = 256


class RouteKind(enum.StrEnum):
    """What a topic carries, as far as the detector is concerned."""

    TELEMETRY = "telemetry"
    AVAILABILITY = "availability"
    IGNORE = "ignore"
    OWN_OUTPUT = "own_output"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Route:
    """Where a topic leads: its kind, device id and channel (sub-topic key).

    `public_topic` is the topic with secret levels masked; it is what verdicts
    and logs may show. Empty when the topic holds no secret.
    """

    kind: RouteKind
    device: str = ""
    channel: str = ""
    public_topic: str = ""


_UNKNOWN = Route(RouteKind.UNKNOWN)
_IGNORE = Route(RouteKind.IGNORE)
_OWN = Route(RouteKind.OWN_OUTPUT)


class TopicRouter:
    """Apply the configured rules, first match wins, to classify a topic.

    Topics under the output prefix are always the sidecar's own output and are
    never routed to a device, whatever the rules say (pitfalls.md #7).

    >>> from sidecar.config import Settings
    >>> router = TopicRouter(Settings().topics, output_prefix="anomalies")
    >>> router.route("zigbee2mqtt/kitchen/floor_light").device
    'kitchen/floor_light'
    >>> router.route("tele/plug_a/SENSOR").channel
    'SENSOR'
    >>> router.route("anomalies/kitchen_floor_light").kind
    <RouteKind.OWN_OUTPUT: 'own_output'>
    """

    def __init__(
        self,
        rules: Sequence[TopicRule],
        output_prefix: str,
        exclude: Sequence[str] = (),
    ) -> None:
        self._rules = [(re.compile(rule.pattern), rule) for rule in rules]
        self._output_prefix = output_prefix
        self._exclude = tuple(exclude)
        # A route depends on the topic alone once the rules are fixed.
        self._cached_route = functools.lru_cache(maxsize=ROUTE_CACHE_SIZE)(self._route)

    def is_own_output(self, topic: str) -> bool:
        """Return whether a topic is the sidecar's output, bridged or not.

        A bridge with a remote prefix republishes `anomalies/x` as
        `site2/anomalies/x`; that copy is our output too and would otherwise
        feed back into the model without end (pitfalls.md #7). So any topic
        whose levels contain the prefix's levels is treated as our output,
        and so is any topic with one of our reserved levels (`_status`,
        `_health`, ...) below its first, which a bridge that renames the
        prefix keeps. Copies of verdicts under a renamed prefix are known by
        their payload instead (`verdicts.OWN_OUTPUT_MARK`).
        """
        prefix = self._output_prefix
        return (
            topic == prefix
            or topic.startswith(prefix + "/")
            or f"/{prefix}/" in topic
            or topic.endswith("/" + prefix)
            or _RESERVED_LEVEL.search(topic) is not None
        )

    def route(self, topic: str) -> Route:
        """Classify one topic."""
        if len(topic) <= ROUTE_CACHE_MAX_CHARS:
            return self._cached_route(topic)
        return self._route(topic)

    def _route(self, topic: str) -> Route:
        if self.is_own_output(topic):
            return _OWN
        if any(filter_matches(topic_filter, topic) for topic_filter in self._exclude):
            return _IGNORE
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
            return Route(RouteKind(rule.kind), device, channel, _masked(match))
        return _UNKNOWN

    def public_topic(self, topic: str) -> str:
        """Return the topic as it may be shown: secret levels masked.

        >>> from sidecar.config import Settings
        >>> router = TopicRouter(Settings().topics, output_prefix="anomalies")
        >>> router.public_topic("tuya/0123abc/f00dfeedbeef/192.168.1.9/dps")
        'tuya/0123abc/***/***/dps'
        """
        return self.route(topic).public_topic or topic


def _masked(match: re.Match[str]) -> str:
    """Return the matched topic with every `secret*` group masked, or ""."""
    spans = sorted(
        match.span(name)
        for name, value in match.groupdict().items()
        if name.startswith(SECRET_GROUP_PREFIX) and value
    )
    if not spans:
        return ""
    topic = match.string
    parts = []
    end = 0
    for start, stop in spans:
        parts.append(topic[end:start])
        parts.append(SECRET_MASK)
        end = stop
    parts.append(topic[end:])
    return "".join(parts)


def device_topic_segment(device: str) -> str:
    """Turn a device id into one safe topic level under the output prefix.

    Wildcards, `/`, `$`, spaces, control characters and other unusual
    characters become `_`; a leading `_` or `.` gets an `x` in front so the
    result never looks reserved; over-long names are cut. Whenever the id had
    to change, a digest of it is appended, so two ids that clean up alike
    (`kitchen/fridge` and `kitchen_fridge`) never share a verdict topic; an
    id that is already safe is its own segment, unless it ends like such a
    digest (`-` and ten hex digits), when it is given one too.

    >>> device_topic_segment("kitchen_fridge")
    'kitchen_fridge'
    >>> device_topic_segment("kitchen/fridge")
    'kitchen_fridge-bb301780b4'
    >>> device_topic_segment("../+/#")
    'x..____-50c2649ece'
    """
    segment = _UNSAFE_SEGMENT_CHARS.sub("_", device) or "unnamed"
    if segment[0] in (RESERVED_SEGMENT_PREFIX, "."):
        segment = "x" + segment
    if (
        segment == device
        and len(segment) <= MAX_SEGMENT_CHARS
        and _DIGEST_ENDING.search(segment) is None
    ):
        # Kept as it is only if it cannot be mistaken for a changed id's
        # segment, which always ends in a digest.
        return segment
    digest = hashlib.sha256(device.encode()).hexdigest()[:DIGEST_CHARS]
    return f"{segment[: MAX_SEGMENT_CHARS - DIGEST_CHARS - 1]}-{digest}"


def filter_matches(topic_filter: str, topic: str) -> bool:
    """Return whether a topic matches an MQTT subscription filter.

    Follows MQTT 3.1.1 section 4.7: `+` fills one level, a trailing `#` any
    number of levels including none, and topics starting with `$` are not
    matched by a filter starting with a wildcard.

    >>> filter_matches("anomalies/#", "anomalies")
    True
    >>> filter_matches("+/status", "$SYS/status")
    False
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
