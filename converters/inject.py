"""Synthetic anomaly injectors: named, seeded faults put into copies of normal streams.

A smart home has no labels, so the self-supervised mode (converters.selfsup)
makes its own: it takes a stretch of a device's normal traffic and injects
episodes of one kind of fault into a copy of it. Every injector here is a
named entry of `INJECTORS`, and `inject` applies one with an explicit seed.

What an injector may change is the stream's shape as the sidecar sees it:
payload bytes, receive times, and which messages exist. Readings are edited
inside the payload (a JSON leaf or a plain number), re-encoded in the same
JSON style and with the same decimals as the original, so a payload changes
size only as much as its new reading needs.

Labels follow one rule, applied to every injector alike: a message of the
result is labeled 1 (and its `attack_type` is the injector's name) when it was
added, when its topic, payload or time differs from the input message it came
from, or when the message before it is not the one that came before it in the
input (so the first message after a dropout or a flood, whose gap changed, is
labeled too). Every other message is the input message, unchanged.

Known limits, in plain words:
- Value injectors edit JSON objects and plain-number payloads. A device that
  publishes only words (`ON`/`OFF`) or only text has no reading they can edit;
  `applies` says so and `inject` raises `ValueError` for it.
- Readings inside JSON arrays are not edited; the keys the sidecar ignores
  (device clocks such as `Time`) are never edited either.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any

import numpy as np

from converters.ton_iot import LabeledMessage
from sidecar.payload import DEFAULT_IGNORED_KEYS
from sidecar.stream import Message

__all__ = [
    "INJECTORS",
    "INJECTOR_NAMES",
    "InjectorSpec",
    "applicable",
    "applies",
    "inject",
    "interpolate",
]

_LOG = logging.getLogger(__name__)

# Magnitudes in units of a key's spread over the input stream. Every one
# starts at or past 3 spreads, and spikes and shifts mostly past the
# baseline's learning gate (FeatureSpec.learn_z = 4), so the sidecar's
# baseline does not learn them as normal; the upper ends cover the built-in
# simulation's faults (a fridge warming by ~10 spreads, an erratic sensor
# jumping by ~40).
SPIKE_Z = (5.0, 40.0)
LEVEL_SHIFT_Z = (3.0, 12.0)
DRIFT_Z = (4.0, 15.0)
NOISE_Z = (2.0, 8.0)
# A key's spread is never taken below this share of its mean magnitude, so a
# constant key (a battery at 91 %) still gets a visible change; 1 % keeps a
# steady mains voltage (231 V, spread ~1 V) from being moved by hundreds.
MIN_SPREAD_SHARE = 0.01
# ...nor below this absolute floor, for keys that sit at exactly zero.
MIN_SPREAD = 1e-3
# Message-rate multipliers: a flood is a burst far above any reporting rhythm
# (a reboot loop, a replayed capture); a cadence change is a device reporting
# a few times faster or slower than it used to (a changed reporting interval,
# a failing radio).
FLOOD_FACTOR = (10, 40)
CADENCE_FACTOR = (2, 4)
# Share of the messages of a malformed burst that are corrupted (at least one).
MALFORMED_SHARE = (0.5, 1.0)
# Episode lengths in input messages, (shortest, longest). Spikes are a message
# or three; sustained faults run from half a window to two windows of the
# sidecar's default 32 messages, so some windows are wholly inside them.
SHORT_EPISODE = (1, 3)
SUSTAINED_EPISODE = (16, 64)
DROPOUT_EPISODE = (4, 32)
FLOOD_EPISODE = (2, 8)
MALFORMED_EPISODE = (3, 12)
# A stuck key is one that changes at least this share as often as the
# device's most changing key.
BUSIEST_SHARE = 0.5
# Decimals kept when an original reading shows more than this many.
MAX_DECIMALS = 6
# Plain-number payloads: a number, then anything (a unit) up to the end.
_PLAIN_NUMBER = re.compile(
    rb"^(\s*)([-+]?(?:\d+(?:\.(\d*))?|\.(\d+))(?:[eE][-+]?\d+)?)(.*)$", re.DOTALL
)
# Longest unit after a plain number (sidecar.payload allows 12 characters; a
# two-byte `°` makes that up to 24 bytes).
MAX_UNIT_BYTES = 24
# Path of the single reading of a plain-number payload.
_PLAIN_PATH: tuple[str, ...] = ()
# First byte of every binary payload a malformed burst makes: never valid
# UTF-8, so the sidecar counts it as binary whatever follows.
_INVALID_UTF8 = b"\xff"
_BINARY_BYTES = (4, 24)

_Path = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Draft:
    """A message being built: `origin` is its input index, None when added."""

    origin: int | None
    topic: str
    payload: bytes
    time: float


@dataclass(frozen=True, slots=True)
class _KeyStats:
    mean: float
    spread: float
    change_share: float
    is_bool: bool


@dataclass(frozen=True, slots=True)
class _Context:
    """What an injector knows about the stream it edits."""

    keys: Mapping[_Path, _KeyStats]
    before: _Draft | None
    after: _Draft | None


_Apply = Callable[[list[_Draft], _Context, np.random.Generator], list[_Draft]]


@dataclass(frozen=True, slots=True)
class InjectorSpec:
    """One named injector.

    Attributes:
        name: The registry name, also the `attack_type` of what it labels.
        apply: Turns the drafts of one episode into their replacement.
        lengths: Shortest and longest episode, in input messages.
        needs: `numeric` (a non-boolean reading), `reading` (any reading,
            booleans included) or `nothing`.
    """

    name: str
    apply: _Apply
    lengths: tuple[int, int]
    needs: str


def _leaves(payload: bytes) -> dict[_Path, float | bool]:
    """Numeric and boolean readings of a payload, by path; {} when it has none."""
    match = _PLAIN_NUMBER.match(payload)
    if match is not None and _is_unit(match.group(5)):
        return {_PLAIN_PATH: float(match.group(2))}
    document = _json_object(payload)
    if document is None:
        return {}
    found: dict[_Path, float | bool] = {}
    _collect(document, (), found)
    return found


def _is_unit(rest: bytes) -> bool:
    """Whether what follows a number is at most a unit, as the sidecar reads it."""
    text = rest.strip()
    return len(text) <= MAX_UNIT_BYTES and not any(chr(c).isdigit() for c in text)


def _json_object(payload: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(payload)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _collect(
    node: dict[str, Any], path: _Path, found: dict[_Path, float | bool]
) -> None:
    for key, value in node.items():
        if key.lower() in DEFAULT_IGNORED_KEYS:
            continue
        if isinstance(value, dict):
            _collect(value, (*path, key), found)
        elif isinstance(value, bool | int | float) and math.isfinite(value):
            found[(*path, key)] = value


def _with_reading(payload: bytes, path: _Path, value: float | bool) -> bytes:
    """Return the payload with one reading replaced, encoded like the original."""
    if path == _PLAIN_PATH:
        match = _PLAIN_NUMBER.match(payload)
        if match is None:
            return payload
        decimals = len(match.group(3) or match.group(4) or b"")
        text = _format_number(float(value), decimals).encode()
        return match.group(1) + text + match.group(5)
    document = _json_object(payload)
    if document is None:
        return payload
    node = document
    for key in path[:-1]:
        node = node[key]
    old = node[path[-1]]
    node[path[-1]] = _like(old, value)
    compact = b": " not in payload and b", " not in payload
    separators = (",", ":") if compact else (", ", ": ")
    return json.dumps(document, separators=separators).encode()


def _like(old: Any, value: float | bool) -> Any:
    """The new value in the original's type and precision."""
    if isinstance(old, bool):
        return bool(value)
    if isinstance(old, int):
        return round(float(value))
    decimals = len(repr(float(old)).partition(".")[2].rstrip("0")) or 1
    return round(float(value), min(decimals, MAX_DECIMALS))


def _format_number(value: float, decimals: int) -> str:
    if decimals == 0:
        return str(round(value))
    return f"{value:.{min(decimals, MAX_DECIMALS)}f}"


def _key_stats(stream: Sequence[LabeledMessage]) -> dict[_Path, _KeyStats]:
    series: dict[_Path, list[float]] = {}
    bools: set[_Path] = set()
    for item in stream:
        for path, value in _leaves(item.message.payload).items():
            series.setdefault(path, []).append(float(value))
            if isinstance(value, bool):
                bools.add(path)
    stats = {}
    for path, values in series.items():
        array = np.asarray(values)
        mean = float(array.mean())
        spread = max(float(array.std()), MIN_SPREAD_SHARE * abs(mean), MIN_SPREAD)
        changes = float(np.mean(np.diff(array) != 0)) if len(array) > 1 else 0.0
        stats[path] = _KeyStats(mean, spread, changes, path in bools)
    return stats


def _eligible(keys: Mapping[_Path, _KeyStats], needs: str) -> list[_Path]:
    if needs == "numeric":
        return sorted(path for path, stats in keys.items() if not stats.is_bool)
    if needs == "reading":
        return sorted(keys)
    return []


def _choose_key(
    context: _Context,
    rng: np.random.Generator,
    needs: str = "numeric",
    busiest: bool = False,
) -> _Path:
    """Pick a key, preferring those that vary: a constant key is rarely watched.

    With `busiest`, only keys that change at least half as often as the most
    changing one are candidates: freezing a key that seldom changes anyway
    would change almost nothing.
    """
    paths = _eligible(context.keys, needs)
    shares = {path: context.keys[path].change_share for path in paths}
    floor = BUSIEST_SHARE * max(shares.values()) if busiest else 0.0
    pool = [path for path in paths if shares[path] > 0 and shares[path] >= floor]
    pool = pool or paths
    return pool[int(rng.integers(len(pool)))]


def _edit_key(
    span: list[_Draft],
    path: _Path,
    change: Callable[[int, float], float | bool],
) -> list[_Draft]:
    """Apply `change(position, reading)` to one key of every draft that has it."""
    edited = []
    for position, draft in enumerate(span):
        reading = _leaves(draft.payload).get(path)
        if reading is None:
            edited.append(draft)
            continue
        payload = _with_reading(draft.payload, path, change(position, float(reading)))
        edited.append(replace(draft, payload=payload))
    return edited


def _signed(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(*bounds)) * float(rng.choice([-1.0, 1.0]))


def _spike(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    path = _choose_key(context, rng)
    jump = float(rng.uniform(*SPIKE_Z)) * context.keys[path].spread
    return _edit_key(span, path, lambda _, value: value + jump)


def _dip(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    path = _choose_key(context, rng)
    drop = float(rng.uniform(*SPIKE_Z)) * context.keys[path].spread
    return _edit_key(span, path, lambda _, value: value - drop)


def _level_shift(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    path = _choose_key(context, rng)
    shift = _signed(rng, LEVEL_SHIFT_Z) * context.keys[path].spread
    return _edit_key(span, path, lambda _, value: value + shift)


def _drift(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    path = _choose_key(context, rng)
    total = _signed(rng, DRIFT_Z) * context.keys[path].spread
    # The ramp reaches `total` on the episode's last message and is already
    # under way on its first, so every message of the episode is changed.
    steps = len(span)
    return _edit_key(
        span, path, lambda position, value: value + total * (position + 1) / steps
    )


def _stuck(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    path = _choose_key(context, rng, needs="reading", busiest=True)
    held = None
    if context.before is not None:
        held = _leaves(context.before.payload).get(path)
    if held is None:
        held = _leaves(span[0].payload).get(path)
    frozen = held if held is not None else context.keys[path].mean
    return _edit_key(span, path, lambda _, __: frozen)


def _noise_burst(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    path = _choose_key(context, rng, needs="reading")
    stats = context.keys[path]
    if stats.is_bool:
        # A chattering contact: each report is a coin toss.
        flips = rng.integers(0, 2, size=len(span)).astype(bool).tolist()
        return _edit_key(span, path, lambda position, _: flips[position])
    scale = float(rng.uniform(*NOISE_Z)) * stats.spread
    noise = rng.normal(0.0, scale, size=len(span)).tolist()
    return _edit_key(span, path, lambda position, value: value + noise[position])


def _dropout(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    return []


def _fill(start: _Draft, end_time: float, copies: int) -> list[_Draft]:
    """`copies` repeats of `start`'s payload spread evenly before `end_time`."""
    step = (end_time - start.time) / (copies + 1)
    return [
        _Draft(None, start.topic, start.payload, start.time + step * (number + 1))
        for number in range(copies)
    ]


def _densify(span: list[_Draft], after: _Draft | None, factor: int) -> list[_Draft]:
    result = []
    for position, draft in enumerate(span):
        result.append(draft)
        following = span[position + 1] if position + 1 < len(span) else after
        if following is not None and following.time > draft.time:
            result.extend(_fill(draft, following.time, factor - 1))
    return result


def _flood(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    factor = int(rng.integers(FLOOD_FACTOR[0], FLOOD_FACTOR[1] + 1))
    return _densify(span, context.after, factor)


def _cadence_change(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    factor = int(rng.integers(CADENCE_FACTOR[0], CADENCE_FACTOR[1] + 1))
    if rng.random() < 0.5:
        return _densify(span, context.after, factor)
    # Slower: only every `factor`-th report arrives, at its usual time.
    return span[factor - 1 :: factor]


def _malformed(payload: bytes, rng: np.random.Generator) -> bytes:
    if payload.lstrip().startswith(b"{") and len(payload) > 1 and rng.random() < 0.5:
        # Cut off mid-document, as a truncated or interrupted publish is.
        return payload[: int(rng.integers(1, len(payload)))]
    size = int(rng.integers(*_BINARY_BYTES))
    return _INVALID_UTF8 + rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()


def _malformed_burst(
    span: list[_Draft], context: _Context, rng: np.random.Generator
) -> list[_Draft]:
    share = float(rng.uniform(*MALFORMED_SHARE))
    hit = rng.random(len(span)) < share
    hit[int(rng.integers(len(span)))] = True
    return [
        replace(draft, payload=_malformed(draft.payload, rng)) if corrupt else draft
        for draft, corrupt in zip(span, hit.tolist(), strict=True)
    ]


INJECTORS: dict[str, InjectorSpec] = {
    spec.name: spec
    for spec in (
        InjectorSpec("spike", _spike, SHORT_EPISODE, "numeric"),
        InjectorSpec("dip", _dip, SHORT_EPISODE, "numeric"),
        InjectorSpec("level_shift", _level_shift, SUSTAINED_EPISODE, "numeric"),
        InjectorSpec("drift", _drift, SUSTAINED_EPISODE, "numeric"),
        InjectorSpec("stuck", _stuck, SUSTAINED_EPISODE, "reading"),
        InjectorSpec("noise_burst", _noise_burst, SUSTAINED_EPISODE, "reading"),
        InjectorSpec("dropout", _dropout, DROPOUT_EPISODE, "nothing"),
        InjectorSpec("flood", _flood, FLOOD_EPISODE, "nothing"),
        InjectorSpec("cadence_change", _cadence_change, SUSTAINED_EPISODE, "nothing"),
        InjectorSpec("malformed_burst", _malformed_burst, MALFORMED_EPISODE, "nothing"),
    )
}
INJECTOR_NAMES: tuple[str, ...] = tuple(INJECTORS)


def applies(kind: str, stream: Sequence[LabeledMessage]) -> bool:
    """Return whether the injector `kind` has something to edit in the stream."""
    return kind in applicable(stream, (kind,))


def applicable(
    stream: Sequence[LabeledMessage], kinds: Sequence[str] = INJECTOR_NAMES
) -> list[str]:
    """Return the injectors among `kinds` that have something to edit in the stream."""
    keys = _key_stats(stream)
    return [
        kind
        for kind in kinds
        if INJECTORS[kind].needs == "nothing" or _eligible(keys, INJECTORS[kind].needs)
    ]


def _spans(
    n: int,
    episodes: int,
    earliest: int,
    lengths: tuple[int, int],
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """Non-overlapping [start, stop) spans, one in each equal slot of the range.

    The last input message is never inside a span, so what follows every
    episode (the gap after a dropout, the rhythm after a flood) is observable.
    """
    room = n - 1 - earliest
    slot = room // episodes if episodes > 0 else 0
    if slot < lengths[0]:
        message = (
            f"{episodes} episodes of {lengths[0]}+ messages do not fit in "
            f"{max(room, 0)} messages after message {earliest}"
        )
        raise ValueError(message)
    spans = []
    for number in range(episodes):
        length = int(rng.integers(lengths[0], min(lengths[1], slot) + 1))
        offset = int(rng.integers(0, slot - length + 1))
        start = earliest + number * slot + offset
        spans.append((start, start + length))
    return spans


def inject(
    stream: Sequence[LabeledMessage],
    kind: str,
    seed: int,
    *,
    episodes: int = 1,
    earliest: int = 0,
) -> list[LabeledMessage]:
    """Return a copy of one device's stream with `episodes` faults of one kind.

    Args:
        stream: One device's messages in time order (normally all labeled 0).
        kind: A name in `INJECTORS`.
        seed: Seeds where the episodes fall, how long they last and how strong
            they are; one seed always gives the same result.
        episodes: How many episodes to inject, spread over the stream.
        earliest: No episode starts before this input message (the sidecar
            learns a device's first messages as normal, so a fault there would
            be learned rather than judged).

    Returns:
        The new stream; labels follow the rule in the module docstring.

    Raises:
        KeyError: If `kind` is not a registered injector.
        ValueError: If the stream is too short for the episodes or has no
            reading the injector can edit.
    """
    spec = INJECTORS[kind]
    keys = _key_stats(stream)
    if spec.needs != "nothing" and not _eligible(keys, spec.needs):
        message = f"injector {kind!r} needs a {spec.needs} reading; stream has none"
        raise ValueError(message)
    rng = np.random.default_rng(seed)
    drafts = [
        _Draft(
            index, item.message.topic, item.message.payload, item.message.received_at
        )
        for index, item in enumerate(stream)
    ]
    spans = _spans(len(drafts), episodes, earliest, spec.lengths, rng)
    generators = rng.spawn(len(spans))
    # Last episode first: the indices of earlier spans stay valid while later
    # ones grow or shrink.
    for (start, stop), episode_rng in reversed(
        list(zip(spans, generators, strict=True))
    ):
        context = _Context(
            keys,
            drafts[start - 1] if start > 0 else None,
            drafts[stop] if stop < len(drafts) else None,
        )
        drafts[start:stop] = spec.apply(drafts[start:stop], context, episode_rng)
    result = _labeled(stream, drafts, kind)
    _LOG.debug(
        "injected kind=%s seed=%d episodes=%d messages_in=%d messages_out=%d "
        "labeled=%d",
        kind,
        seed,
        episodes,
        len(stream),
        len(result),
        sum(item.label for item in result),
    )
    return result


def _labeled(
    stream: Sequence[LabeledMessage], drafts: Sequence[_Draft], kind: str
) -> list[LabeledMessage]:
    result = []
    previous_origin: int | None = -1
    for draft in drafts:
        origin = draft.origin
        source = stream[origin] if origin is not None else None
        same = (
            source is not None
            and origin is not None
            and previous_origin == origin - 1
            and draft.topic == source.message.topic
            and draft.payload == source.message.payload
            and draft.time == source.message.received_at
        )
        previous_origin = origin
        if same and source is not None:
            result.append(source)
            continue
        device = source.device if source is not None else stream[0].device
        retain = source.message.retain if source is not None else False
        message = Message(draft.topic, draft.payload, draft.time, retain)
        result.append(LabeledMessage(device, message, 1, kind))
    return result


def interpolate(stream: Sequence[LabeledMessage], factor: int) -> list[LabeledMessage]:
    """Return a normal copy of a stream reporting `factor` times as often.

    Between two consecutive messages, `factor - 1` messages are added at evenly
    spaced times, each a copy of the earlier payload with every numeric
    reading moved linearly towards the later one (booleans and words keep the
    earlier value). This is not a fault: the whole copy has the finer cadence,
    so a baseline learns it, and its readings change more slowly and smoothly
    per message than the original's. Added messages keep the input's labels
    (the earlier message's), so a normal stream stays normal.
    """
    result: list[LabeledMessage] = []
    for item, following in pairwise(stream):
        result.append(item)
        start, end = _leaves(item.message.payload), _leaves(following.message.payload)
        step_s = (following.message.received_at - item.message.received_at) / factor
        for number in range(1, factor):
            share = number / factor
            payload = item.message.payload
            for path, value in start.items():
                target = end.get(path)
                if isinstance(value, bool) or target is None:
                    continue
                moved = float(value) + share * (float(target) - float(value))
                payload = _with_reading(payload, path, moved)
            message = replace(
                item.message,
                payload=payload,
                received_at=item.message.received_at + number * step_s,
            )
            result.append(replace(item, message=message))
    result.extend(stream[-1:])
    return result
