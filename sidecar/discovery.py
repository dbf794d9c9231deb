"""Home Assistant MQTT discovery: a problem sensor for each device the sidecar watches.

For every tracked device the sidecar publishes, retained, a `binary_sensor`
config (device class `problem`) whose state is the device's model verdict on
`<prefix>/<device>`, and one per enabled condition (silent, frozen,
unavailable, offline) on `<prefix>/<device>/<kind>`. Each sensor is
available while `<prefix>/_status` says `online`, and carries the verdict's
score and reason as attributes. A sensor for the sidecar itself (its status
topic, device class `connectivity`) is the hub the others hang off.

Configs go out when a device is first tracked, again for every device when
Home Assistant announces itself (`online` on its status topic) and after
each reconnect of the sidecar, and are removed (an empty retained payload)
when a device is evicted.

Which Home Assistant device a sensor belongs to: Home Assistant identifies
a zigbee2mqtt device as `zigbee2mqtt_<IEEE address>`, while the sidecar's
device id is the friendly name. zigbee2mqtt publishes the pairing of both on
`zigbee2mqtt/bridge/devices` (retained); once that has been read, a watched
zigbee2mqtt device's sensors join the very device Home Assistant already
has. Without it, and for every other source (Tasmota, Shelly and ESPHome
devices live in their own integrations, which discovery cannot reach), the
sensors get a device of their own, named after the device id and linked
`via_device` to the sidecar.

Shortcomings, named: a device's sensor reads unknown until its first
verdict, because verdicts are published only on transitions. The friendly
name is matched alone, so a non-zigbee device that happens to carry a
zigbee friendly name joins that zigbee device. Only the default base topic
`zigbee2mqtt` is read. Switching discovery off, or a condition's sensor,
leaves configs already retained in the broker; clear them there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from sidecar.conditions import ConditionKind
from sidecar.config import ConditionSettings, DiscoverySettings, OutputSettings
from sidecar.topics import device_topic_segment

__all__ = [
    "COMPONENT",
    "OWN_CONFIG_MARK",
    "Discovery",
    "Sensor",
    "device_object_id",
    "health_sensor",
    "own_config_pattern",
    "removal_topics",
    "sensors_for",
    "status_sensor",
    "zigbee_addresses",
]

_LOG = logging.getLogger(__name__)

# Home Assistant's MQTT discovery topic is
# `<prefix>/<component>/[<node_id>/]<object_id>/config`, where node_id and
# object_id may hold only these characters (homeassistant/components/mqtt/
# discovery.py, TOPIC_MATCHER); a config on any other topic is ignored.
COMPONENT = "binary_sensor"
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
# Enough of the device id to recognise it in a topic; the digest keeps two
# ids that clean up to the same characters (`hall.lamp`, `hall/lamp`) apart.
OBJECT_ID_STEM_CHARS = 48
DIGEST_CHARS = 10
# The object id of the sidecar's own sensor. Device object ids always end in
# `_<digest>_<kind>`, so none can take it.
STATUS_OBJECT_ID = "status"
# The object id of its data-path health sensor (anomalies/_health).
HEALTH_OBJECT_ID = "data_path"
# Home Assistant's binary sensor device classes (binary_sensor/__init__.py).
PROBLEM_CLASS = "problem"
CONNECTIVITY_CLASS = "connectivity"
DIAGNOSTIC = "diagnostic"
# The verdict states (sidecar.verdicts.Transition) and status payloads
# (sidecar.mqtt) the sensors map to on and off.
RAISED = "raised"
CLEARED = "cleared"
ONLINE = "online"
OFFLINE = "offline"
STATE_TEMPLATE = "{{ value_json.state }}"
# The health document's states (sidecar.health) and what it holds worth showing.
HEALTH_PROBLEM = "problem"
HEALTH_OK = "ok"
HEALTH_ATTRIBUTES = ("problems", "probe", "broker_dropped_total", "time")
# Attributes are a few chosen fields, not the whole verdict: evidence lists
# would bloat Home Assistant's state history for nothing.
VERDICT_ATTRIBUTES = ("score", "reason", "time", "topic")
CONDITION_ATTRIBUTES = ("reason", "since", "duration_s", "time")
# Shown as the origin of every config in Home Assistant's log.
ORIGIN_NAME = "mqtt-anomaly-sidecar"
# How every config payload of the sidecar begins (see Sensor.payload).
OWN_CONFIG_MARK = b'{"origin":{"name":"' + ORIGIN_NAME.encode() + b'"'

UNKNOWN_VERSION = "unknown"
SIDECAR_DEVICE_NAME = "MQTT anomaly sidecar"
WATCH_MODEL = "anomaly watch"
# zigbee2mqtt's retained device list (zigbee2mqtt.io, MQTT topics and
# messages: bridge/devices) and how Home Assistant's side names its devices
# (zigbee2mqtt lib/extension/homeassistant.ts).
Z2M_DEVICES_TOPIC = "zigbee2mqtt/bridge/devices"
Z2M_IDENTIFIER_PREFIX = "zigbee2mqtt_"
_IEEE_ADDRESS = re.compile(r"0x[0-9a-fA-F]{16}")
# About 1 kB per device in that list; 8 MiB is far past any real network
# and keeps a runaway payload from being parsed.
MAX_Z2M_DEVICES_BYTES = 8 * 1024 * 1024
# Devices whose configs go out per pass, and the least time between passes.
# A Home Assistant restart with 10,000 devices tracked asks for 50,000
# configs; 100 devices (500 configs) every half second take 50 s and never
# fill the MQTT client's queue (service.HELD_MESSAGES_LIMIT), which verdicts
# share: the worker passes thousands of times a second under load, and a
# tester's flood filled that queue with configs sent at every pass.
DEVICES_PER_PASS = 100
PASS_INTERVAL_S = 0.5
# Home Assistant's birth message re-sends every config, at most this often:
# a restart of Home Assistant takes longer, so births closer together are a
# loop or a flood; the re-send they ask for is made once the time is up.
BIRTH_RESEND_MIN_S = 30.0


@dataclass(frozen=True, slots=True)
class Sensor:
    """One discovery config: where it goes and what it says."""

    topic: str
    config: dict[str, Any]

    def payload(self) -> bytes:
        """The config as the retained JSON payload, its `origin` first.

        Leading with the origin lets the sidecar know a copy of its own config
        by its first bytes (`OWN_CONFIG_MARK`), under whatever topic a bridge
        republishes it.
        """
        ordered = {"origin": self.config["origin"], **self.config}
        return json.dumps(ordered, separators=(",", ":")).encode()


def device_object_id(device: str) -> str:
    """A discovery object id for a device: readable, stable and unique.

    >>> device_object_id("kitchen/fridge")
    'kitchen_fridge_bb301780b4'
    """
    stem = _UNSAFE_ID_CHARS.sub("_", device)[:OBJECT_ID_STEM_CHARS]
    digest = hashlib.sha256(device.encode()).hexdigest()[:DIGEST_CHARS]
    return f"{stem}_{digest}"


def _attributes_template(names: Iterable[str]) -> str:
    fields = ", ".join(f"'{name}': value_json.{name}" for name in names)
    return "{{ {" + fields + "} | tojson }}"


def _origin() -> dict[str, str]:
    try:
        version = metadata.version(ORIGIN_NAME)
    except metadata.PackageNotFoundError:
        version = UNKNOWN_VERSION
    return {"name": ORIGIN_NAME, "sw_version": version}


def _config_topic(discovery: DiscoverySettings, object_id: str) -> str:
    return f"{discovery.prefix}/{COMPONENT}/{discovery.node_id}/{object_id}/config"


def status_sensor(discovery: DiscoverySettings, output: OutputSettings) -> Sensor:
    """The sidecar's own sensor: connected or not, from its status topic."""
    node = discovery.node_id
    config = {
        "name": "Status",
        "unique_id": f"{node}_{STATUS_OBJECT_ID}",
        "device_class": CONNECTIVITY_CLASS,
        "entity_category": DIAGNOSTIC,
        "state_topic": f"{output.prefix}/_status",
        "payload_on": ONLINE,
        "payload_off": OFFLINE,
        "qos": output.qos,
        "device": {
            "identifiers": [node],
            "name": SIDECAR_DEVICE_NAME,
            "model": ORIGIN_NAME,
            "sw_version": _origin()["sw_version"],
        },
        "origin": _origin(),
    }
    return Sensor(_config_topic(discovery, STATUS_OBJECT_ID), config)


def health_sensor(discovery: DiscoverySettings, output: OutputSettings) -> Sensor:
    """The sidecar's data-path sensor: on while `<prefix>/_health` says problem.

    It is what tells a Home Assistant user that the broker stopped delivering
    to the sidecar or dropped messages, which no device sensor can show.
    """
    common = {
        "device_class": PROBLEM_CLASS,
        "entity_category": DIAGNOSTIC,
        "value_template": STATE_TEMPLATE,
        "payload_on": HEALTH_PROBLEM,
        "payload_off": HEALTH_OK,
        "availability_topic": f"{output.prefix}/_status",
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "qos": output.qos,
        "device": {"identifiers": [discovery.node_id]},
        "origin": _origin(),
    }
    return _sensor(
        discovery,
        HEALTH_OBJECT_ID,
        "Data path",
        f"{output.prefix}/_health",
        HEALTH_ATTRIBUTES,
        common,
    )


def sensors_for(
    device: str,
    discovery: DiscoverySettings,
    output: OutputSettings,
    conditions: ConditionSettings,
    ieee_address: str | None = None,
) -> list[Sensor]:
    """Every discovery config of one watched device, the model verdict first.

    Args:
        device: The device id, exactly as in verdicts.
        discovery: Prefix, node id and whether condition sensors are wanted.
        output: The verdict prefix and QoS.
        conditions: Which conditions are on; only those get a sensor.
        ieee_address: The device's zigbee address when zigbee2mqtt named it;
            the sensors then join the device Home Assistant already has.
    """
    node = discovery.node_id
    base = device_object_id(device)
    if ieee_address is not None:
        # Identifiers alone: a name here would rename the user's device.
        device_block: dict[str, Any] = {
            "identifiers": [f"{Z2M_IDENTIFIER_PREFIX}{ieee_address}"]
        }
    else:
        device_block = {
            "identifiers": [f"{node}_{base}"],
            "name": device,
            "model": WATCH_MODEL,
            "via_device": node,
        }
    common = {
        "device_class": PROBLEM_CLASS,
        "value_template": STATE_TEMPLATE,
        "payload_on": RAISED,
        "payload_off": CLEARED,
        "availability_topic": f"{output.prefix}/_status",
        "payload_available": ONLINE,
        "payload_not_available": OFFLINE,
        "qos": output.qos,
        "device": device_block,
        "origin": _origin(),
    }
    segment = device_topic_segment(device)
    verdict_topic = f"{output.prefix}/{segment}"
    sensors = [
        _sensor(
            discovery,
            f"{base}_anomaly",
            "Anomaly",
            verdict_topic,
            VERDICT_ATTRIBUTES,
            common,
        )
    ]
    if not discovery.conditions:
        return sensors
    for kind in ConditionKind:
        if not getattr(conditions, kind.value).enabled:
            continue
        sensor = _sensor(
            discovery,
            f"{base}_{kind.value}",
            f"Anomaly {kind.value}",
            f"{verdict_topic}/{kind.value}",
            CONDITION_ATTRIBUTES,
            {**common, "entity_category": DIAGNOSTIC},
        )
        sensors.append(sensor)
    return sensors


def _sensor(
    discovery: DiscoverySettings,
    object_id: str,
    name: str,
    state_topic: str,
    attributes: Iterable[str],
    common: dict[str, Any],
) -> Sensor:
    config = {
        "name": name,
        "unique_id": f"{discovery.node_id}_{object_id}",
        "state_topic": state_topic,
        "json_attributes_topic": state_topic,
        "json_attributes_template": _attributes_template(attributes),
        **common,
    }
    return Sensor(_config_topic(discovery, object_id), config)


def removal_topics(device: str, discovery: DiscoverySettings) -> list[str]:
    """Every config topic a device may have had, enabled conditions or not."""
    base = device_object_id(device)
    kinds = ["anomaly", *(kind.value for kind in ConditionKind)]
    return [_config_topic(discovery, f"{base}_{kind}") for kind in kinds]


def zigbee_addresses(payload: bytes) -> dict[str, str] | None:
    """Friendly name to IEEE address, from zigbee2mqtt's `bridge/devices`.

    Returns None for a payload that is not such a list.

    >>> zigbee_addresses(b'[{"friendly_name": "hall", "ieee_address": '
    ...                  b'"0x00158d0001a2b3c4", "type": "EndDevice"}]')
    {'hall': '0x00158d0001a2b3c4'}
    """
    if len(payload) > MAX_Z2M_DEVICES_BYTES:
        return None
    try:
        entries = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entries, list):
        return None
    found = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        name = entry.get("friendly_name")
        address = entry.get("ieee_address")
        if (
            isinstance(name, str)
            and isinstance(address, str)
            and _IEEE_ADDRESS.fullmatch(address)
        ):
            found[name] = address.lower()
    return found


def own_config_pattern(discovery: DiscoverySettings) -> re.Pattern[str]:
    """Topics of the sidecar's own discovery configs, bridged copies included."""
    return re.compile(
        rf"(?:.+/)?{re.escape(discovery.prefix)}/{COMPONENT}/"
        rf"{re.escape(discovery.node_id)}/[^/]+/config"
    )


class Discovery:
    """Keep Home Assistant's discovery configs in step with the tracked devices.

    `on_message` runs in the MQTT thread and only notes what it saw; all
    publishing happens in the worker, through `reconcile` and `tick`.

    Args:
        discovery: Prefix, node id, Home Assistant's status topic.
        output: The verdict prefix and QoS.
        conditions: Which conditions are on.
        publish: Publishes (topic, payload, retain); returns whether the
            client took it.
    """

    def __init__(
        self,
        discovery: DiscoverySettings,
        output: OutputSettings,
        conditions: ConditionSettings,
        publish: Callable[[str, bytes, bool], bool],
        pass_interval_s: float = PASS_INTERVAL_S,
        birth_resend_min_s: float = BIRTH_RESEND_MIN_S,
    ) -> None:
        self.settings = discovery
        self._pass_interval_s = pass_interval_s
        self._birth_resend_min_s = birth_resend_min_s
        self._last_pass = -math.inf
        self._last_birth = -math.inf
        self.output = output
        self.conditions = conditions
        self._publish = publish
        self._own = own_config_pattern(discovery)
        self._lock = threading.Lock()
        self._announced = threading.Event()
        self._z2m_payload: bytes | None = None
        self._addresses: dict[str, str] = {}
        # Devices whose configs are out, with the zigbee address they named.
        self._published: dict[str, str | None] = {}
        # Devices waiting to be published (True) or removed (False).
        self._pending: OrderedDict[str, bool] = OrderedDict()
        self._status_pending = False
        self._connects = 0
        self.sent = 0
        self.removed = 0

    def on_message(self, topic: str, payload: bytes) -> bool:
        """Note Home Assistant's birth or zigbee2mqtt's device list (MQTT thread).

        Returns whether the message is one of the sidecar's own configs,
        which must never be scored, whatever the topic rules say.
        """
        if topic == self.settings.status_topic:
            if payload.strip() == ONLINE.encode():
                self._announced.set()
            return False
        if topic == Z2M_DEVICES_TOPIC:
            with self._lock:
                self._z2m_payload = payload
            return False
        return self._own.fullmatch(topic) is not None

    def reconcile(self, changed: Iterable[str], tracks: Callable[[str], bool]) -> None:
        """Queue publishing or removal for devices that started or stopped."""
        for device in changed:
            wanted = tracks(device)
            if wanted != (device in self._published) or device in self._pending:
                self._pending[device] = wanted

    def tick(
        self, connects: int, connected: bool, devices: Callable[[], Iterable[str]]
    ) -> None:
        """Re-send after a birth or reconnect, read the device list, send a slice."""
        now = time.monotonic()
        birth = (
            self._announced.is_set()
            and now - self._last_birth >= self._birth_resend_min_s
        )
        if birth or connects != self._connects:
            if birth:
                self._announced.clear()
                self._last_birth = now
            self._connects = connects
            _LOG.info("discovery configs re-sent connects=%d", connects)
            self._status_pending = True
            for device in devices():
                self._pending[device] = True
        self._read_zigbee_devices()
        if connected and now - self._last_pass >= self._pass_interval_s:
            self._last_pass = now
            self._flush()

    def _read_zigbee_devices(self) -> None:
        with self._lock:
            payload, self._z2m_payload = self._z2m_payload, None
        if payload is None:
            return
        addresses = zigbee_addresses(payload)
        if addresses is None:
            _LOG.warning(
                "zigbee2mqtt device list not understood topic=%s size=%d",
                Z2M_DEVICES_TOPIC,
                len(payload),
            )
            return
        self._addresses = addresses
        _LOG.info("zigbee2mqtt device list read devices=%d", len(addresses))
        for device, linked in self._published.items():
            if addresses.get(device) != linked and device not in self._pending:
                self._pending[device] = True

    def _flush(self) -> None:
        if self._status_pending:
            own = (
                status_sensor(self.settings, self.output),
                health_sensor(self.settings, self.output),
            )
            self._status_pending = not all(
                self._publish(sensor.topic, sensor.payload(), True) for sensor in own
            )
        for _ in range(min(DEVICES_PER_PASS, len(self._pending))):
            device, wanted = next(iter(self._pending.items()))
            done = self._announce(device) if wanted else self._remove(device)
            if not done:
                # The client's queue is full; try again on a later pass.
                return
            del self._pending[device]

    def _announce(self, device: str) -> bool:
        address = self._addresses.get(device)
        for sensor in sensors_for(
            device, self.settings, self.output, self.conditions, address
        ):
            if not self._publish(sensor.topic, sensor.payload(), True):
                return False
        self._published[device] = address
        self.sent += 1
        _LOG.debug("discovery config sent device=%r linked=%s", device, address)
        return True

    def _remove(self, device: str) -> bool:
        for topic in removal_topics(device, self.settings):
            if not self._publish(topic, b"", True):
                return False
        self._published.pop(device, None)
        self.removed += 1
        _LOG.debug("discovery config removed device=%r", device)
        return True
