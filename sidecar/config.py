"""Load and validate the YAML configuration into frozen, typed settings."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import stat
import string
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from sidecar.errors import ConfigError

__all__ = [
    "DEFAULT_MODELS_DIR",
    "DEFAULT_TOPIC_RULES",
    "BrokerSettings",
    "DetectionSettings",
    "DiscoverySettings",
    "LimitSettings",
    "LoggingSettings",
    "ModelSettings",
    "OutputSettings",
    "Settings",
    "SubscribeSettings",
    "TlsSettings",
    "TopicRule",
    "check_model_files",
    "load_settings",
    "settings_from_mapping",
]

_LOG = logging.getLogger(__name__)

# Secrets may come from the environment instead of the file; nothing else does.
ENV_USERNAME = "ANOMALY_SIDECAR_USERNAME"
ENV_PASSWORD = "ANOMALY_SIDECAR_PASSWORD"
# The shipped models live beside the packages in a source checkout or image.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
# MQTT 3.1.1 section 1.5.3: topics are UTF-8 strings of at most 65535 bytes.
MAX_TOPIC_BYTES = 65535
# Keys whose values are never echoed in an error, however they are spelled;
# `pas+w` and `pwd` also catch the usual misspellings (pasword, paswd, pwd).
_SECRET_WORDS = re.compile(r"pass|pas+w|pwd|secret|token|key|cred", re.IGNORECASE)
# Long enough to name the value, short enough to keep a message readable.
MAX_VALUE_REPR = 80
# The deepest real setting is four levels down (overrides[0].mute_windows[0]
# .start); anything past this is a mistake or an attack, reported before any
# code walks it recursively.
MAX_CONFIG_DEPTH = 16
# A real configuration holds a few hundred values (sections, topic rules,
# overrides); even a thousand overrides of ten keys each stay far below this.
# Aliases of aliases multiply instead ("billion laughs": nine levels of ten
# make 10**9 values from a few lines), so the walk counts every value it
# reaches, repeats through aliases included, and stops here: within a tenth
# of a second instead of hours.
MAX_CONFIG_VALUES = 100_000
# chmod(2) permission bits: the file's group, or anyone, may read it. A
# password in such a file is readable by every other account on the host.
GROUP_OR_OTHERS_READ = stat.S_IRGRP | stat.S_IROTH


# Named groups starting with this are secrets: masked when a topic is echoed.
SECRET_GROUP_PREFIX = "secret"
# The TopicRule fields that are `str.format` templates filled from the groups.
TEMPLATE_FIELDS = ("device", "channel")
# First topic levels of the device ecosystems DEFAULT_TOPIC_RULES know.
# Everything under the output prefix is taken for the sidecar's own output
# (pitfalls.md #7), so a prefix inside one of these trees would hide that
# traffic from scoring.
DEVICE_TOPIC_ROOTS = (
    "zigbee2mqtt",
    "homeassistant",
    "tele",
    "stat",
    "cmnd",
    "shellies",
    "tuya",
    "frigate",
)
# A broker host holding any of these is a URL (`mqtt://user:password@host`),
# which may carry credentials; it is refused and never echoed.
URL_MARKS = ("://", "@", "/")
_URL_NOT_SHOWN = "a URL, not shown: it may hold credentials"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML 1.1 reads yes/no/on/off as booleans, and pydantic would take
        # True for 1: `port: yes` would quietly become port 1.
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            if _is_number(annotation) and not _takes_bool(annotation):
                message = (
                    "must be a number, not a yes/no value (YAML reads yes, no, "
                    "on, off, true and false as booleans)"
                )
                raise ValueError(message)
        return value


def _is_number(annotation: Any) -> bool:
    """Return whether a field annotation takes an int or float (a Literal too)."""
    if annotation in (int, float):
        return True
    if isinstance(annotation, int | float) and not isinstance(annotation, bool):
        return True
    return any(_is_number(arg) for arg in get_args(annotation))


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or any(_takes_bool(arg) for arg in get_args(annotation))


class TlsSettings(_Frozen):
    """TLS to the broker: server verification and an optional client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = False

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            message = "cert_file and key_file must be given together"
            raise ValueError(message)
        return self


class BrokerSettings(_Frozen):
    """Where the broker is and how to log in to it."""

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    client_id: Annotated[str, Field(min_length=1, max_length=64)] = "anomaly-sidecar"
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsSettings | None = None
    # Mosquitto drops a client after 1.5 keepalives of silence (MQTT 3.1.1,
    # section 3.1.2.10); 30 s keeps a hub's dead-peer detection under a minute.
    keepalive: Annotated[int, Field(ge=5, le=3600)] = 30
    # Keep the session (and the broker's queue of QoS 1 messages for us)
    # while the sidecar is away, so a restart resumes instead of starting
    # blind. Off by default: what the broker queues is bounded by its own
    # limits, and what it drops is counted in $SYS (see `health`).
    persistent_session: bool = False

    @field_validator("host")
    @classmethod
    def _plain_host(cls, host: str) -> str:
        if any(mark in host for mark in URL_MARKS):
            message = (
                "must be a host name or IP address alone, not a URL; put the "
                "port in broker.port and credentials in broker.username and "
                f"broker.password, or in {ENV_USERNAME} and {ENV_PASSWORD}"
            )
            raise ValueError(message)
        if host.count(":") == 1:
            # One colon is `host:port`; IPv6 addresses hold several.
            message = (
                "must be a host name or IP address alone; put the port in broker.port"
            )
            raise ValueError(message)
        return host


def _valid_filter(topic_filter: str) -> str:
    _check_filter(topic_filter)
    return topic_filter


_TopicFilter = Annotated[str, AfterValidator(_valid_filter)]


class SubscribeSettings(_Frozen):
    """Which topics to consume. The output prefix is always excluded."""

    # Each filter is checked on its own, so every bad one is reported.
    include: Annotated[list[_TopicFilter], Field(min_length=1)] = ["#"]
    exclude: list[_TopicFilter] = []


class OutputSettings(_Frozen):
    """Where verdicts go."""

    prefix: Annotated[str, Field(min_length=1, max_length=128)] = "anomalies"
    qos: Literal[0, 1, 2] = 1
    publish_scores: bool = False

    @field_validator("prefix")
    @classmethod
    def _plain_prefix(cls, prefix: str) -> str:
        if any(char in prefix for char in "+#\x00") or prefix.startswith("$"):
            message = "must be a plain topic without wildcards, NUL or a leading $"
            raise ValueError(message)
        return prefix.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _outside_device_trees(cls, prefix: str) -> str:
        if prefix.split("/", 1)[0] in DEVICE_TOPIC_ROOTS:
            message = (
                "must not start with a topic tree that devices publish to "
                f"({', '.join(DEVICE_TOPIC_ROOTS)}): everything under the "
                "prefix is taken for the sidecar's own output, so that "
                "traffic would never be scored; allowed: a first level of "
                "its own, such as anomalies"
            )
            raise ValueError(message)
        return prefix


class TopicRule(_Frozen):
    """One ordered rule mapping a topic to a device.

    The first rule whose regular expression matches the whole topic decides.
    Named groups fill the `device` and `channel` templates, which may hold
    only plain `{name}` fields naming such groups: a positional or unknown
    field would fail on every message. Groups whose name starts with
    `secret` (a Tuya bridge puts the device's local key in its topics) are
    masked wherever the sidecar echoes the topic, and may not be used in a
    template.
    """

    pattern: str
    kind: Literal["telemetry", "availability", "ignore"] = "telemetry"
    # Checked even when left out: the default names a group too.
    device: Annotated[str, Field(validate_default=True)] = "{device}"
    channel: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as err:
            message = f"not a valid regular expression ({err})"
            raise ValueError(message) from err
        return pattern

    @field_validator(*TEMPLATE_FIELDS)
    @classmethod
    def _template_uses_groups(cls, template: str, info: ValidationInfo) -> str:
        pattern = info.data.get("pattern")
        if pattern is None or info.data.get("kind") == "ignore":
            # A bad pattern is reported on its own; ignore rules fill nothing.
            return template
        problem = _template_problem(template, set(re.compile(pattern).groupindex))
        if problem is not None:
            raise ValueError(problem)
        return template


def _template_problem(template: str, groups: set[str]) -> str | None:
    """Say what is wrong with a rule template, or return None if it is fine."""
    has = f"(has: {', '.join(sorted(groups)) or 'none'})"
    try:
        fields = [
            (name, conversion, spec)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as err:
        return f"not a valid template ({err}); write {{{{ and }}}} for a brace"
    for name, conversion, spec in fields:
        shown = "{" + name + (f"!{conversion}" if conversion else "")
        shown += (f":{spec}" if spec else "") + "}"
        if not name.isidentifier():
            return (
                f"template uses {shown}, not a named field; allowed: fields "
                f"named after the pattern's named groups {has}"
            )
        if name.startswith(SECRET_GROUP_PREFIX):
            return (
                f"template uses {shown}, a secret group; "
                "secrets never go into device ids or verdict topics"
            )
        if conversion or spec:
            return (
                f"template uses {shown}; allowed: plain {{{name}}} fields, "
                "without a conversion or format spec"
            )
        if name not in groups:
            return (
                f"template uses {shown} but the pattern has no such named group {has}"
            )
    return None


def _rule(pattern: str, kind: str = "telemetry", **templates: str) -> dict[str, str]:
    return {"pattern": pattern, "kind": kind, **templates}


# Defaults from the payload survey (shared/reference/payloads.md sections 1-6):
# metadata and commands first, then availability, then telemetry per ecosystem,
# then the generic `<prefix>/<device>/...` fallback.
DEFAULT_TOPIC_RULES: list[dict[str, str]] = [
    _rule(r"\$.*", "ignore"),
    _rule(r"homeassistant/status", "ignore"),
    _rule(r"homeassistant/.+/config", "ignore"),
    # The bridge's own availability: when zigbee2mqtt stops, one offline
    # verdict for the bridge says why its devices fall silent one by one.
    _rule(
        r"(?P<base>zigbee2mqtt)/bridge/state", "availability", device="{base}/bridge"
    ),
    _rule(r"zigbee2mqtt/bridge(/.*)?", "ignore"),
    _rule(r"shellies/(announce|command)", "ignore"),
    _rule(r"cmnd/.*", "ignore"),
    _rule(r".*/(set|get|command)(/.*)?", "ignore"),
    _rule(r"[^/]+/rpc", "ignore"),
    _rule(r"frigate/(stats|events|available)", "ignore"),
    _rule(r".+/debug", "ignore"),
    _rule(r"zigbee2mqtt/(?P<device>.+)/availability", "availability"),
    _rule(r"tele/(?P<device>[^/]+)/LWT", "availability"),
    _rule(r"shellies/(?P<device>[^/]+)/online", "availability"),
    _rule(r"(?P<device>[^/]+)/(online|status)", "availability"),
    _rule(r"zigbee2mqtt/(?P<device>.+)", channel=""),
    # tuya-mqtt style bridges (payloads.md section 9): the topic carries the
    # device's local key and IP; the device is the tuyAPI id alone. Whatever
    # follows them (state, dps, dps/<id>, color, ...) is the channel, so no
    # suffix lets the key reach a verdict, a key name or a log line.
    _rule(
        r"tuya/(?P<device>[^/]+)/(?P<secret_key>[^/]+)/(?P<secret_ip>[^/]+)"
        r"/(?P<channel>.+)",
        channel="{channel}",
    ),
    # The same without a suffix: left to the fallback, the key and IP would
    # become the channel.
    _rule(
        r"tuya/(?P<device>[^/]+)/(?P<secret_key>[^/]+)/(?P<secret_ip>[^/]+)",
        channel="",
    ),
    # Any other shape under tuya/ (a trailing slash, the key without an IP,
    # other bridges' layouts): everything after the id may be a secret.
    _rule(r"tuya/(?P<device>[^/]+)(?P<secret_rest>/.*)?", channel=""),
    _rule(r"(tele|stat)/(?P<device>[^/]+)/(?P<channel>.+)", channel="{channel}"),
    _rule(r"shellies/(?P<device>[^/]+)/(?P<channel>.+)", channel="{channel}"),
    _rule(
        r"(?P<device>shelly[^/]+)/(events/rpc|status/(?P<channel>.+))",
        channel="{channel}",
    ),
    # Statestream mirrors every Home Assistant entity, the sidecar's own too
    # (discovery.py): `<device>_anomaly` and `<device>_anomaly_<condition>`
    # (conditions.ConditionKind), and its own status and data path sensors,
    # named by HA after the sidecar device (`mqtt_anomaly_sidecar_status`)
    # or by the default node id. Tracked as devices, they would get sensors
    # of their own, which would come back again, without end. HA appends
    # `_2`, `_3`, ... to an entity id already taken. A custom node id or a
    # renamed entity needs its own ignore rule in `topics`.
    _rule(
        r"homeassistant/binary_sensor/([^/]+_anomaly"
        r"(_(silent|frozen|unavailable|offline))?"
        r"|(mqtt_)?anomaly_sidecar(_[^/]+)?_(status|data_path))(_[0-9]+)?/.+",
        "ignore",
    ),
    _rule(
        r"homeassistant/(?P<domain>sensor|binary_sensor|switch|light|climate)"
        r"/(?P<object>[^/]+)/state",
        device="{domain}.{object}",
    ),
    _rule(
        r"(?P<device>[^/]+)/(?P<channel>(sensor|binary_sensor|switch|text_sensor)"
        r"/[^/]+)/state",
        channel="{channel}",
    ),
    _rule(r"[^/$][^/]*/(?P<device>[^/]+)(/(?P<channel>.*))?", channel="{channel}"),
]


class LimitSettings(_Frozen):
    """Bounds on everything that grows with traffic; each has a counter."""

    # From `make bench` on a 2-core machine: the worker scores about 6,600
    # messages a second under a flood, so 5,000 queued are 0.75 s of work,
    # the oldest age a scored message reaches under sustained overload (the
    # verdict's "within a second"); 20,000 made it 3 s. Bursts longer than
    # that (a broker replaying thousands of retained messages) shed their
    # oldest, counted. The batch of 256 is where the per-message cost bottoms
    # out (bench knobs: 91 us at 16, 54 at 64, 46 at 256, 48 at 1,024).
    queue_size: Annotated[int, Field(ge=1, le=10_000_000)] = 5_000
    batch_size: Annotated[int, Field(ge=1, le=65_536)] = 256
    max_devices: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    max_payload_bytes: Annotated[int, Field(ge=16, le=268_435_455)] = 65_536
    max_keys_per_device: Annotated[int, Field(ge=1, le=1024)] = 32


class WindowSettings(_Frozen):
    """Per-device rolling window; its length must match the shipped models."""

    length: Annotated[int, Field(ge=4, le=4096)] = 32


class ModelSettings(_Frozen):
    """Which ONNX files to serve and how onnxruntime may use the CPU."""

    directory: Path = DEFAULT_MODELS_DIR
    rf: str = "rf.onnx"
    cnn: str = "cnn.onnx"
    # One thread and no spinning: two sessions share a small hub's cores with
    # paho and numpy (onnxruntime issues 10273 and 17011; pitfalls.md #14).
    intra_op_threads: Annotated[int, Field(ge=1, le=64)] = 1
    inter_op_threads: Annotated[int, Field(ge=1, le=64)] = 1
    allow_spinning: bool = False


class DetectionSettings(_Frozen):
    """Thresholds and the alarm lifecycle. Empty thresholds use the model card's."""

    rf_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    cnn_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    fused_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    alarm_after: Annotated[int, Field(ge=1, le=1000)] | None = None
    clear_after: Annotated[int, Field(ge=1, le=100_000)] | None = None


class SilentSettings(_Frozen):
    """When a device that stopped reporting is called silent.

    Silent once quiet for longer than `factor` times its longest recent gap
    (never less than `min_s`), judged only after `min_gaps` gaps were seen, so
    a battery sensor that reports hourly is judged against its hour.
    """

    enabled: bool = True
    factor: Annotated[float, Field(ge=1.0, le=1000.0)] = 3.0
    min_s: Annotated[float, Field(ge=1.0, le=31_536_000.0)] = 300.0
    min_gaps: Annotated[int, Field(ge=1, le=100_000)] = 8


class FrozenSettings(_Frozen):
    """When a value repeated while the device keeps reporting is called frozen.

    A key is frozen when it has shown at least `min_distinct` values before,
    has repeated one value for `min_messages` messages and for longer than
    both `min_s` and `run_factor` times its longest earlier run.
    """

    enabled: bool = True
    min_s: Annotated[float, Field(ge=1.0, le=31_536_000.0)] = 3600.0
    min_messages: Annotated[int, Field(ge=2, le=1_000_000)] = 12
    min_distinct: Annotated[int, Field(ge=2, le=1000)] = 5
    run_factor: Annotated[float, Field(ge=1.0, le=1000.0)] = 2.0


class UnavailableSettings(_Frozen):
    """When a key reported as `unavailable`, `nan` or empty is called unavailable."""

    enabled: bool = True
    after_s: Annotated[float, Field(ge=0.0, le=31_536_000.0)] = 600.0


class OfflineSettings(_Frozen):
    """Whether availability announcements (bridge or LWT offline) raise verdicts."""

    enabled: bool = True


class ConditionSettings(_Frozen):
    """Rule-based conditions beside the models: silent, frozen, unavailable, offline.

    Their verdicts go to `<prefix>/<device>/<condition>`.
    """

    silent: SilentSettings = SilentSettings()
    frozen: FrozenSettings = FrozenSettings()
    unavailable: UnavailableSettings = UnavailableSettings()
    offline: OfflineSettings = OfflineSettings()
    # Silence and unavailability need a clock, not a message: how often the
    # worker looks. Conditions are minutes long; seconds are plenty.
    check_interval_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 5.0


class HealthSettings(_Frozen):
    """Self-checks of the data path, reported on `<prefix>/_health`."""

    # After each connect a probe is published under the output prefix; if it
    # does not come back within this many seconds, the broker is not
    # delivering to us (pitfalls.md #5: a queue limit of 0, an ACL). 0 = off.
    probe_timeout_s: Annotated[float, Field(ge=0.0, le=3600.0)] = 10.0
    # The broker's own count of messages it dropped for slow or queued
    # subscribers (Mosquitto's $SYS, mosquitto(8)); empty = not watched.
    broker_dropped_topic: str = "$SYS/broker/publish/messages/dropped"

    @field_validator("broker_dropped_topic")
    @classmethod
    def _one_topic(cls, topic: str) -> str:
        # Compared with each message's topic as it is, so a filter would
        # never match and the drops would go unwatched without a word.
        if "+" in topic or "#" in topic:
            message = "must be one topic name, without + or # wildcards"
            raise ValueError(message)
        return topic


class MetricsSettings(_Frozen):
    """The Prometheus endpoint (`/metrics`); off unless enabled."""

    enabled: bool = False
    # Loopback by default: counters name devices' traffic; expose on purpose.
    host: str = "127.0.0.1"
    # 9108: a port in the 9100 range where Prometheus exporters customarily
    # listen, chosen by us; change it if another exporter has it. 0 picks any
    # free port.
    port: Annotated[int, Field(ge=0, le=65535)] = 9108


class DiscoverySettings(_Frozen):
    """Home Assistant MQTT discovery of a problem sensor per watched device."""

    enabled: bool = True
    # Home Assistant's default discovery prefix (its MQTT integration's
    # `discovery_prefix` option); change both together.
    prefix: Annotated[str, Field(min_length=1, max_length=128)] = "homeassistant"
    # Where Home Assistant announces itself (its default birth message topic);
    # `online` there makes the sidecar send every config again.
    status_topic: Annotated[str, Field(min_length=1, max_length=256)] = (
        "homeassistant/status"
    )
    # The node id level of every config topic and the start of every unique
    # id; two sidecars sharing one Home Assistant need different ones. Home
    # Assistant accepts only these characters there (mqtt/discovery.py).
    node_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "anomaly_sidecar"
    # A sensor for each enabled condition (silent, frozen, unavailable,
    # offline) beside the model verdict's.
    conditions: bool = True

    @field_validator("prefix", "status_topic")
    @classmethod
    def _plain_topic(cls, topic: str) -> str:
        if any(char in topic for char in "+#\x00") or topic.startswith("$"):
            message = "must be a plain topic without wildcards, NUL or a leading $"
            raise ValueError(message)
        return topic.rstrip("/")


class MuteWindow(_Frozen):
    """A daily stretch of local time in which verdicts are not published.

    `start` after `end` spans midnight (22:00 to 06:00).
    """

    start: dt.time
    end: dt.time

    def covers(self, moment: dt.time) -> bool:
        """Return whether a local time of day falls inside the window."""
        if self.start <= self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


class Override(_Frozen):
    """Settings for the devices one rule selects; later rules win per key.

    A rule selects by device id (`device`, a shell-style pattern such as
    `garage_*`) and/or by the MQTT filter of the topic the device publishes
    on (`topic`, such as `tele/+/SENSOR`); with both, both must match.
    """

    device: Annotated[str, Field(min_length=1)] | None = None
    topic: str | None = None
    ignore: bool | None = None
    mute: bool | None = None
    mute_windows: list[MuteWindow] | None = None
    rf_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    cnn_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    fused_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    alarm_after: Annotated[int, Field(ge=1, le=1000)] | None = None
    clear_after: Annotated[int, Field(ge=1, le=100_000)] | None = None

    @field_validator("topic")
    @classmethod
    def _valid_topic_filter(cls, topic: str | None) -> str | None:
        if topic is not None:
            _check_filter(topic)
        return topic

    @model_validator(mode="after")
    def _selects_something(self) -> Override:
        if self.device is None and self.topic is None:
            message = (
                "an override needs `device` (a pattern), `topic` (a filter) or both"
            )
            raise ValueError(message)
        return self


class FeedbackSettings(_Frozen):
    """Users' `false_positive` marks, on `<prefix>/_feedback/<device>`."""

    enabled: bool = True
    # Each mark raises the device's fused-score threshold by this much (a
    # tenth of the fused score's 0..1 range: a few marks quiet a device, one
    # does not silence it), up to `max_threshold`.
    step: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    max_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.99
    # Where marks are kept across restarts; empty = the user's state folder
    # ($XDG_STATE_HOME or ~/.local/state)/anomaly-sidecar/feedback.json.
    state_file: Path | None = None


class LoggingSettings(_Frozen):
    """How the process logs."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["keyvalue", "json"] = "keyvalue"


class Settings(_Frozen):
    """The whole validated configuration."""

    broker: BrokerSettings = BrokerSettings()
    subscribe: SubscribeSettings = SubscribeSettings()
    output: OutputSettings = OutputSettings()
    topics: Annotated[list[TopicRule], Field(min_length=1)] = [
        TopicRule.model_validate(rule) for rule in DEFAULT_TOPIC_RULES
    ]
    limits: LimitSettings = LimitSettings()
    window: WindowSettings = WindowSettings()
    models: ModelSettings = ModelSettings()
    detection: DetectionSettings = DetectionSettings()
    conditions: ConditionSettings = ConditionSettings()
    health: HealthSettings = HealthSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    metrics: MetricsSettings = MetricsSettings()
    overrides: list[Override] = []
    feedback: FeedbackSettings = FeedbackSettings()
    logging: LoggingSettings = LoggingSettings()


def _check_filter(topic_filter: str) -> None:
    if not topic_filter or len(topic_filter.encode()) > MAX_TOPIC_BYTES:
        message = "a topic filter must be 1 to 65535 bytes"
        raise ValueError(message)
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        # MQTT 3.1.1 section 4.7.1: `#` only as the last whole level, `+` whole.
        if "#" in level and (level != "#" or index != len(levels) - 1):
            message = f"'#' must be the last whole level in {topic_filter!r}"
            raise ValueError(message)
        if "+" in level and level != "+":
            message = f"'+' must fill a whole level in {topic_filter!r}"
            raise ValueError(message)


def _describe_value(location: tuple[int | str, ...], value: Any) -> str:
    if any(_SECRET_WORDS.search(str(part)) for part in location):
        return "'***'"
    if (
        location[-1:] == ("host",)
        and isinstance(value, str)
        and any(mark in value for mark in URL_MARKS)
    ):
        return _URL_NOT_SHOWN
    if location[:1] == ("broker",) and len(location) == 1 and isinstance(value, str):
        # A whole broker section written as one string is often a URL with
        # credentials in it (user:password@host).
        return "a string, not shown: it may hold credentials"
    text = repr(_masked(value))
    if len(text) > MAX_VALUE_REPR:
        text = text[: MAX_VALUE_REPR - 3] + "..."
    return text


def _masked(value: Any) -> Any:
    """Return `value` with the value of every secret-named key inside it masked."""
    if isinstance(value, dict):
        return {
            key: "***" if _SECRET_WORDS.search(str(key)) else _masked(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_masked(item) for item in value]
    return value


def _section_model(location: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Return the settings class that holds the last key of a location."""
    model: type[BaseModel] = Settings
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [
            item
            for candidate in candidates
            for item in (candidate, *getattr(candidate, "__args__", ()))
            if isinstance(item, type) and issubclass(item, BaseModel)
        ]
        if not nested:
            return None
        model = nested[0]
    return model


def _problems(err: ValidationError) -> list[str]:
    problems = []
    for error in err.errors(include_url=False):
        location = tuple(error["loc"])
        path = ".".join(str(part) for part in location) or "(top level)"
        received = _describe_value(location, error.get("input"))
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            model = _section_model(location)
            if model is not None:
                allowed = ", ".join(model.model_fields)
                message = f"unknown key; allowed keys here: {allowed}"
        problems.append(f"{path}: {message} (got {received})")
    return problems


def settings_from_mapping(data: Any, source: str = "<mapping>") -> Settings:
    """Validate an already parsed configuration document.

    Args:
        data: The parsed YAML document (a mapping, or None for an empty file).
        source: Where the document came from, for error messages.

    Returns:
        The frozen settings.

    Raises:
        ConfigError: Listing every problem found, not only the first.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problem = (
            f"(top level): must be a mapping of sections (got {type(data).__name__})"
        )
        raise ConfigError(source, [problem])
    _check_shape(data, source)
    data = _with_secret_overrides(data)
    try:
        return Settings.model_validate(data)
    except ValidationError as err:
        raise ConfigError(source, _problems(err)) from err


def _check_shape(data: Any, source: str) -> None:
    """Refuse a document nested too deep, too big, or holding itself by aliases.

    A YAML anchor can refer to a mapping from inside it (`a: &x {b: [*x]}`),
    which makes the parsed document endless; validation and masking would
    recurse until Python gives up, with a traceback full of values. Aliases
    of aliases make it finite but huge; the walk stops after
    MAX_CONFIG_VALUES values.
    """
    stack: list[tuple[Any, str, int, frozenset[int]]] = [(data, "", 0, frozenset())]
    values = 0
    while stack:
        value, path, depth, above = stack.pop()
        if not isinstance(value, dict | list):
            continue
        where = path or "(top level)"
        if id(value) in above:
            problem = f"{where}: a YAML alias refers to a section holding it"
            raise ConfigError(source, [problem])
        if depth > MAX_CONFIG_DEPTH:
            problem = f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels"
            raise ConfigError(source, [problem])
        values += len(value)
        if values > MAX_CONFIG_VALUES:
            problem = (
                "(top level): too many values once YAML aliases are expanded "
                f"(got more than {MAX_CONFIG_VALUES:,}); allowed: at most "
                f"{MAX_CONFIG_VALUES:,}, where a real configuration holds a few "
                "hundred; aliases of aliases ('billion laughs') are refused"
            )
            raise ConfigError(source, [problem])
        inside = above | {id(value)}
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            child = f"{path}.{key}" if path else str(key)
            stack.append((item, child, depth + 1, inside))


def _with_secret_overrides(data: dict[str, Any]) -> dict[str, Any]:
    username = os.environ.get(ENV_USERNAME)
    password = os.environ.get(ENV_PASSWORD)
    section = data.get("broker")
    if (username is None and password is None) or not (
        section is None or isinstance(section, dict)
    ):
        # A malformed section is left as it is for validation to report.
        return data
    broker = dict(section or {})
    if username is not None:
        broker["username"] = username
    if password is not None:
        broker["password"] = password
    return {**data, "broker": broker}


def load_settings(path: Path | None) -> Settings:
    """Read and validate a YAML configuration file; None gives the defaults.

    Relative model and TLS paths are resolved against the file's folder. A
    file that holds a broker password and is readable by group or others is
    logged as a warning, since every other account on the host can read it.

    Raises:
        ConfigError: If the file is unreadable, not YAML, or invalid.
    """
    if path is None:
        return settings_from_mapping({}, "<defaults>")
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(source, [f"(file): cannot read it ({err})"]) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = f"(file): not valid YAML ({_yaml_problem(err)})"
        raise ConfigError(source, [problem]) from err
    except RecursionError as err:
        problem = "(file): nested too deeply for the YAML parser"
        raise ConfigError(source, [problem]) from err
    _check_shape(data, source)
    _warn_if_password_exposed(path, data)
    settings = _resolve_paths(settings_from_mapping(data, source), path.parent)
    tls = settings.broker.tls
    if tls is not None:
        missing = [
            f"broker.tls.{name}: file not found (got '{value}')"
            for name in ("ca_file", "cert_file", "key_file")
            if (value := getattr(tls, name)) is not None and not value.is_file()
        ]
        if missing:
            raise ConfigError(source, missing)
    return settings


def check_model_files(settings: Settings, source: str) -> None:
    """Check that `models.directory` holds the two model files it names.

    Only the commands that serve the models call this (`run`, `broker`), so
    `record` and `train` work with any models setting. A relative directory
    was resolved against the config file's folder, which is the usual reason
    a copied config misses the shipped models; the message says so.

    Raises:
        ConfigError: Naming `models.directory`, what it is and what it lacks.
    """
    models = settings.models
    missing = [
        name
        for name in (models.rf, models.cnn)
        if not (models.directory / name).is_file()
    ]
    if missing:
        problem = (
            f"models.directory: holds no {' or '.join(missing)} "
            f"(got '{models.directory.resolve()}'); allowed: a folder with "
            "both model files and their .card.json files, a relative path "
            "being read from the config file's folder"
        )
        raise ConfigError(source, [problem])


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's reason and position, without the line it quotes (it may be a secret)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return type(err).__name__


def _warn_if_password_exposed(path: Path, data: Any) -> None:
    """Warn when the file holds a broker password and others may read it.

    Only the file's own `broker.password` counts: one from the environment
    never touches the disk. Mode bits mean nothing outside POSIX, so no
    warning is given there.
    """
    section = data.get("broker") if isinstance(data, dict) else None
    if not isinstance(section, dict) or section.get("password") is None:
        return
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        # It was read a moment ago; if it has gone since, there is nothing
        # left to judge.
        return
    if mode & GROUP_OR_OTHERS_READ:
        _LOG.warning(
            "config file holds a broker password and is readable by group or "
            "others path=%s mode=%04o; chmod 600 it, or pass the password in %s",
            path,
            mode,
            ENV_PASSWORD,
        )


def _resolve_paths(settings: Settings, base: Path) -> Settings:
    models = settings.models
    if not models.directory.is_absolute():
        models = models.model_copy(update={"directory": base / models.directory})
    tls = settings.broker.tls
    if tls is not None:
        updates = {
            name: base / value
            for name in ("ca_file", "cert_file", "key_file")
            if (value := getattr(tls, name)) is not None and not value.is_absolute()
        }
        tls = tls.model_copy(update=updates)
    broker = settings.broker.model_copy(update={"tls": tls})
    return settings.model_copy(update={"models": models, "broker": broker})
