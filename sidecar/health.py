"""Self-checks of the data path: a probe out and back, and the broker's drop count.

A sidecar that receives nothing looks exactly like a quiet home. Two checks
tell them apart and are published, retained, on `<prefix>/_health`:

- After every connect a probe with a fresh nonce is published under the
  output prefix. If the broker does not deliver it back within
  `health.probe_timeout_s`, it is not delivering to us: a queue limit that
  drops everything (Mosquitto 2.0.16 with `max_queued_messages 0`,
  pitfalls.md #5), an ACL without read rights, a bridge that loops nothing.
- Mosquitto counts the messages it dropped for subscribers whose queues were
  full (`$SYS/broker/publish/messages/dropped`, pitfalls.md #3), as a total
  since the broker started. Each reading is compared with the one before:
  growth is data lost between devices and us, and the health topic says how
  much. A count that went down means the broker restarted, and the whole new
  count was dropped since. A restart always drops the connection, so across a
  reconnect this compares the first reading with the last one before the
  disconnect; the drops while the sidecar was away from a broker that kept
  running, such as those from its persistent session's full queue, count.

The very first reading is a baseline: the broker's drops before the sidecar
existed are shown as the total, not reported as new. A run that starts again
reads its own retained health document back (when its subscriptions cover it)
and compares the first reading with the total that document holds, so the
drops while the sidecar was stopped count too.

Shortcomings, named: the broker's count covers all its clients, so a drop
cannot be pinned on our subscription or on one device; windows that span the
hole are scored as they are, and the health topic is the warning. A broker
that restarted and dropped more than the last count we read before we read
it again looks like growth, and only the difference is reported. Device
payloads seldom carry sequence numbers (zigbee2mqtt, Tasmota and Shelly do
not), so gaps are not detected per device.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sidecar.config import HealthSettings
from sidecar.verdicts import ORIGIN

__all__ = ["DataPathHealth", "ProbeState"]

_LOG = logging.getLogger(__name__)

# Longest `$SYS` payload worth decoding as a counter.
MAX_COUNTER_BYTES = 32
# Longest health document worth decoding for a previous run's total; ours
# are a few hundred bytes.
MAX_HEALTH_BYTES = 4096
# Bytes of randomness in a probe's nonce.
NONCE_BYTES = 8
# A loss is reported as a problem for this long after the count last grew,
# then the health document goes back to ok. Mosquitto refreshes $SYS every
# 10 s by default (sys_interval), so a minute spans several refreshes.
DROP_NOTICE_S = 60.0


class ProbeState:
    """What the last probe found (plain strings, as published)."""

    OFF = "off"
    PENDING = "pending"
    OK = "ok"
    MISSING = "missing"


class DataPathHealth:
    """Run the probe and watch the broker's drop count; publish what changes.

    Args:
        health_topic: Where the retained health document goes.
        probe_topic: Where the probe travels, out and back.
        settings: Timeouts and the broker counter's topic.
        publish: Publishes (topic, payload, retain); returns whether the
            client accepted it.
    """

    def __init__(
        self,
        health_topic: str,
        probe_topic: str,
        settings: HealthSettings,
        publish: Callable[[str, bytes, bool], bool],
    ) -> None:
        self.health_topic = health_topic
        self.probe_topic = probe_topic
        self.settings = settings
        self._publish = publish
        # Guards the probe's nonce and the drop count, which the MQTT thread
        # writes and the worker reads.
        self._lock = threading.Lock()
        self.probe_state = ProbeState.OFF
        self._nonce = b""
        self._probe_seen = False
        self._probe_deadline = math.inf
        self._probed_connect = 0
        self._dropped_total: int | None = None
        self._first_total = 0
        # The total in the health document a previous run left retained.
        self._previous_total: int | None = None
        self._previous_open = True
        self._found_new = 0
        self._found_restart = False
        self._published_total: int | None = None
        self.dropped_new = 0
        self._restart_noted = False
        self._dropped_at = -math.inf
        self._changed = False

    @property
    def dropped_total(self) -> int | None:
        """The broker's latest drop count, None until it has been read."""
        return self._dropped_total

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Note a probe, a broker counter or our own health document.

        Called from the MQTT thread. Returns whether the message was the
        broker's counter, which is consumed here and goes no further.
        """
        if topic == self.probe_topic:
            with self._lock:
                if self._nonce and payload == self._nonce:
                    self._probe_seen = True
            return False
        if topic == self.health_topic:
            self._read_previous_total(payload)
            return False
        if topic != self.settings.broker_dropped_topic:
            return False
        count = _counter(payload)
        if count is not None:
            with self._lock:
                self._read_count(count)
        return True

    def tick(self, now: float, connects: int, subscribed: bool) -> None:
        """Run the checks that the clock drives; publish the document on change."""
        if self.settings.probe_timeout_s > 0:
            self._run_probe(now, connects, subscribed)
        with self._lock:
            total = self._dropped_total
            new, restarted = self._found_new, self._found_restart
            self._found_new, self._found_restart = 0, False
            if total is not None:
                # From here on the health documents that come back are ours.
                self._previous_open = False
        if new:
            self.dropped_new = new
            self._restart_noted = restarted
            self._dropped_at = now
            self._changed = True
            _LOG.warning(
                "broker %s messages new=%d total=%d topic=%s; windows may span a "
                "hole in the data",
                "restarted and dropped" if restarted else "dropped",
                new,
                total,
                self.settings.broker_dropped_topic,
            )
        elif self.dropped_new and now - self._dropped_at > DROP_NOTICE_S:
            self.dropped_new = 0
            self._restart_noted = False
            self._changed = True
        if restarted and not new:
            _LOG.info(
                "broker restarted: its drop count began again total=%d topic=%s",
                total,
                self.settings.broker_dropped_topic,
            )
        if total != self._published_total:
            if self._published_total is None and not new:
                _LOG.info(
                    "broker drop count read total=%d topic=%s; drops are counted "
                    "from here",
                    total,
                    self.settings.broker_dropped_topic,
                )
            self._changed = True
        if self._changed:
            self._changed = False
            self._published_total = total
            self._publish(self.health_topic, self.document(now), True)

    def document(self, now: float) -> bytes:
        """The health JSON: overall state, the probe and the broker's drops."""
        problems = []
        if self.probe_state == ProbeState.MISSING:
            problems.append(
                f"probe on {self.probe_topic} not delivered back within "
                f"{self.settings.probe_timeout_s:g} s: the broker is not passing "
                "messages to the sidecar (queue limits, ACL read rights?)"
            )
        if self.dropped_new:
            dropped = (
                f"broker restarted and dropped {self.dropped_new} messages since"
                if self._restart_noted
                else f"broker dropped {self.dropped_new} messages"
            )
            problems.append(
                f"{dropped} ({self._dropped_total} since the broker started)"
            )
        document: dict[str, Any] = {
            "origin": ORIGIN,
            "state": "problem" if problems else "ok",
            "time": datetime.fromtimestamp(now, UTC).isoformat(),
            "probe": self.probe_state,
            "broker_dropped_total": self._dropped_total,
            "broker_dropped_new": self.dropped_new,
            "problems": problems,
        }
        return json.dumps(document, separators=(",", ":")).encode()

    def _read_count(self, count: int) -> None:
        """Compare a reading with the one before it; hold the lock."""
        before = self._dropped_total
        self._dropped_total = count
        if before is None:
            before = self._previous_total
            if before is None:
                self._first_total = count
                return
        self._count_drops(before, count)

    def _count_drops(self, before: int, after: int) -> None:
        """Add the drops between two readings; hold the lock."""
        if after < before:
            self._found_restart = True
            self._found_new += after
        else:
            self._found_new += after - before

    def _read_previous_total(self, payload: bytes) -> None:
        """Take the first of our health documents with a total as the last run's.

        The broker replays the retained document as we subscribe, before or
        just after the first reading; once a reading has been published, the
        documents that come back are our own.
        """
        total = _document_total(payload)
        if total is None:
            return
        with self._lock:
            if not self._previous_open:
                return
            self._previous_open = False
            if self._dropped_total is None:
                self._previous_total = total
            else:
                # The first reading came first and was taken as a baseline.
                self._count_drops(total, self._first_total)

    def _run_probe(self, now: float, connects: int, subscribed: bool) -> None:
        if connects != self._probed_connect and subscribed:
            with self._lock:
                self._nonce = secrets.token_hex(NONCE_BYTES).encode()
                self._probe_seen = False
            self._probed_connect = connects
            self._probe_deadline = now + self.settings.probe_timeout_s
            if self.probe_state != ProbeState.MISSING:
                self.probe_state = ProbeState.PENDING
            self._publish(self.probe_topic, self._nonce, False)
            return
        if self.probe_state not in (ProbeState.PENDING, ProbeState.MISSING):
            return
        with self._lock:
            seen = self._probe_seen
        if seen:
            self.probe_state = ProbeState.OK
            self._changed = True
            _LOG.info("probe came back topic=%s", self.probe_topic)
        elif now >= self._probe_deadline and self.probe_state == ProbeState.PENDING:
            self.probe_state = ProbeState.MISSING
            self._changed = True
            _LOG.error(
                "probe not delivered back topic=%s timeout_s=%g; the broker is "
                "not passing messages to the sidecar",
                self.probe_topic,
                self.settings.probe_timeout_s,
            )


def _counter(payload: bytes) -> int | None:
    """Read a `$SYS` counter payload.

    >>> _counter(b"412"), _counter(b"junk"), _counter(b"-1")
    (412, None, None)
    """
    if len(payload) > MAX_COUNTER_BYTES:
        return None
    try:
        value = int(payload.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if value >= 0 else None


def _document_total(payload: bytes) -> int | None:
    """Read the broker's total from a health document of ours.

    >>> _document_total(b'{"origin":"anomaly-sidecar","broker_dropped_total":7}')
    7
    >>> _document_total(b'{"origin":"other","broker_dropped_total":7}') is None
    True
    """
    if len(payload) > MAX_HEALTH_BYTES:
        return None
    try:
        document = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or document.get("origin") != ORIGIN:
        return None
    total = document.get("broker_dropped_total")
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        return None
    return total
