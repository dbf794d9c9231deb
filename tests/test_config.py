"""Specification of configuration loading: defaults, every problem at once, secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.__main__ import EXIT_CONFIG, main
from sidecar.config import (
    DEFAULT_MODELS_DIR,
    DEVICE_TOPIC_ROOTS,
    ENV_PASSWORD,
    ENV_USERNAME,
    TEMPLATE_FIELDS,
    Settings,
    load_settings,
    settings_from_mapping,
)
from sidecar.errors import ConfigError

# Distinctive enough that finding it anywhere in an error text is a leak.
PASSWORD = "hunter2-Zq9-do-not-print"
ENV_SECRET = "env-secret-Xk4-do-not-print"


@pytest.fixture(autouse=True)
def _no_secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the caller's environment from leaking secrets into these tests."""
    monkeypatch.delenv(ENV_USERNAME, raising=False)
    monkeypatch.delenv(ENV_PASSWORD, raising=False)


def _problems(data: Any) -> list[str]:
    """Validate `data` and return the reported problems (it must be invalid)."""
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data, "test.yaml")
    return caught.value.problems


def _problem_for(problems: list[str], path: str) -> str:
    """Return the one problem line about the key path `path`."""
    matching = [problem for problem in problems if problem.startswith(f"{path}: ")]
    assert len(matching) == 1, problems
    return matching[0]


def _write(folder: Path, text: str) -> Path:
    """Write a config file into `folder` and return its path."""
    path = folder / "sidecar.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("data", [{}, None])
def test_settings_from_mapping_empty_gives_defaults(data: Any) -> None:
    """Test that an empty document validates to the defaults."""
    assert settings_from_mapping(data) == Settings()


def test_settings_defaults_are_valid() -> None:
    """Test that the defaults survive a round trip through validation."""
    defaults = Settings()

    revalidated = Settings.model_validate(defaults.model_dump())

    assert revalidated == defaults
    assert defaults.broker.port == 1883
    assert defaults.output.prefix == "anomalies"
    assert defaults.broker.password is None


def test_load_settings_none_gives_defaults() -> None:
    """Test that no config file means the defaults."""
    assert load_settings(None) == Settings()


def test_settings_from_mapping_reports_every_problem_at_once() -> None:
    """Test that a broken config reports all its problems together, not the first."""
    data = {
        "broker": {"port": 70000, "keepalive": 1},
        "subscribe": {"include": ["a/#/b"], "exclude": ["tele/plug+"]},
        "output": {"prefix": "anomalies/+"},
        "topics": [{"pattern": "tele/(?P<device>[^/]+", "kind": "telemetry"}],
        "limits": {"queue_size": -5},
        "brokr": {"host": "example.invalid"},
    }

    problems = _problems(data)

    assert sorted(problem.split(": ", 1)[0] for problem in problems) == [
        "broker.keepalive",
        "broker.port",
        "brokr",
        "limits.queue_size",
        "output.prefix",
        "subscribe.exclude.0",
        "subscribe.include.0",
        "topics.0.pattern",
    ]


@pytest.mark.parametrize(
    ("data", "path", "received", "allowed"),
    [
        (
            {"broker": {"port": 70000}},
            "broker.port",
            "70000",
            "less than or equal to 65535",
        ),
        ({"broker": {"port": "mqtt"}}, "broker.port", "'mqtt'", "valid integer"),
        (
            {"limits": {"queue_size": -5}},
            "limits.queue_size",
            "-5",
            "greater than or equal to 1",
        ),
        ({"output": {"qos": 3}}, "output.qos", "3", "0, 1 or 2"),
        ({"logging": {"level": "LOUD"}}, "logging.level", "'LOUD'", "'DEBUG'"),
        (
            {"topics": [{"pattern": "tele/(?P<device>[^/]+"}]},
            "topics.0.pattern",
            "'tele/(?P<device>[^/]+'",
            "not a valid regular expression",
        ),
        (
            {"subscribe": {"include": ["a/#/b"]}},
            "subscribe.include.0",
            "'a/#/b'",
            "'#' must be the last whole level",
        ),
        (
            {"subscribe": {"exclude": ["tele/plug+"]}},
            "subscribe.exclude.0",
            "'tele/plug+'",
            "'+' must fill a whole level",
        ),
        ({"brokr": {"host": "h"}}, "brokr", "{'host': 'h'}", "unknown key"),
    ],
)
def test_settings_from_mapping_problem_names_path_value_and_rule(
    data: dict[str, Any], path: str, received: str, allowed: str
) -> None:
    """Test that each problem names the key path, the received value and the rule."""
    problem = _problem_for(_problems(data), path)

    assert f"(got {received})" in problem
    assert allowed in problem


@pytest.mark.parametrize(
    "path",
    [
        "broker.port",
        "broker.keepalive",
        "output.qos",
        "limits.queue_size",
        "detection.alarm_after",
        "detection.rf_threshold",
        "conditions.silent.factor",
        "metrics.port",
    ],
)
@pytest.mark.parametrize("value", [True, False])
def test_settings_from_mapping_yes_or_no_is_not_a_number(
    path: str, value: bool
) -> None:
    """Test that a boolean is refused for a number, not taken as 1 or 0."""
    *sections, key = path.split(".")
    data: dict[str, Any] = {key: value}
    for section in reversed(sections):
        data = {section: data}

    problem = _problem_for(_problems(data), path)

    assert "must be a number, not a yes/no value" in problem
    assert f"(got {value})" in problem


def test_load_settings_port_yes_is_refused(tmp_path: Path) -> None:
    """Test that YAML's `yes` (a boolean in YAML 1.1) is not port 1."""
    path = _write(tmp_path, "broker:\n  port: yes\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    problem = _problem_for(caught.value.problems, "broker.port")
    assert "(got True)" in problem


def test_load_settings_yes_still_sets_a_switch(tmp_path: Path) -> None:
    """Test that yes and no keep working for the settings that are switches."""
    path = _write(tmp_path, "output:\n  publish_scores: yes\nmetrics:\n  enabled: on\n")

    settings = load_settings(path)

    assert settings.output.publish_scores is True
    assert settings.metrics.enabled is True


@pytest.mark.parametrize(
    "host",
    [
        f"mqtt://admin:{PASSWORD}@example.com:1883",
        f"mqtts://admin:{PASSWORD}@example.com",
        f"admin:{PASSWORD}@example.com",
        f"example.com/{PASSWORD}",
    ],
)
def test_settings_from_mapping_broker_host_as_url_is_refused_unseen(host: str) -> None:
    """Test that a URL with credentials as host is refused and never echoed."""
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"broker": {"host": host}})

    problem = _problem_for(caught.value.problems, "broker.host")
    assert "host name or IP address" in problem
    assert "broker.port" in problem
    assert "broker.username and broker.password" in problem
    assert ENV_PASSWORD in problem
    assert "(got a URL, not shown: it may hold credentials)" in problem
    assert PASSWORD not in str(caught.value)


@pytest.mark.parametrize(
    "host", ["example.com", "mosquitto", "192.168.1.10", "::1", "fe80::1%eth0"]
)
def test_settings_from_mapping_broker_host_name_or_address_is_kept(host: str) -> None:
    """Test that plain host names and IPv4 or IPv6 addresses are accepted."""
    assert settings_from_mapping({"broker": {"host": host}}).broker.host == host


def test_settings_from_mapping_unknown_key_lists_allowed_keys() -> None:
    """Test that an unknown key's problem says which keys are allowed there."""
    problem = _problem_for(_problems({"brokr": {"host": "h"}}), "brokr")

    assert "broker" in problem


def test_config_error_message_names_source_and_every_problem() -> None:
    """Test that the error text names the source and lists each problem."""
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"broker": {"port": 0}, "nope": 1}, "site.yaml")

    message = str(caught.value)
    assert caught.value.source == "site.yaml"
    assert "site.yaml" in message
    for problem in caught.value.problems:
        assert problem in message


@pytest.mark.parametrize(
    "broker",
    [
        {"password": PASSWORD, "port": 0},
        {"password": PASSWORD, "port": 0, "bogus": True},
        {"password": [PASSWORD], "port": 1883},
        {"password": {"value": PASSWORD}, "host": None},
        {"password": PASSWORD, "tls": {"cert_file": "client.crt"}},
    ],
)
def test_config_error_never_shows_the_password(broker: dict[str, Any]) -> None:
    """Test that the password never appears in the error text."""
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"broker": broker, "limits": {"queue_size": 0}})

    assert PASSWORD not in str(caught.value)
    assert all(PASSWORD not in problem for problem in caught.value.problems)


def test_config_error_never_shows_the_env_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that a password from the environment is not echoed by errors either."""
    monkeypatch.setenv(ENV_PASSWORD, ENV_SECRET)

    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"broker": {"port": 0}, "output": {"prefix": "#"}})

    assert ENV_SECRET not in str(caught.value)


def test_settings_password_is_hidden_in_repr() -> None:
    """Test that printing the settings does not reveal the password."""
    settings = settings_from_mapping({"broker": {"password": PASSWORD}})

    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.model_dump())
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == PASSWORD


def test_settings_from_mapping_env_sets_username_and_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that the env overrides set the broker username and password."""
    monkeypatch.setenv(ENV_USERNAME, "sidecar")
    monkeypatch.setenv(ENV_PASSWORD, ENV_SECRET)

    settings = settings_from_mapping(
        {"broker": {"username": "file-user", "password": "file-pass", "port": 8883}}
    )

    assert settings.broker.username == "sidecar"
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == ENV_SECRET
    assert settings.broker.port == 8883


def test_settings_from_mapping_env_password_alone_keeps_file_username(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that only the secret given in the environment is overridden."""
    monkeypatch.setenv(ENV_PASSWORD, ENV_SECRET)

    settings = settings_from_mapping({"broker": {"username": "file-user"}})

    assert settings.broker.username == "file-user"
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == ENV_SECRET


def test_settings_from_mapping_env_only_overrides_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that the environment cannot change anything but the secrets."""
    monkeypatch.setenv("ANOMALY_SIDECAR_HOST", "evil.example")
    monkeypatch.setenv("ANOMALY_SIDECAR_PORT", "1")

    assert settings_from_mapping({}) == Settings()


@pytest.mark.parametrize("broker", ["oops", 5, ["ab"]])
def test_settings_from_mapping_env_secret_with_bad_broker_section(
    monkeypatch: pytest.MonkeyPatch, broker: Any
) -> None:
    """Test that a non-mapping broker section is a ConfigError with env secrets set."""
    monkeypatch.setenv(ENV_PASSWORD, ENV_SECRET)

    problem = _problem_for(_problems({"broker": broker}), "broker")

    assert "valid dictionary" in problem


@pytest.mark.parametrize("broker", ["oops", 5, ["ab"]])
def test_settings_from_mapping_bad_broker_section_is_config_error(broker: Any) -> None:
    """Test that a non-mapping broker section is reported as a problem."""
    problem = _problem_for(_problems({"broker": broker}), "broker")

    assert "valid dictionary" in problem


def test_config_error_never_shows_a_broker_section_written_as_a_url() -> None:
    """Test that `broker: user:password@host` is refused without echoing it."""
    problem = _problem_for(_problems({"broker": "user:hunter2f@host"}), "broker")

    assert "valid dictionary" in problem
    assert "hunter2f" not in problem


def test_load_settings_missing_file_names_the_file(tmp_path: Path) -> None:
    """Test that a missing file is a ConfigError naming the file."""
    path = tmp_path / "absent.yaml"

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.source == str(path)
    assert str(path) in str(caught.value)
    assert "cannot read" in str(caught.value)


def test_load_settings_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    """Test that a file that is not YAML is a ConfigError naming the file."""
    path = _write(tmp_path, "broker: {port: 1883\nlimits: [\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)
    assert "not valid YAML" in str(caught.value)


def test_load_settings_yaml_list_at_top_level_names_the_file(tmp_path: Path) -> None:
    """Test that a top-level YAML list is a ConfigError naming the file."""
    path = _write(tmp_path, "- broker\n- output\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)
    assert caught.value.problems == [
        "(top level): must be a mapping of sections (got list)"
    ]


def test_load_settings_not_utf8_names_the_file(tmp_path: Path) -> None:
    """Test that a file that is not UTF-8 text is a ConfigError naming the file."""
    path = tmp_path / "sidecar.yaml"
    path.write_bytes(b"broker:\n  host: \xff\xfe\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert str(path) in str(caught.value)


def test_load_settings_empty_file_gives_defaults(tmp_path: Path) -> None:
    """Test that an empty file (YAML null) means the defaults."""
    settings = load_settings(_write(tmp_path, "# nothing set\n"))

    assert settings.broker == Settings().broker
    assert settings.topics == Settings().topics


def test_load_settings_invalid_content_names_the_file(tmp_path: Path) -> None:
    """Test that validation problems in a file are reported under its name."""
    path = _write(tmp_path, "broker:\n  port: 0\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert caught.value.source == str(path)
    assert caught.value.problems == [
        "broker.port: Input should be greater than or equal to 1 (got 0)"
    ]


def test_load_settings_relative_paths_resolve_against_config_folder(
    tmp_path: Path,
) -> None:
    """Test that relative model and TLS paths resolve against the file's folder."""
    folder = tmp_path / "etc" / "sidecar"
    (folder / "certs").mkdir(parents=True)
    for name in ("ca.crt", "client.crt", "client.key"):
        (folder / "certs" / name).touch()
    path = _write(
        folder,
        "models:\n"
        "  directory: models\n"
        "broker:\n"
        "  tls:\n"
        "    ca_file: certs/ca.crt\n"
        "    cert_file: certs/client.crt\n"
        "    key_file: certs/client.key\n",
    )

    settings = load_settings(path)

    assert settings.models.directory == folder / "models"
    assert settings.broker.tls is not None
    assert settings.broker.tls.ca_file == folder / "certs" / "ca.crt"
    assert settings.broker.tls.cert_file == folder / "certs" / "client.crt"
    assert settings.broker.tls.key_file == folder / "certs" / "client.key"


def test_load_settings_absolute_paths_are_kept(tmp_path: Path) -> None:
    """Test that absolute model and TLS paths are used as written."""
    models = tmp_path / "shared" / "models"
    ca_file = tmp_path / "pki" / "ca.crt"
    ca_file.parent.mkdir()
    ca_file.touch()
    path = _write(
        tmp_path,
        f"models:\n  directory: {models}\nbroker:\n  tls:\n    ca_file: {ca_file}\n",
    )

    settings = load_settings(path)

    assert settings.models.directory == models
    assert settings.broker.tls is not None
    assert settings.broker.tls.ca_file == ca_file


@pytest.mark.parametrize(
    "prefix", ["anomalies/+", "anomalies/#", "#", "+/x", "$SYS/anomalies", "a\x00b"]
)
def test_settings_from_mapping_output_prefix_with_wildcard_is_rejected(
    prefix: str,
) -> None:
    """Test that the output prefix must be a plain topic."""
    problem = _problem_for(_problems({"output": {"prefix": prefix}}), "output.prefix")

    assert "without wildcards" in problem


@pytest.mark.parametrize(
    "prefix", [*DEVICE_TOPIC_ROOTS, "tele/anomalies", "zigbee2mqtt/anomalies/"]
)
def test_settings_from_mapping_output_prefix_in_a_device_tree_is_rejected(
    prefix: str,
) -> None:
    """Test that the prefix may not claim a tree that device traffic uses.

    Everything under the prefix is taken for the sidecar's own output, so
    `output.prefix: tele` would leave every Tasmota device unscored.
    """
    problem = _problem_for(_problems({"output": {"prefix": prefix}}), "output.prefix")

    assert "topic tree that devices publish to" in problem
    assert "never be scored" in problem
    assert f"(got {prefix!r})" in problem


@pytest.mark.parametrize("prefix", ["anomalies", "site/tele", "telemetry_anomalies"])
def test_settings_from_mapping_output_prefix_beside_device_trees_is_kept(
    prefix: str,
) -> None:
    """Test that only the first level is compared, and as a whole level."""
    settings = settings_from_mapping({"output": {"prefix": prefix}})

    assert settings.output.prefix == prefix


def test_settings_from_mapping_output_prefix_trailing_slash_is_dropped() -> None:
    """Test that a trailing `/` on the output prefix is removed."""
    settings = settings_from_mapping({"output": {"prefix": "site/anomalies/"}})

    assert settings.output.prefix == "site/anomalies"


@pytest.mark.parametrize(
    ("rule", "path", "template"),
    [
        (
            {"pattern": "site/(?P<dev>[^/]+)", "device": "{device}"},
            "topics.0.device",
            "{device}",
        ),
        (
            {"pattern": "site/(?P<device>[^/]+)", "channel": "{channel}"},
            "topics.0.channel",
            "{channel}",
        ),
        (
            {"pattern": "site/[^/]+", "kind": "availability"},
            "topics.0.device",
            "{device}",
        ),
    ],
)
def test_settings_from_mapping_rule_template_needs_named_group(
    rule: dict[str, str], path: str, template: str
) -> None:
    """Test that a rule template naming a group the pattern lacks is rejected."""
    problem = _problem_for(_problems({"topics": [rule]}), path)

    assert f"uses {template}" in problem
    assert "no such named group" in problem


@pytest.mark.parametrize("field", TEMPLATE_FIELDS)
@pytest.mark.parametrize(
    ("template", "allowed"),
    [
        ("{}", "not a named field"),
        ("x{0}", "not a named field"),
        ("{device.upper}", "not a named field"),
        ("{device[0]}", "not a named field"),
        ("{device!r}", "without a conversion or format spec"),
        ("{device:>40}", "without a conversion or format spec"),
        ("{device", "not a valid template"),
        ("a}b", "not a valid template"),
        ("{room}", "no such named group"),
    ],
)
def test_settings_from_mapping_rule_template_fields_are_plain_named_groups(
    field: str, template: str, allowed: str
) -> None:
    """Test that a template that would fail on every message is refused up front.

    `str.format` raises IndexError for `{}` and KeyError for an unknown name
    at runtime, once per message; each template field is checked at load.
    """
    rule = {"pattern": "site/(?P<device>[^/]+)/(?P<channel>.+)", field: template}

    problem = _problem_for(_problems({"topics": [rule]}), f"topics.0.{field}")

    assert allowed in problem
    assert f"(got {template!r})" in problem


def test_settings_from_mapping_rule_template_may_use_braces_and_groups() -> None:
    """Test that doubled braces and several named groups make a valid template."""
    rule = {
        "pattern": "site/(?P<room>[^/]+)/(?P<device>[^/]+)/(?P<channel>.+)",
        "device": "{room}.{device}{{x}}",
        "channel": "{channel}",
    }

    settings = settings_from_mapping({"topics": [rule]})

    assert settings.topics[0].device == "{room}.{device}{{x}}"


def test_settings_from_mapping_ignore_rule_needs_no_groups() -> None:
    """Test that an ignore rule is valid without any named group."""
    settings = settings_from_mapping(
        {"topics": [{"pattern": "site/[^/]+/debug", "kind": "ignore"}]}
    )

    assert settings.topics[0].kind == "ignore"


def test_settings_from_mapping_custom_rule_replaces_defaults() -> None:
    """Test that configured topic rules replace the built-in list."""
    rule = {
        "pattern": "site/(?P<room>[^/]+)/(?P<device>[^/]+)/telemetry",
        "device": "{room}.{device}",
    }

    settings = settings_from_mapping({"topics": [rule]})

    assert len(settings.topics) == 1
    assert settings.topics[0].device == "{room}.{device}"


def test_settings_are_frozen() -> None:
    """Test that validated settings cannot be changed afterwards."""
    settings = Settings()

    with pytest.raises(ValueError, match="frozen"):
        settings.broker.port = 1


def test_load_settings_reports_missing_tls_files(tmp_path: Path) -> None:
    """Test that TLS files that do not exist are a config error, not a traceback."""
    config = tmp_path / "sidecar.yaml"
    config.write_text("broker:\n  tls:\n    ca_file: nope.crt\n", encoding="utf-8")

    with pytest.raises(ConfigError, match=r"broker\.tls\.ca_file: file not found"):
        load_settings(config)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        pytest.param(
            "broker: &a {password: hunter2y, port: [*a]}\n",
            "broker.port.0: a YAML alias",
            id="alias_inside_itself",
        ),
        pytest.param(
            "brokr: &a {password: hunter2y, x: [*a]}\n",
            "brokr.x.0: a YAML alias",
            id="unknown_section_alias",
        ),
        pytest.param("a: " + "[" * 40 + "]" * 40 + "\n", "nested deeper", id="deep"),
        pytest.param("a: " + "[" * 10_000 + "]" * 10_000 + "\n", "", id="very_deep"),
    ],
)
def test_load_settings_endless_or_deep_document_is_a_config_error(
    tmp_path: Path, text: str, where: str
) -> None:
    """Test that recursive aliases and deep nesting are reported, not crashed on."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    message = str(caught.value)
    assert where in message
    assert "hunter2y" not in message
    assert len(message) < 500


def test_load_settings_alias_bomb_is_a_config_error(tmp_path: Path) -> None:
    """Test that aliases of aliases ("billion laughs") are refused, not walked.

    Nine levels of ten aliases make 10**9 values from eleven short lines;
    walking every path through them would take hours.
    """
    lines = ["l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for level in range(1, 9):
        aliases = ", ".join([f"*l{level - 1}"] * 10)
        lines.append(f"l{level}: &l{level} [{aliases}]")
    lines.append("topics: *l8")
    path = _write(tmp_path, "\n".join(lines) + "\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(path)

    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert problem.startswith("(top level): too many values once YAML aliases")
    assert "(got more than 100,000)" in problem


def test_run_with_a_copied_config_that_misses_the_models_names_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config copied away from configs/ keeps `../models`, now pointing nowhere."""
    (tmp_path / "etc").mkdir()
    config = tmp_path / "etc" / "my.yaml"
    config.write_text("models:\n  directory: ../models\n", encoding="utf-8")

    code = main(["run", "--config", str(config)])

    error = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert "models.directory: holds no rf.onnx or cnn.onnx" in error
    assert f"(got '{tmp_path / 'models'}')" in error
    assert "relative path being read from the config file's folder" in error
    assert "Traceback" not in error


def test_run_with_a_window_the_models_were_not_trained_on_names_window_length(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "short.yaml"
    config.write_text(
        f"models:\n  directory: {DEFAULT_MODELS_DIR}\nwindow:\n  length: 16\n",
        encoding="utf-8",
    )

    code = main(["run", "--config", str(config)])

    error = capsys.readouterr().err
    assert code == EXIT_CONFIG
    assert "window.length: the models in" in error
    assert "(got 16); allowed: 32" in error


def test_settings_from_mapping_reports_every_bad_subscribe_filter() -> None:
    problems = _problems(
        {"subscribe": {"include": ["a/#/b", "x+", "ok/#"], "exclude": ["+bad"]}}
    )

    assert "'a/#/b'" in _problem_for(problems, "subscribe.include.0")
    assert "'x+'" in _problem_for(problems, "subscribe.include.1")
    assert "'+bad'" in _problem_for(problems, "subscribe.exclude.0")
    assert len(problems) == 3


def test_settings_from_mapping_broker_host_with_a_port_names_broker_port() -> None:
    problems = _problems({"broker": {"host": "127.0.0.1:18977"}})

    assert "put the port in broker.port" in _problem_for(problems, "broker.host")
    assert settings_from_mapping({"broker": {"host": "::1"}}).broker.host == "::1"


def test_settings_from_mapping_broker_dropped_topic_must_be_one_topic() -> None:
    problems = _problems({"health": {"broker_dropped_topic": "$SYS/#"}})

    assert "without + or # wildcards" in _problem_for(
        problems, "health.broker_dropped_topic"
    )
