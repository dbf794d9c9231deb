"""Home Assistant discovery: the configs, their lifecycle, and the shipped examples."""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from mqtt_helpers import BrokerAddress, MessageCollector, ReceivedMessage, publish

from sidecar.conditions import ConditionKind, ConditionVerdict
from sidecar.config import (
    ConditionSettings,
    DiscoverySettings,
    OfflineSettings,
    OutputSettings,
    Settings,
    settings_from_mapping,
)
from sidecar.detector import LoadedModels, load_cascade
from sidecar.discovery import (
    DEVICES_PER_PASS,
    Discovery,
    Sensor,
    device_object_id,
    health_sensor,
    removal_topics,
    sensors_for,
    status_sensor,
    zigbee_addresses,
)
from sidecar.errors import ConfigError
from sidecar.service import (
    Service,
    condition_topic,
    health_topic,
    status_topic,
    verdict_topic,
)
from sidecar.verdicts import Transition, Verdict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONNECT_TIMEOUT_S = 10.0
# Configs go out on the worker's next pass, milliseconds after the message.
CONFIG_TIMEOUT_S = 10.0
# With discovery off, how long to watch for configs that must not come.
QUIET_S = 1.0
IEEE = "0x00158d0001a2b3c4"
CONFIG_FILTER = "homeassistant/binary_sensor/anomaly_sidecar/+/config"

# What Home Assistant requires of a binary_sensor discovery message, restated
# from home-assistant/core homeassistant/components/mqtt: the topic pattern
# (discovery.py TOPIC_MATCHER), the keys the binary sensor's discovery schema
# knows (binary_sensor.py plus the common entity, availability, device and
# origin schemas in schemas.py and entity.py), and the device classes of
# homeassistant/components/binary_sensor. Unknown keys are dropped without a
# word by Home Assistant (vol.REMOVE_EXTRA), so a misspelt key would do
# nothing; here it fails.
HA_TOPIC = re.compile(
    r"homeassistant/(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?"
    r"(?P<object_id>[a-zA-Z0-9_-]+)/config"
)
HA_BINARY_SENSOR_KEYS = {
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "default_entity_id",
    "device",
    "device_class",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "entity_picture",
    "expire_after",
    "force_update",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "off_delay",
    "origin",
    "payload_available",
    "payload_not_available",
    "payload_off",
    "payload_on",
    "qos",
    "state_topic",
    "unique_id",
    "value_template",
}
HA_DEVICE_KEYS = {
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
}
HA_ORIGIN_KEYS = {"name", "sw_version", "support_url"}
HA_BINARY_SENSOR_CLASSES = {
    "battery",
    "battery_charging",
    "carbon_monoxide",
    "cold",
    "connectivity",
    "door",
    "garage_door",
    "gas",
    "heat",
    "light",
    "lock",
    "moisture",
    "motion",
    "moving",
    "occupancy",
    "opening",
    "plug",
    "power",
    "presence",
    "problem",
    "running",
    "safety",
    "smoke",
    "sound",
    "tamper",
    "update",
    "vibration",
    "window",
}
# Read-only entities may only be diagnostic (helpers/entity.py).
HA_SENSOR_CATEGORIES = {"diagnostic"}


def home_assistant_problems(sensor: Sensor) -> list[str]:
    """List every way a config breaks what Home Assistant accepts."""
    problems = []
    match = HA_TOPIC.fullmatch(sensor.topic)
    if match is None:
        problems.append(f"topic {sensor.topic!r} is not a discovery topic")
    elif match["component"] != "binary_sensor":
        problems.append(f"component {match['component']!r}")
    config = json.loads(sensor.payload())
    if not isinstance(config, dict):
        return [*problems, "payload is not a JSON object"]
    problems += [f"unknown key {key!r}" for key in set(config) - HA_BINARY_SENSOR_KEYS]
    if not isinstance(config.get("state_topic"), str):
        problems.append("state_topic is required")
    if "availability" in config and "availability_topic" in config:
        problems.append("availability and availability_topic exclude each other")
    for key in ("state_topic", "availability_topic", "json_attributes_topic"):
        if key in config and not _valid_subscribe_topic(config[key]):
            problems.append(f"{key} {config[key]!r} is not a valid topic")
    for key in (
        "name",
        "unique_id",
        "payload_on",
        "payload_off",
        "payload_available",
        "payload_not_available",
    ):
        if key in config and not isinstance(config[key], str):
            problems.append(f"{key} must be a string")
    if config.get("qos", 0) not in (0, 1, 2):
        problems.append("qos must be 0, 1 or 2")
    if config.get("device_class") not in HA_BINARY_SENSOR_CLASSES:
        problems.append(f"device_class {config.get('device_class')!r}")
    if config.get("entity_category", "diagnostic") not in HA_SENSOR_CATEGORIES:
        problems.append(f"entity_category {config['entity_category']!r}")
    for key in ("value_template", "json_attributes_template"):
        if key in config:
            try:
                jinja2.Environment().parse(config[key])
            except jinja2.TemplateSyntaxError as err:
                problems.append(f"{key} does not parse: {err}")
    problems += _device_problems(config)
    return problems


def _device_problems(config: dict[str, Any]) -> list[str]:
    problems = []
    device = config.get("device")
    if device is not None:
        if not isinstance(config.get("unique_id"), str):
            # The device registry links only entities with a unique id.
            problems.append("a device block needs a unique_id")
        problems += [
            f"unknown device key {key!r}" for key in set(device) - HA_DEVICE_KEYS
        ]
        if not (device.get("identifiers") or device.get("connections")):
            problems.append("device needs identifiers or connections")
        if not all(isinstance(item, str) for item in device.get("identifiers", [])):
            problems.append("identifiers must be strings")
        if "via_device" in device and not isinstance(device["via_device"], str):
            problems.append("via_device must be a string")
    origin = config.get("origin")
    if origin is not None:
        problems += [
            f"unknown origin key {key!r}" for key in set(origin) - HA_ORIGIN_KEYS
        ]
        if not isinstance(origin.get("name"), str):
            problems.append("origin needs a name")
    return problems


def _valid_subscribe_topic(topic: str) -> bool:
    """Home Assistant's valid_subscribe_topic (mqtt/util.py), for plain topics."""
    return bool(topic) and "\x00" not in topic and not ({"+", "#"} & set(topic))


def _render(template: str, document: bytes) -> str:
    """Render a template the way Home Assistant does for a JSON payload."""
    variables: dict[str, Any] = {"value": document.decode()}
    # Home Assistant leaves value_json undefined for a payload that is not JSON.
    with contextlib.suppress(ValueError):
        variables["value_json"] = json.loads(document)
    return jinja2.Environment().from_string(template).render(variables)


def _verdict(device: str, state: Transition) -> Verdict:
    return Verdict(
        device=device,
        state=state,
        score=0.93,
        rf_score=0.91,
        cnn_score=0.95,
        topic=f"zigbee2mqtt/{device}",
        received_at=1_796_317_331.4,
        seq=412,
        models={"rf": "test"},
        evidence=(),
        typical_gap_s=60.0,
        last_gap_s=60.0,
    )


def _sensors(device: str, ieee: str | None = None, **discovery: Any) -> list[Sensor]:
    return sensors_for(
        device,
        DiscoverySettings(**discovery),
        OutputSettings(),
        ConditionSettings(),
        ieee,
    )


@pytest.mark.parametrize(
    "device",
    ["kitchen_fridge", "living room/floor lamp", "sensor.hall_temp", "ünïcode+#"],
)
def test_sensors_for_meets_what_home_assistant_requires(device: str) -> None:
    """Test that every config of a device passes Home Assistant's discovery rules."""
    sensors = [*_sensors(device), *_sensors(device, IEEE)]

    assert [problem for s in sensors for problem in home_assistant_problems(s)] == []


def test_status_sensor_meets_what_home_assistant_requires() -> None:
    """Test that the sidecar's own connectivity sensor passes the same rules."""
    sensor = status_sensor(DiscoverySettings(), OutputSettings())

    assert home_assistant_problems(sensor) == []
    assert sensor.config["state_topic"] == status_topic("anomalies")
    assert sensor.config["device_class"] == "connectivity"


def test_health_sensor_meets_what_home_assistant_requires_and_reads_health() -> None:
    """Test that the data-path sensor is on exactly while _health says problem."""
    sensor = health_sensor(DiscoverySettings(), OutputSettings())
    config = sensor.config
    template = jinja2.Environment().from_string(config["value_template"])

    assert home_assistant_problems(sensor) == []
    assert config["state_topic"] == health_topic("anomalies")
    assert template.render(value_json={"state": "problem"}) == config["payload_on"]
    assert template.render(value_json={"state": "ok"}) == config["payload_off"]


def test_sensors_for_points_at_the_real_verdict_and_status_topics() -> None:
    """Test that state, attributes and availability are the topics published."""
    anomaly, *conditions = _sensors("living room/floor lamp")

    assert anomaly.config["state_topic"] == verdict_topic(
        "anomalies", "living room/floor lamp"
    )
    assert anomaly.config["json_attributes_topic"] == anomaly.config["state_topic"]
    assert [c.config["state_topic"] for c in conditions] == [
        condition_topic("anomalies", "living room/floor lamp", kind)
        for kind in ConditionKind
    ]
    for sensor in (anomaly, *conditions):
        assert sensor.config["availability_topic"] == status_topic("anomalies")
        assert sensor.config["payload_available"] == "online"
        assert sensor.config["payload_not_available"] == "offline"
        assert sensor.config["device_class"] == "problem"


def test_value_template_turns_raised_on_and_cleared_off() -> None:
    """Test that a raised verdict renders payload_on and a cleared one payload_off."""
    config = _sensors("kitchen_fridge")[0].config
    raised = _verdict("kitchen_fridge", Transition.RAISED).to_json()
    cleared = _verdict("kitchen_fridge", Transition.CLEARED).to_json()

    assert _render(config["value_template"], raised) == config["payload_on"]
    assert _render(config["value_template"], cleared) == config["payload_off"]


def test_attributes_carry_the_verdict_score_and_reason() -> None:
    """Test that the attributes template renders a JSON object with score and reason."""
    config = _sensors("kitchen_fridge")[0].config
    verdict = _verdict("kitchen_fridge", Transition.RAISED)

    attributes = json.loads(
        _render(config["json_attributes_template"], verdict.to_json())
    )

    assert attributes["score"] == 0.93
    assert attributes["reason"] == verdict.reason()


def test_condition_attributes_carry_the_reason() -> None:
    """Test that a condition sensor's attributes carry its verdict's reason."""
    frozen = _sensors("hall")[2]
    verdict = ConditionVerdict(
        "hall", ConditionKind.FROZEN, Transition.RAISED, 7200.0, 3600.0
    )

    attributes = json.loads(
        _render(frozen.config["json_attributes_template"], verdict.to_json())
    )

    assert frozen.config["state_topic"].endswith("/frozen")
    assert attributes["reason"] == verdict.reason()
    assert _render(frozen.config["value_template"], verdict.to_json()) == "raised"


def test_unique_id_is_stable_and_unique_per_device() -> None:
    """Test that ids repeat for one device and differ for look-alike devices."""
    devices = ["hall.lamp", "hall/lamp", "hall_lamp", "x" * 300, "x" * 301]

    first = [s.config["unique_id"] for d in devices for s in _sensors(d)]
    again = [s.config["unique_id"] for d in devices for s in _sensors(d)]

    assert first == again
    assert len(set(first)) == len(first)
    assert len({s.topic for d in devices for s in _sensors(d)}) == len(first)


def test_zigbee_device_joins_the_device_home_assistant_has() -> None:
    """Test that a named zigbee address links by identifier, without renaming it."""
    linked = _sensors("hall", IEEE)[0].config["device"]
    own = _sensors("hall")[0].config["device"]

    assert linked == {"identifiers": [f"zigbee2mqtt_{IEEE}"]}
    assert own["name"] == "hall"
    assert own["via_device"] == "anomaly_sidecar"
    assert own["identifiers"] == [f"anomaly_sidecar_{device_object_id('hall')}"]


def test_condition_sensors_follow_settings() -> None:
    """Test that disabled conditions, or conditions: false, get no sensor."""
    conditions = ConditionSettings(offline=OfflineSettings(enabled=False))
    only_on = sensors_for(
        "hall", DiscoverySettings(), OutputSettings(), conditions, None
    )

    assert [s.config["name"] for s in only_on] == [
        "Anomaly",
        "Anomaly silent",
        "Anomaly frozen",
        "Anomaly unavailable",
    ]
    assert [s.config["name"] for s in _sensors("hall", conditions=False)] == ["Anomaly"]


def test_prefix_and_node_id_shape_every_topic_and_id() -> None:
    """Test that a changed discovery prefix and node id are used throughout."""
    sensors = _sensors("hall", prefix="ha-disc", node_id="site2")

    assert all(s.topic.startswith("ha-disc/binary_sensor/site2/") for s in sensors)
    assert all(s.config["unique_id"].startswith("site2_") for s in sensors)


def test_zigbee_addresses_reads_the_bridge_device_list() -> None:
    """Test that friendly names map to addresses and junk is refused."""
    payload = json.dumps(
        [
            {"friendly_name": "Coordinator", "ieee_address": "0x00124b0000000000"},
            {"friendly_name": "hall", "ieee_address": IEEE.upper().replace("X", "x")},
            {"friendly_name": "bad", "ieee_address": "nope"},
            "junk",
        ]
    ).encode()

    assert zigbee_addresses(payload) == {
        "Coordinator": "0x00124b0000000000",
        "hall": IEEE,
    }
    assert zigbee_addresses(b"{}") is None
    assert zigbee_addresses(b"\xff") is None


@pytest.mark.parametrize(
    "section",
    [
        {"prefix": "home/#"},
        {"status_topic": "$SYS/x"},
        {"node_id": "has space"},
        {"node_id": ""},
        {"enable": False},
    ],
)
def test_discovery_settings_refuse_bad_values(section: dict[str, Any]) -> None:
    """Test that wildcard topics, unusable node ids and unknown keys are refused."""
    with pytest.raises(ConfigError, match="discovery"):
        settings_from_mapping({"discovery": section})


class _Recorder:
    """A publish function that records what it is given, and can refuse."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bool]] = []
        self.refuse = False

    def __call__(self, topic: str, payload: bytes, retain: bool) -> bool:
        if self.refuse:
            return False
        self.sent.append((topic, payload, retain))
        return True

    def configs_for(self, device: str) -> list[bytes]:
        object_id = device_object_id(device)
        return [p for t, p, _ in self.sent if f"/{object_id}_anomaly/" in t]


def _discovery(publish: _Recorder, birth_resend_min_s: float = 0.0) -> Discovery:
    # No pacing between passes: each tick below is one pass.
    return Discovery(
        DiscoverySettings(),
        OutputSettings(),
        ConditionSettings(),
        publish,
        pass_interval_s=0.0,
        birth_resend_min_s=birth_resend_min_s,
    )


def test_discovery_sends_new_devices_and_removes_evicted_ones() -> None:
    """Test that reconcile follows the pipeline: configs in, empty payloads out."""
    recorder = _Recorder()
    discovery = _discovery(recorder)
    tracked = {"hall"}

    discovery.reconcile(["hall"], tracked.__contains__)
    discovery.tick(1, True, lambda: sorted(tracked))
    tracked = {"attic"}
    discovery.reconcile(["hall", "attic"], tracked.__contains__)
    discovery.tick(1, True, lambda: sorted(tracked))

    assert [bool(p) for p in recorder.configs_for("hall")] == [True, False]
    assert len(recorder.configs_for("attic")) == 1
    assert all(retain for _, _, retain in recorder.sent)
    removed = [t for t, p, _ in recorder.sent if not p]
    assert removed == removal_topics("hall", DiscoverySettings())


def test_discovery_resends_after_birth_and_reconnect() -> None:
    """Test that `online` on homeassistant/status, or a new connect, re-sends all."""
    recorder = _Recorder()
    discovery = _discovery(recorder)
    discovery.tick(1, True, lambda: ["hall"])

    assert not discovery.on_message("homeassistant/status", b"online")
    discovery.tick(1, True, lambda: ["hall"])
    discovery.on_message("homeassistant/status", b"offline")
    discovery.tick(1, True, lambda: ["hall"])
    discovery.tick(2, True, lambda: ["hall"])

    assert len(recorder.configs_for("hall")) == 3


def test_discovery_births_in_a_burst_re_send_once() -> None:
    """A flood of Home Assistant births re-sends the configs once, not per birth.

    A tester's loop of births filled the MQTT client's queue with configs
    until a verdict was refused.
    """
    recorder = _Recorder()
    discovery = _discovery(recorder, birth_resend_min_s=3600.0)
    discovery.tick(1, True, lambda: ["hall"])

    for _ in range(100):
        discovery.on_message("homeassistant/status", b"online")
        discovery.tick(1, True, lambda: ["hall"])

    # The first send, and one re-send for the whole burst.
    assert len(recorder.configs_for("hall")) == 2


def test_discovery_waits_while_disconnected_or_refused() -> None:
    """Test that nothing is lost when the client is away or its queue is full."""
    recorder = _Recorder()
    discovery = _discovery(recorder)
    discovery.reconcile(["hall"], {"hall"}.__contains__)

    discovery.tick(0, False, list)
    recorder.refuse = True
    discovery.tick(0, True, list)
    recorder.refuse = False
    discovery.tick(0, True, list)

    assert len(recorder.configs_for("hall")) == 1


def test_discovery_sends_a_large_fleet_in_slices() -> None:
    """Test that a re-send for many devices is spread over worker passes."""
    recorder = _Recorder()
    discovery = _discovery(recorder)
    devices = [f"plug_{n}" for n in range(DEVICES_PER_PASS * 2 + 1)]

    discovery.tick(1, True, lambda: devices)
    first = len(recorder.sent)
    discovery.tick(1, True, lambda: devices)
    discovery.tick(1, True, lambda: devices)

    per_device = len(_sensors("plug_0"))
    own = 2  # the sidecar's status and data-path sensors
    assert first == own + DEVICES_PER_PASS * per_device
    assert len(recorder.sent) == own + len(devices) * per_device


def test_discovery_relinks_devices_when_zigbee2mqtt_names_them() -> None:
    """Test that reading bridge/devices re-sends a device with its zigbee link."""
    recorder = _Recorder()
    discovery = _discovery(recorder)
    discovery.reconcile(["hall"], {"hall"}.__contains__)
    discovery.tick(1, True, list)

    device_list = [{"friendly_name": "hall", "ieee_address": IEEE}]
    discovery.on_message("zigbee2mqtt/bridge/devices", json.dumps(device_list).encode())
    discovery.tick(1, True, list)

    first, second = (json.loads(p) for p in recorder.configs_for("hall"))
    assert first["device"]["name"] == "hall"
    assert second["device"] == {"identifiers": [f"zigbee2mqtt_{IEEE}"]}


@pytest.mark.parametrize(
    ("topic", "own"),
    [
        ("homeassistant/binary_sensor/anomaly_sidecar/hall_0123_anomaly/config", True),
        ("homeassistant/binary_sensor/anomaly_sidecar/status/config", True),
        ("site2/homeassistant/binary_sensor/anomaly_sidecar/x/config", True),
        ("homeassistant/binary_sensor/zigbee2mqtt/x/config", False),
        ("homeassistant/sensor/anomaly_sidecar/x/config", False),
        ("homeassistant/status", False),
    ],
)
def test_discovery_knows_its_own_configs(topic: str, own: bool) -> None:
    """Test that own configs, also bridged, are recognised and others are not."""
    assert _discovery(_Recorder()).on_message(topic, b"{}") is own


def test_example_automation_acts_on_anomaly_sensors() -> None:
    """Test that the shipped automations parse and watch verdicts and sensors."""
    automations = yaml.safe_load(
        (CONFIGS / "homeassistant-automation.yaml").read_text()
    )
    triggers = [t for a in automations for t in a["triggers"]]
    mqtt = [t for t in triggers if t["trigger"] == "mqtt"]
    states = [t for t in triggers if t["trigger"] == "state"]
    config = _sensors("kitchen_fridge")[0].config
    # Home Assistant names a discovered entity after its device and itself.
    entity_id = f"binary_sensor.{config['device']['name']}_{config['name'].lower()}"

    assert all(a["actions"] for a in automations)
    assert [t["topic"] for t in mqtt] == ["anomalies/+", "anomalies/+/+"]
    assert {t["payload"] for t in mqtt} == {config["payload_on"]}
    raised = _verdict("kitchen_fridge", Transition.RAISED).to_json()
    assert _render(mqtt[0]["value_template"], raised) == "raised"
    assert _render(mqtt[0]["value_template"], b"online") == ""
    condition = ConditionVerdict(
        "kitchen_fridge", ConditionKind.SILENT, Transition.RAISED, 7200.0, 0.0
    ).to_json()
    assert _render(mqtt[1]["value_template"], condition) == "raised"
    assert _render(mqtt[1]["value_template"], raised) == ""
    assert [(t["entity_id"], t["to"]) for t in states] == [(entity_id, "on")]


@pytest.mark.parametrize(("age_s", "passes"), [(5.0, "True"), (3600.0, "False")])
def test_example_automation_skips_retained_replays_of_old_alarms(
    age_s: float, passes: str
) -> None:
    """Test that a raised verdict replayed on reconnect does not notify again."""
    automations = yaml.safe_load(
        (CONFIGS / "homeassistant-automation.yaml").read_text()
    )
    template = automations[0]["conditions"][0]["value_template"]
    now = datetime.now(UTC)
    verdict = ConditionVerdict(
        "kitchen_fridge",
        ConditionKind.SILENT,
        Transition.RAISED,
        now.timestamp() - age_s,
        0.0,
    )
    environment = jinja2.Environment()
    # Home Assistant's own template functions, as it defines them.
    environment.globals["now"] = lambda: now
    environment.globals["as_datetime"] = datetime.fromisoformat
    payload = json.loads(verdict.to_json())

    rendered = environment.from_string(template).render(
        trigger={"payload_json": payload}
    )

    assert rendered == passes


def test_example_automation_message_names_a_score_only_where_there_is_one() -> None:
    """Condition verdicts carry no score; their notification does not show one."""
    automations = yaml.safe_load(
        (CONFIGS / "homeassistant-automation.yaml").read_text()
    )
    template = automations[0]["actions"][0]["data"]["message"]
    silent = ConditionVerdict(
        "kitchen_fridge", ConditionKind.SILENT, Transition.RAISED, 1.8e9, 0.0
    )
    environment = jinja2.Environment()

    rendered = environment.from_string(template).render(
        trigger={"payload_json": json.loads(silent.to_json())}
    )

    assert "score" not in rendered
    assert json.loads(silent.to_json())["time"] in rendered


def test_example_node_red_flow_subscribes_to_verdicts() -> None:
    """Test that the shipped flow passes on fresh raised verdicts and conditions."""
    nodes = json.loads((CONFIGS / "node-red-flow.json").read_text())
    by_id = {node["id"]: node for node in nodes}
    mqtt_in = [n for n in nodes if n["type"] == "mqtt in"]
    on_state = [n for n in nodes if n.get("property") == "payload.state"]
    on_retain = [n for n in nodes if n.get("property") == "retain"]

    # `#` also reaches anomalies/<device>/<kind>, the condition verdicts.
    assert [n["topic"] for n in mqtt_in] == ["anomalies/#"]
    assert [n["rules"] for n in on_retain] == [[{"t": "false"}]]
    assert all(by_id[n["broker"]]["type"] == "mqtt-broker" for n in mqtt_in)
    assert [n["type"] for n in on_state] == ["switch"]
    assert on_state[0]["rules"] == [{"t": "eq", "v": "raised", "vt": "str"}]
    for node in nodes:
        for targets in node.get("wires", []):
            assert all(target in by_id for target in targets)
    # From the subscription, the wires lead through the state switch.
    reached, frontier = set(), [mqtt_in[0]["id"]]
    while frontier:
        node = by_id[frontier.pop()]
        reached.add(node["id"])
        frontier += [t for ts in node.get("wires", []) for t in ts if t not in reached]
    assert on_state[0]["id"] in reached
    assert on_retain[0]["id"] in reached
    assert any(by_id[n]["type"] == "debug" for n in reached)


# Against real brokers.


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    """The shipped models, loaded once."""
    defaults = Settings()
    return load_cascade(defaults.models, defaults.detection, defaults.window.length)


def _settings(address: BrokerAddress, **sections: Any) -> Settings:
    sections["broker"] = {
        "host": address.host,
        "port": address.port,
        "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
    }
    sections.setdefault("health", {"probe_timeout_s": 0})
    return settings_from_mapping(sections)


@contextmanager
def _running(settings: Settings, models: LoadedModels) -> Iterator[Service]:
    service = Service(settings, models)
    service.start()
    assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
    try:
        yield service
    finally:
        service.stop()


def _config_topic(device: str, kind: str = "anomaly") -> str:
    return CONFIG_FILTER.replace("+", f"{device_object_id(device)}_{kind}")


def _on(topic: str, seen: list[ReceivedMessage]) -> list[ReceivedMessage]:
    return [m for m in seen if m.topic == topic]


@pytest.mark.broker
def test_readings_publish_a_retained_config(
    broker: BrokerAddress, models: LoadedModels
) -> None:
    """Test that a device's first reading leaves a retained config in the broker."""
    topic = _config_topic("hall_sensor")
    with _running(_settings(broker), models):
        with MessageCollector(broker, CONFIG_FILTER) as live:
            publish(broker, "zigbee2mqtt/hall_sensor", b'{"temperature": 21.5}')
            live.wait_for(lambda seen: bool(_on(topic, seen)), CONFIG_TIMEOUT_S)
        with MessageCollector(broker, topic) as later:
            # amqtt 0.12.1 also hands a new subscriber retained messages of
            # other topics; only this topic's count.
            seen = later.wait_for(lambda seen: bool(_on(topic, seen)), CONFIG_TIMEOUT_S)
            retained = _on(topic, seen)[0]

    config = json.loads(retained.payload)
    assert retained.retain
    assert config["state_topic"] == "anomalies/hall_sensor"
    assert config["device"]["name"] == "hall_sensor"


@pytest.mark.broker
def test_home_assistant_birth_makes_the_sidecar_resend(
    broker: BrokerAddress, models: LoadedModels
) -> None:
    """Test that `online` on homeassistant/status re-sends every config."""
    topic = _config_topic("hall_sensor")
    with (
        _running(_settings(broker), models),
        MessageCollector(broker, CONFIG_FILTER) as configs,
    ):
        publish(broker, "zigbee2mqtt/hall_sensor", b'{"temperature": 21.5}')
        configs.wait_for(lambda seen: len(_on(topic, seen)) == 1, CONFIG_TIMEOUT_S)
        publish(broker, "homeassistant/status", b"online")
        seen = configs.wait_for(
            lambda seen: len(_on(topic, seen)) == 2, CONFIG_TIMEOUT_S
        )

    assert _on(topic, seen)[0].payload == _on(topic, seen)[1].payload


@pytest.mark.broker
def test_evicted_device_config_is_removed(
    broker: BrokerAddress, models: LoadedModels
) -> None:
    """Test that a device evicted at limits.max_devices gets empty retained configs."""
    settings = _settings(broker, limits={"max_devices": 1})
    first, second = _config_topic("hall_sensor"), _config_topic("attic_sensor")
    with (
        _running(settings, models),
        MessageCollector(broker, CONFIG_FILTER) as configs,
    ):
        publish(broker, "zigbee2mqtt/hall_sensor", b'{"temperature": 21.5}')
        configs.wait_for(lambda seen: bool(_on(first, seen)), CONFIG_TIMEOUT_S)
        publish(broker, "zigbee2mqtt/attic_sensor", b'{"temperature": 30.0}')
        seen = configs.wait_for(
            lambda seen: len(_on(first, seen)) == 2 and bool(_on(second, seen)),
            CONFIG_TIMEOUT_S,
        )
        with MessageCollector(broker, CONFIG_FILTER) as later:
            retained = later.wait_for(
                lambda seen: bool(_on(second, seen)), CONFIG_TIMEOUT_S
            )

    assert _on(first, seen)[1].payload == b""
    # The broker no longer holds the evicted device's config.
    assert _on(first, retained) == []


@pytest.mark.broker
def test_disabled_discovery_publishes_nothing(
    broker: BrokerAddress, models: LoadedModels
) -> None:
    """Test that discovery.enabled: false leaves the discovery prefix empty."""
    settings = _settings(broker, discovery={"enabled": False})
    with (
        MessageCollector(broker, "homeassistant/#") as everything,
        _running(settings, models) as service,
    ):
        publish(broker, "zigbee2mqtt/hall_sensor", b'{"temperature": 21.5}')
        publish(broker, "homeassistant/status", b"online")
        deadline = time.monotonic() + CONFIG_TIMEOUT_S
        while service.counters["processed"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(QUIET_S)
        processed = service.counters["processed"]

    assert processed == 2
    assert [m.topic for m in everything.messages] == ["homeassistant/status"]


@pytest.mark.broker
def test_own_configs_are_never_scored_even_with_catch_all_rules(
    broker: BrokerAddress, models: LoadedModels
) -> None:
    """Test that configs coming back through `#` stay own output under any rules."""
    settings = _settings(broker, topics=[{"pattern": "(?P<device>.+)"}])
    with (
        _running(settings, models) as service,
        MessageCollector(broker, CONFIG_FILTER) as configs,
    ):
        publish(broker, "plugs/desk", b"42")
        configs.wait_for(
            lambda seen: bool(_on(_config_topic("plugs/desk"), seen)), CONFIG_TIMEOUT_S
        )
        # Every config comes back through `#`: the status sensor's, the
        # device's five, and the sidecar's own `online`.
        expected = 1 + len(_sensors("plugs/desk")) + 1
        deadline = time.monotonic() + CONFIG_TIMEOUT_S
        while service.counters["own_output"] < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        own_output = service.counters["own_output"]
        devices = service.pipeline.device_ids()

    assert own_output >= expected
    assert devices == ["plugs/desk"]
