"""Specification of topic routing, safe output segments and MQTT filter matching."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.conditions import ConditionKind
from sidecar.config import DiscoverySettings, Settings, settings_from_mapping
from sidecar.discovery import HEALTH_OBJECT_ID, STATUS_OBJECT_ID
from sidecar.errors import ConfigError
from sidecar.topics import (
    MAX_SEGMENT_CHARS,
    Route,
    RouteKind,
    TopicRouter,
    device_topic_segment,
    filter_matches,
)

OUTPUT_PREFIX = "anomalies"
# Bounded so the property test runs in about a second; no example database.
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_.:@-]+")


@pytest.fixture
def router() -> TopicRouter:
    """Route with the built-in rules and the default output prefix."""
    return TopicRouter(Settings().topics, output_prefix=OUTPUT_PREFIX)


def _assert_safe_segment(segment: str) -> None:
    """Check that a segment is one harmless, non-reserved topic level."""
    assert SAFE_SEGMENT.fullmatch(segment), segment
    assert not segment.startswith(("_", "."))
    assert len(segment) <= MAX_SEGMENT_CHARS


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        # zigbee2mqtt: friendly names may contain `/` (payloads.md section 1).
        (
            "zigbee2mqtt/kitchen/floor_light",
            Route(RouteKind.TELEMETRY, "kitchen/floor_light", ""),
        ),
        (
            "zigbee2mqtt/0x00158d0001a2b3c4",
            Route(RouteKind.TELEMETRY, "0x00158d0001a2b3c4"),
        ),
        (
            "zigbee2mqtt/kitchen/floor_light/availability",
            Route(RouteKind.AVAILABILITY, "kitchen/floor_light"),
        ),
        # Tasmota (section 2).
        ("tele/plug_a/SENSOR", Route(RouteKind.TELEMETRY, "plug_a", "SENSOR")),
        ("tele/plug_a/STATE", Route(RouteKind.TELEMETRY, "plug_a", "STATE")),
        ("stat/plug_a/POWER", Route(RouteKind.TELEMETRY, "plug_a", "POWER")),
        ("stat/plug_a/RESULT", Route(RouteKind.TELEMETRY, "plug_a", "RESULT")),
        ("tele/plug_a/LWT", Route(RouteKind.AVAILABILITY, "plug_a")),
        # Shelly Gen1 (section 3).
        (
            "shellies/shelly1pm-AABBCC/relay/0/power",
            Route(RouteKind.TELEMETRY, "shelly1pm-AABBCC", "relay/0/power"),
        ),
        (
            "shellies/shelly1pm-AABBCC/relay/0",
            Route(RouteKind.TELEMETRY, "shelly1pm-AABBCC", "relay/0"),
        ),
        (
            "shellies/shellyht-DDEEFF/sensor/temperature",
            Route(RouteKind.TELEMETRY, "shellyht-DDEEFF", "sensor/temperature"),
        ),
        (
            "shellies/shelly1pm-AABBCC/online",
            Route(RouteKind.AVAILABILITY, "shelly1pm-AABBCC"),
        ),
        # Shelly Gen2 (section 4): the channel is the component key, colon kept.
        (
            "shellyplus1pm-a0b1c2d3e4f5/events/rpc",
            Route(RouteKind.TELEMETRY, "shellyplus1pm-a0b1c2d3e4f5", ""),
        ),
        (
            "shellyplus1pm-a0b1c2d3e4f5/status/switch:0",
            Route(RouteKind.TELEMETRY, "shellyplus1pm-a0b1c2d3e4f5", "switch:0"),
        ),
        (
            "shellyplus1pm-a0b1c2d3e4f5/online",
            Route(RouteKind.AVAILABILITY, "shellyplus1pm-a0b1c2d3e4f5"),
        ),
        # ESPHome (section 5).
        (
            "esp_living/sensor/living_temp/state",
            Route(RouteKind.TELEMETRY, "esp_living", "sensor/living_temp"),
        ),
        (
            "esp_living/binary_sensor/door/state",
            Route(RouteKind.TELEMETRY, "esp_living", "binary_sensor/door"),
        ),
        ("esp_living/status", Route(RouteKind.AVAILABILITY, "esp_living")),
        # Home Assistant statestream (section 6): device is `<domain>.<object_id>`.
        ("homeassistant/sensor/x/state", Route(RouteKind.TELEMETRY, "sensor.x")),
        (
            "homeassistant/binary_sensor/front_door/state",
            Route(RouteKind.TELEMETRY, "binary_sensor.front_door"),
        ),
    ],
)
def test_topic_router_default_rules_route_ecosystems(
    router: TopicRouter, topic: str, expected: Route
) -> None:
    """Test that the built-in rules find device and channel for each ecosystem."""
    assert router.route(topic) == expected


def test_topic_router_zigbee2mqtt_bridge_state_is_the_bridge_availability(
    router: TopicRouter,
) -> None:
    """The bridge going offline is one announcement, not silence device by device."""
    route = router.route("zigbee2mqtt/bridge/state")

    assert route.kind is RouteKind.AVAILABILITY
    assert route.device == "zigbee2mqtt/bridge"


@pytest.mark.parametrize(
    "topic",
    [
        "zigbee2mqtt/bridge/devices",
        "zigbee2mqtt/bridge/logging",
        "zigbee2mqtt/bridge/request/permit_join",
        "zigbee2mqtt/kitchen/floor_light/set",
        "zigbee2mqtt/kitchen/floor_light/set/brightness",
        "zigbee2mqtt/kitchen/floor_light/get",
        "cmnd/plug_a/POWER",
        "cmnd/tasmotas/Status",
        "shellies/announce",
        "shellies/command",
        "shellies/shelly1pm-AABBCC/relay/0/command",
        "shellyplus1pm-a0b1c2d3e4f5/rpc",
        "esp_living/switch/relay/command",
        "esp_living/debug",
        "homeassistant/sensor/x/config",
        "homeassistant/sensor/node_1/x/config",
        "homeassistant/device/node_1/config",
        "homeassistant/status",
    ],
)
def test_topic_router_commands_and_metadata_are_ignored(
    router: TopicRouter, topic: str
) -> None:
    """Test that commands, bridge metadata and discovery configs are ignored."""
    assert router.route(topic).kind is RouteKind.IGNORE


@pytest.mark.parametrize(
    "topic",
    [
        "$SYS/broker/uptime",
        "$SYS/broker/version",
        "$SYS/broker/clients/connected",
        "$SYS/broker/load/messages/received/1min",
        "$SYS/broker/publish/messages/dropped",
        "$SYS/broker/retained messages/count",
        "$SYS/broker/store/messages/bytes",
    ],
)
def test_topic_router_sys_topics_are_never_telemetry(
    router: TopicRouter, topic: str
) -> None:
    """Test that Mosquitto's `$SYS` topics are never routed as telemetry."""
    assert router.route(topic).kind not in (RouteKind.TELEMETRY, RouteKind.AVAILABILITY)


@pytest.mark.parametrize("topic", ["$SYS/status", "$SYS/sensor/load/state"])
def test_topic_router_sys_topics_never_reach_a_device(
    router: TopicRouter, topic: str
) -> None:
    """Test that no `$SYS` topic, whatever its shape, is routed to a device."""
    assert router.route(topic).kind not in (RouteKind.TELEMETRY, RouteKind.AVAILABILITY)


@pytest.mark.parametrize(
    "topic", ["foo", "zigbee2mqtt", "tele", "", "/leading", "a//b"]
)
def test_topic_router_unroutable_topics_are_unknown(
    router: TopicRouter, topic: str
) -> None:
    """Test that single-level and malformed topics are UNKNOWN, not a device."""
    assert router.route(topic) == Route(RouteKind.UNKNOWN)


@pytest.mark.parametrize(
    "topic",
    [
        "anomalies",
        "anomalies/kitchen_floor_light",
        "anomalies/_status",
        "anomalies/_scores/plug_a",
        "anomalies/a/b/c",
    ],
)
def test_topic_router_own_output_is_never_a_device(
    router: TopicRouter, topic: str
) -> None:
    """Test that everything under the output prefix is OWN_OUTPUT (pitfalls #7)."""
    assert router.route(topic) == Route(RouteKind.OWN_OUTPUT)


@pytest.mark.parametrize(
    ("prefix", "topic"),
    [
        ("tele", "tele/plug_a/SENSOR"),
        ("zigbee2mqtt", "zigbee2mqtt/kitchen/floor_light"),
        ("site/anomalies", "site/anomalies/plug_a"),
    ],
)
def test_topic_router_own_output_wins_over_matching_rules(
    prefix: str, topic: str
) -> None:
    """Test that own output is recognised even where a rule would match it."""
    router = TopicRouter(Settings().topics, output_prefix=prefix)

    assert router.route(topic).kind is RouteKind.OWN_OUTPUT


def test_topic_router_own_output_needs_a_whole_level(router: TopicRouter) -> None:
    """Test that a topic merely starting with the prefix text is not own output."""
    assert not router.is_own_output("anomalies_archive/plug_a")
    assert router.route("anomalies_archive/plug_a").kind is not RouteKind.OWN_OUTPUT


@pytest.mark.parametrize(
    ("exclude", "topic"),
    [
        ("frigate/+/+/snapshot", "frigate/front/person/snapshot"),
        ("tele/#", "tele/plug_a/SENSOR"),
        ("zigbee2mqtt/kitchen/#", "zigbee2mqtt/kitchen/floor_light"),
    ],
)
def test_topic_router_exclude_filter_ignores_topic(exclude: str, topic: str) -> None:
    """Test that a topic matching an exclude filter is ignored."""
    router = TopicRouter(Settings().topics, OUTPUT_PREFIX, exclude=[exclude])

    assert router.route(topic) == Route(RouteKind.IGNORE)


def test_topic_router_exclude_filter_leaves_other_topics(router: TopicRouter) -> None:
    """Test that an exclude filter does not affect topics it does not match."""
    excluding = TopicRouter(Settings().topics, OUTPUT_PREFIX, exclude=["tele/+/STATE"])

    assert excluding.route("tele/plug_a/SENSOR") == router.route("tele/plug_a/SENSOR")


def test_topic_router_overlong_device_is_unknown(router: TopicRouter) -> None:
    """Test that a device id too long to be real is not routed to a device."""
    assert router.route("tele/" + "d" * 10_000 + "/SENSOR").kind is RouteKind.UNKNOWN


@pytest.mark.parametrize(
    "device",
    [
        "+",
        "#",
        "kitchen/floor_light",
        "$SYS",
        "..",
        ".",
        "_status",
        "_scores",
        "_",
        "",
        "a\x00b",
        "line\nbreak\ttab\x1b[31m",
        "../+/#",
        "plug a (living room)",
        "küche/licht",
        "d" * 10_000,
        "/" * 10_000,
    ],
)
def test_device_topic_segment_is_one_safe_level(device: str) -> None:
    """Test that any device id becomes one bounded, wildcard-free, unreserved level."""
    segment = device_topic_segment(device)

    _assert_safe_segment(segment)
    assert "/" not in segment
    assert "+" not in segment
    assert "#" not in segment


@pytest.mark.parametrize(
    "device", ["plug_a", "shellyplus1pm-a0b1c2d3e4f5", "sensor.x", "0x00158d0001a2b3c4"]
)
def test_device_topic_segment_keeps_plain_names(device: str) -> None:
    """Test that an already safe device id is used unchanged."""
    assert device_topic_segment(device) == device


def test_device_topic_segment_long_names_with_shared_prefix_differ() -> None:
    """Test that two long names differing only at the end get different segments."""
    shared = "living_room/" * 50

    first = device_topic_segment(shared + "lamp_1")
    second = device_topic_segment(shared + "lamp_2")

    assert first != second
    assert len(first) == len(second) == MAX_SEGMENT_CHARS


def test_device_topic_segment_is_deterministic() -> None:
    """Test that the same device always maps to the same segment."""
    device = "x" * 500 + "/+/#"

    assert device_topic_segment(device) == device_topic_segment(device)


@PROPERTY_SETTINGS
@given(device=st.text(max_size=400))
def test_device_topic_segment_any_text_is_safe(device: str) -> None:
    """Test that for any text the segment is safe, unreserved and bounded."""
    _assert_safe_segment(device_topic_segment(device))


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        # Examples from MQTT 3.1.1 section 4.7.1.2: `#` includes the parent.
        ("sport/tennis/player1/#", "sport/tennis/player1", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
        ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
        ("sport/#", "sport", True),
        ("#", "sport/tennis", True),
        ("#", "/", True),
        ("sport/tennis/#", "sport/tenniss", False),
        # Section 4.7.1.3: `+` fills exactly one level, possibly empty.
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/+", "sport", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("sport/+/player1", "sport//player1", True),
        ("+/tennis/#", "sport/tennis", True),
        # Section 4.7.2: `$` topics are not matched by a leading wildcard.
        ("#", "$SYS/broker/uptime", False),
        ("+/monitor/Clients", "$SYS/monitor/Clients", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
        # Section 4.7.3: topic names are case sensitive; plain filters are exact.
        ("ACCOUNTS", "Accounts", False),
        ("tele/plug_a/SENSOR", "tele/plug_a/SENSOR", True),
        ("tele/plug_a", "tele/plug_a/SENSOR", False),
        ("tele/plug_a/SENSOR", "tele/plug_a", False),
    ],
)
def test_filter_matches_follows_mqtt_3_1_1(
    topic_filter: str, topic: str, expected: bool
) -> None:
    """Test that filter matching follows MQTT 3.1.1 section 4.7."""
    assert filter_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    "channel", ["dps", "state", "dps/1", "color", "dps/1/state", "online", "x/y/z"]
)
def test_tuya_bridge_topic_names_the_device_by_id_and_masks_key_and_ip(
    channel: str,
) -> None:
    """Test payloads.md section 9: the local key and IP never leave the router.

    Whatever follows the key and IP, they are masked: no suffix may let them
    through into a channel, a key name, a verdict topic or a log line.
    """
    router = TopicRouter(Settings().topics, output_prefix="anomalies")

    route = router.route(f"tuya/bf0123/0f1e2d3c4b5a6978/192.168.1.40/{channel}")

    assert route.kind is RouteKind.TELEMETRY
    assert route.device == "bf0123"
    assert route.channel == channel
    assert route.public_topic == f"tuya/bf0123/***/***/{channel}"
    assert "0f1e2d3c4b5a6978" not in route.channel + route.device
    assert "192.168.1.40" not in route.channel + route.device


def test_rule_template_may_not_use_a_secret_group() -> None:
    """Test that a rule putting a secret into a device id is a config error."""
    with pytest.raises(ConfigError, match="secret group"):
        settings_from_mapping(
            {
                "topics": [
                    {"pattern": "t/(?P<secret_key>[^/]+)", "device": "{secret_key}"}
                ]
            }
        )


@pytest.mark.parametrize("device_id", ["bf0123", "03200160dc4f22ab1c2d", "0123abc"])
def test_tuya_bridge_topic_without_suffix_masks_key_and_ip(device_id: str) -> None:
    """Test that `tuya/<id>/<key>/<ip>` with nothing after routes to the id alone.

    Left to the generic fallback, the local key and IP would become the
    channel, and so reach verdict reasons and key names.
    """
    router = TopicRouter(Settings().topics, output_prefix="anomalies")

    route = router.route(f"tuya/{device_id}/0f1e2d3c4b5a6978/192.168.1.40")

    assert route.kind is RouteKind.TELEMETRY
    assert route.device == device_id
    assert route.channel == ""
    assert route.public_topic == f"tuya/{device_id}/***/***"
    assert "0f1e2d3c4b5a6978" not in route.public_topic
    assert "192.168.1.40" not in route.public_topic


@pytest.mark.parametrize(
    "rest",
    [
        "/0f1e2d3c4b5a6978/192.168.1.40/",
        "/0f1e2d3c4b5a6978",
        "/0f1e2d3c4b5a6978/",
        "/0f1e2d3c4b5a6978/192.168.1.40//dps",
    ],
)
def test_tuya_bridge_topic_of_any_other_shape_masks_all_after_the_id(
    rest: str,
) -> None:
    """Shapes no Tuya rule foresaw still never echo the key or the IP."""
    router = TopicRouter(Settings().topics, output_prefix="anomalies")

    route = router.route(f"tuya/bf0123{rest}")

    assert route.device == "bf0123"
    assert "0f1e2d3c4b5a6978" not in route.public_topic + route.channel
    assert "192.168.1.40" not in route.public_topic + route.channel


# What Home Assistant names the sidecar's own entities (discovery.py): the
# watched device's name plus "Anomaly" or "Anomaly <condition>", and the
# sidecar device's name plus its status and data path sensors.
OWN_ENTITY_OBJECT_IDS = [
    "kitchen_fridge_anomaly",
    *(f"kitchen_fridge_anomaly_{kind.value}" for kind in ConditionKind),
    "binary_sensor_front_door_anomaly_silent",
    "kitchen_fridge_anomaly_2",
    f"{DiscoverySettings().node_id}_{STATUS_OBJECT_ID}",
    f"{DiscoverySettings().node_id}_{HEALTH_OBJECT_ID}",
    f"mqtt_anomaly_sidecar_{STATUS_OBJECT_ID}",
    f"mqtt_anomaly_sidecar_{HEALTH_OBJECT_ID}",
]


@pytest.mark.parametrize("suffix", ["state", "attributes", "friendly_name"])
@pytest.mark.parametrize("object_id", OWN_ENTITY_OBJECT_IDS)
def test_topic_router_statestream_of_own_entities_is_ignored(
    router: TopicRouter, object_id: str, suffix: str
) -> None:
    """Test that statestream copies of the sidecar's own sensors are not devices.

    Tracked as devices they would get discovery sensors of their own, whose
    statestream copies would come back again, without end.
    """
    topic = f"homeassistant/binary_sensor/{object_id}/{suffix}"

    assert router.route(topic) == Route(RouteKind.IGNORE)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        (
            "homeassistant/binary_sensor/hall_door/state",
            Route(RouteKind.TELEMETRY, "binary_sensor.hall_door"),
        ),
        (
            "homeassistant/sensor/kitchen_fridge_anomaly/state",
            Route(RouteKind.TELEMETRY, "sensor.kitchen_fridge_anomaly"),
        ),
        (
            "homeassistant/binary_sensor/anomaly_detector_power/state",
            Route(RouteKind.TELEMETRY, "binary_sensor.anomaly_detector_power"),
        ),
        (
            "homeassistant/binary_sensor/garage_status/state",
            Route(RouteKind.TELEMETRY, "binary_sensor.garage_status"),
        ),
    ],
)
def test_topic_router_statestream_of_other_entities_is_still_telemetry(
    router: TopicRouter, topic: str, expected: Route
) -> None:
    """Test that only the sidecar's own binary sensors are ignored."""
    assert router.route(topic) == expected


@pytest.mark.parametrize(
    "ids",
    [
        ("kitchen/fridge", "kitchen_fridge", "kitchen+fridge", "kitchen fridge"),
        (" ", "_", "x_", "\t"),
        ("a" * 200, "a" * 201, "a" * 96),
        # An id crafted to equal another's segment, and one its cut form.
        ("kitchen/fridge", device_topic_segment("kitchen/fridge")),
        ("a" * 200, device_topic_segment("a" * 200)),
    ],
)
def test_device_topic_segment_never_gives_two_ids_one_topic(
    ids: tuple[str, ...],
) -> None:
    """Ids that clean up or cut alike still get verdict topics of their own."""
    segments = [device_topic_segment(device) for device in ids]

    assert len(set(segments)) == len(ids)
