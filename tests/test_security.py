"""The sidecar against a locked-down Mosquitto: TLS, certificates, passwords, ACL."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pwd
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from conftest import (
    LOOPBACK_HOST,
    MOSQUITTO_MISSING_REASON,
    _find_mosquitto,
    _terminate,
    _wait_until_listening,
    free_port,
)
from mqtt_helpers import BrokerAddress, MessageCollector, ReceivedMessage, publish

from sidecar.__main__ import EXIT_CONFIG, main
from sidecar.config import (
    ENV_PASSWORD,
    ENV_USERNAME,
    Settings,
    load_settings,
    settings_from_mapping,
)
from sidecar.detector import LoadedModels, load_cascade
from sidecar.mqtt import MqttAdapter
from sidecar.service import Service

# The account the sidecar logs in with, as configs/mosquitto-acl.example names it.
SIDECAR_USER = "anomaly-sidecar"
# Distinctive, so finding it anywhere in logs or errors cannot be a coincidence.
SIDECAR_PASSWORD = "Pw-7f3a9c1e-must-never-be-logged"
WRONG_PASSWORD = "Pw-0b52d8aa-wrong-and-also-secret"
# The shipped ACL, tested as users will copy it.
ACL_EXAMPLE = Path(__file__).resolve().parent.parent / "configs/mosquitto-acl.example"
# trustme issues one certificate per identity; the client's needs no hostname.
CLIENT_IDENTITY = "anomaly-sidecar.test"

# Mosquitto 2.0 password file line (mosquitto_passwd(1), src/password_mosq.c):
# `user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>`, with
# mosquitto_passwd's own defaults of 101 iterations and a 12-byte salt.
# Writing it here needs no second binary and puts no password on a command line.
PASSWD_ITERATIONS = 101
PASSWD_SALT_BYTES = 12

# mosquitto.conf(5), Mosquitto 2.0. per_listener_settings gives each listener
# its own authentication and ACL: an open tap for the test's own publisher and
# collector (tests/mqtt_helpers.py speaks neither TLS nor passwords) and the
# locked-down listener the sidecar must get through. `user` stops a broker
# started as root from dropping to the `mosquitto` account, which cannot read
# pytest's private tmp_path; for anyone else it changes nothing.
LOCKED_CONF_TEMPLATE = """\
per_listener_settings true
user {user}
persistence false
log_dest stderr
log_type error
log_type warning
listener {tap_port} {host}
allow_anonymous true
listener {port} {host}
{locked}
"""
# Clients without credentials may connect (authenticated by certificate, or not).
ANONYMOUS = "allow_anonymous true"

# Forces a verdict as in tests/test_service.py: every threshold at 0 confirms
# any window above the device's own median, and one such window raises.
ALWAYS_ALARM = {
    "rf_threshold": 0.0,
    "cnn_threshold": 0.0,
    "fused_threshold": 0.0,
    "alarm_after": 1,
    "clear_after": 10_000,
}
# The shipped models' feature warm-up (128 messages) and score calibration
# (64 windows), plus some scored windows.
MESSAGES_TO_SCORE = 230
# A loopback TLS handshake and CONNACK take milliseconds; this bounds a failure.
CONNECT_TIMEOUT_S = 10.0
# Verdicts cross sidecar and broker in milliseconds; this bounds a failure.
VERDICT_TIMEOUT_S = 20.0
# How long a refused sidecar is watched. An admitted one connects within
# milliseconds on its first attempt; 2 s also covers the first retry, 1 s
# later (sidecar.mqtt.RECONNECT_MIN_S).
REFUSAL_WINDOW_S = 2.0
# How often the log is polled while waiting for a record.
LOG_POLL_INTERVAL_S = 0.02
# paho-mqtt 2.2.0 leaves the socket of a failed TLS handshake open
# (Client._ssl_wrap_socket does not close it when do_handshake raises), and
# Python warns when it collects it. Only tests whose handshake the client
# aborts see it: a wrong CA, or a missing client certificate under TLS 1.2.
PAHO_SSL_SOCKET_LEAK = "ignore:unclosed <ssl.SSLSocket:ResourceWarning"


@dataclass(frozen=True)
class Pki:
    """Files of a throwaway CA, a server certificate and a client certificate.

    Attributes:
        ca: The CA certificate that signed the server and client certificates.
        other_ca: A CA certificate that signed nothing used here.
        server_cert: The broker's certificate, valid for 127.0.0.1 and localhost.
        server_key: The broker's private key.
        client_cert: The sidecar's client certificate.
        client_key: The sidecar's private key.
    """

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class LockedBroker:
    """A Mosquitto with a locked-down listener for the sidecar and an open tap.

    Attributes:
        host: The address of both listeners.
        port: The locked-down listener the sidecar connects to.
        tap: The open listener the test publishes and collects on.
    """

    host: str
    port: int
    tap: BrokerAddress


StartBroker = Callable[..., LockedBroker]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a second unrelated CA, and certificates for broker and sidecar."""
    folder = tmp_path_factory.mktemp("pki")
    files = Pki(
        ca=folder / "ca.pem",
        other_ca=folder / "other-ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    ca = trustme.CA()
    server = ca.issue_cert(LOOPBACK_HOST, "localhost")
    client = ca.issue_cert(CLIENT_IDENTITY)
    ca.cert_pem.write_to_path(files.ca)
    trustme.CA().cert_pem.write_to_path(files.other_ca)
    server.cert_chain_pems[0].write_to_path(files.server_cert)
    server.private_key_pem.write_to_path(files.server_key)
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    client.private_key_pem.write_to_path(files.client_key)
    return files


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    """The shipped models with the always-alarm detection settings, loaded once."""
    settings = settings_from_mapping({"detection": ALWAYS_ALARM})
    return load_cascade(settings.models, settings.detection, settings.window.length)


@pytest.fixture
def start_broker(tmp_path: Path) -> Iterator[StartBroker]:
    """Start Mosquitto with the given locked-down listener settings; stop it after.

    The returned function takes the settings as sections of mosquitto.conf
    lines. The test is skipped when Mosquitto is not installed.
    """
    binary = _find_mosquitto()
    if binary is None:
        pytest.skip(MOSQUITTO_MISSING_REASON)
    processes: list[subprocess.Popen[bytes]] = []

    def start(*locked: str) -> LockedBroker:
        tap_port = free_port()
        port = free_port()
        while port == tap_port:
            port = free_port()
        conf = tmp_path / "mosquitto.conf"
        conf.write_text(
            LOCKED_CONF_TEMPLATE.format(
                user=pwd.getpwuid(os.getuid()).pw_name,
                host=LOOPBACK_HOST,
                tap_port=tap_port,
                port=port,
                locked="\n".join(locked),
            )
        )
        log = tmp_path / "mosquitto.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        # Listeners open in file order, so the second one up means both are.
        _wait_until_listening(process, port, log)
        tap = BrokerAddress(host=LOOPBACK_HOST, port=tap_port, kind="mosquitto")
        return LockedBroker(host=LOOPBACK_HOST, port=port, tap=tap)

    try:
        yield start
    finally:
        for process in processes:
            _terminate(process)


def _tls_settings(pki: Pki, *, require_certificate: bool = False) -> str:
    """Listener lines for TLS, optionally requiring a client certificate."""
    lines = [f"certfile {pki.server_cert}", f"keyfile {pki.server_key}"]
    if require_certificate:
        lines += [f"cafile {pki.ca}", "require_certificate true"]
    return "\n".join(lines)


def _password_settings(folder: Path, *, acl: bool = False) -> str:
    """Listener lines for the sidecar's password (written to `folder`) and the ACL."""
    password_file = folder / "passwd"
    _write_password_file(password_file, SIDECAR_USER, SIDECAR_PASSWORD)
    lines = ["allow_anonymous false", f"password_file {password_file}"]
    if acl:
        lines.append(f"acl_file {ACL_EXAMPLE}")
    return "\n".join(lines)


def _write_password_file(path: Path, user: str, password: str) -> None:
    salt = os.urandom(PASSWD_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PASSWD_ITERATIONS)
    encoded_salt = base64.b64encode(salt).decode()
    encoded_digest = base64.b64encode(digest).decode()
    path.write_text(f"{user}:$7${PASSWD_ITERATIONS}${encoded_salt}${encoded_digest}\n")


def _sidecar_settings(broker: LockedBroker, **broker_settings: Any) -> Settings:
    """Settings for a sidecar on the locked-down listener; env secrets apply."""
    return settings_from_mapping(
        {
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "client_id": f"sidecar-{uuid.uuid4().hex[:8]}",
                **broker_settings,
            },
            "detection": ALWAYS_ALARM,
        }
    )


@contextmanager
def _running(settings: Settings, models: LoadedModels) -> Iterator[Service]:
    service = Service(settings, models)
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _use_credentials(monkeypatch: pytest.MonkeyPatch, password: str) -> None:
    monkeypatch.setenv(ENV_USERNAME, SIDECAR_USER)
    monkeypatch.setenv(ENV_PASSWORD, password)


def _reading(index: int) -> bytes:
    document = {"temperature": 21.0 + (index % 7) * 0.1, "linkquality": 100 + index % 9}
    return json.dumps(document).encode()


def _verdict_and_status(broker: LockedBroker, device: str) -> list[ReceivedMessage]:
    """Feed a device through the tap until its verdict arrives; return the output."""
    verdict_topic = f"anomalies/{device}"
    with MessageCollector(broker.tap, "anomalies/#") as output:
        for index in range(MESSAGES_TO_SCORE):
            publish(broker.tap, f"zigbee2mqtt/{device}", _reading(index))
        return output.wait_for(
            lambda seen: any(m.topic == verdict_topic for m in seen),
            timeout=VERDICT_TIMEOUT_S,
        )


def _assert_raised_and_online(seen: list[ReceivedMessage], device: str) -> None:
    verdict_topic = f"anomalies/{device}"
    verdict = json.loads(next(m.payload for m in seen if m.topic == verdict_topic))
    assert verdict["device"] == device
    assert verdict["state"] == "raised"
    # Subscribed after the sidecar connected, so the status comes as retained.
    assert ReceivedMessage("anomalies/_status", b"online", True) in seen


def _wait_for_record(
    caplog: pytest.LogCaptureFixture,
    predicate: Callable[[logging.LogRecord], bool],
    timeout: float,
) -> logging.LogRecord | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [record for record in caplog.records if predicate(record)]
        if found:
            return found[0]
        time.sleep(LOG_POLL_INTERVAL_S)
    return None


def _is_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR and record.name == "sidecar.mqtt"


@pytest.mark.broker
def test_tls_verified_server_gets_verdicts(
    start_broker: StartBroker, pki: Pki, models: LoadedModels
) -> None:
    """Test that a sidecar verifying the broker with ca_file connects and publishes."""
    broker = start_broker(_tls_settings(pki), ANONYMOUS)
    settings = _sidecar_settings(broker, tls={"ca_file": str(pki.ca)})

    with _running(settings, models) as service:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        seen = _verdict_and_status(broker, "tls_plug")

    _assert_raised_and_online(seen, "tls_plug")


@pytest.mark.broker
@pytest.mark.filterwarnings(PAHO_SSL_SOCKET_LEAK)
def test_tls_wrong_ca_does_not_connect(
    start_broker: StartBroker,
    pki: Pki,
    models: LoadedModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test that a broker certificate from another CA is refused, without traceback."""
    caplog.set_level(logging.DEBUG)
    broker = start_broker(_tls_settings(pki), ANONYMOUS)
    settings = _sidecar_settings(broker, tls={"ca_file": str(pki.other_ca)})

    with _running(settings, models) as service:
        assert not service.adapter.connected.wait(REFUSAL_WINDOW_S)

    assert not [record for record in caplog.records if record.exc_info]
    assert "Traceback" not in caplog.text


@pytest.mark.broker
@pytest.mark.filterwarnings(PAHO_SSL_SOCKET_LEAK)
def test_tls_wrong_ca_logs_error_naming_host_and_port(
    start_broker: StartBroker,
    pki: Pki,
    models: LoadedModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test that a refused broker certificate is logged as an error naming it."""
    broker = start_broker(_tls_settings(pki), ANONYMOUS)
    settings = _sidecar_settings(broker, tls={"ca_file": str(pki.other_ca)})

    with _running(settings, models):
        error = _wait_for_record(caplog, _is_error, REFUSAL_WINDOW_S)

    assert error is not None
    message = error.getMessage()
    assert f"host={broker.host}" in message
    assert f"port={broker.port}" in message
    assert "certificate verify failed" in message
    assert error.exc_info is None


@pytest.mark.broker
@pytest.mark.filterwarnings(PAHO_SSL_SOCKET_LEAK)
@pytest.mark.parametrize("with_certificate", [True, False])
def test_tls_client_certificate_required_by_broker(
    start_broker: StartBroker,
    pki: Pki,
    models: LoadedModels,
    with_certificate: bool,
) -> None:
    """Test that a broker requiring client certificates admits only those with one."""
    broker = start_broker(_tls_settings(pki, require_certificate=True), ANONYMOUS)
    tls = {"ca_file": str(pki.ca)}
    if with_certificate:
        tls |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
    settings = _sidecar_settings(broker, tls=tls)

    with _running(settings, models) as service:
        if with_certificate:
            assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        else:
            assert not service.adapter.connected.wait(REFUSAL_WINDOW_S)


@pytest.mark.broker
def test_password_from_environment_is_accepted(
    start_broker: StartBroker,
    tmp_path: Path,
    models: LoadedModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that credentials from the environment log in, and the status is online."""
    broker = start_broker(_password_settings(tmp_path))
    _use_credentials(monkeypatch, SIDECAR_PASSWORD)
    settings = _sidecar_settings(broker)

    with _running(settings, models) as service:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        with MessageCollector(broker.tap, "anomalies/_status") as status:
            seen = status.wait_for(bool)

    assert seen[0] == ReceivedMessage("anomalies/_status", b"online", True)


@pytest.mark.broker
def test_password_wrong_is_refused_with_error_without_password(
    start_broker: StartBroker,
    tmp_path: Path,
    models: LoadedModels,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test that a wrong password is refused and logged as an error that hides it."""
    caplog.set_level(logging.DEBUG)
    broker = start_broker(_password_settings(tmp_path))
    _use_credentials(monkeypatch, WRONG_PASSWORD)
    settings = _sidecar_settings(broker)

    with _running(settings, models) as service:
        error = _wait_for_record(caplog, _is_error, CONNECT_TIMEOUT_S)
        assert not service.adapter.connected.is_set()

    assert error is not None
    message = error.getMessage()
    assert f"host={broker.host}" in message
    assert f"port={broker.port}" in message
    assert "Not authorized" in message
    assert WRONG_PASSWORD not in caplog.text
    assert SIDECAR_PASSWORD not in caplog.text


@pytest.mark.broker
def test_acl_example_lets_sidecar_publish_verdicts_and_status(
    start_broker: StartBroker,
    tmp_path: Path,
    models: LoadedModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that under configs/mosquitto-acl.example verdicts and status get out."""
    broker = start_broker(_password_settings(tmp_path, acl=True))
    _use_credentials(monkeypatch, SIDECAR_PASSWORD)
    settings = _sidecar_settings(broker)

    with _running(settings, models) as service:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        seen = _verdict_and_status(broker, "acl_plug")
        own_output = service.counters["own_output"]

    _assert_raised_and_online(seen, "acl_plug")
    # Read access to `#` includes its own output, which it then skips.
    assert own_output >= 1


@pytest.mark.broker
def test_acl_example_drops_sidecar_writes_outside_anomalies(
    start_broker: StartBroker, tmp_path: Path
) -> None:
    """Test that the ACL is in force: the sidecar's user cannot write elsewhere."""
    broker = start_broker(_password_settings(tmp_path, acl=True))
    settings = _sidecar_settings(
        broker, username=SIDECAR_USER, password=SIDECAR_PASSWORD
    )
    probe = MqttAdapter(settings.broker, [], None, lambda _message: None)

    with MessageCollector(broker.tap, "#") as everything:
        probe.start()
        try:
            assert probe.connected.wait(CONNECT_TIMEOUT_S)
            # MQTT 3.1.1 has no way to refuse a publish: Mosquitto acknowledges
            # it and drops it. In order, so once the allowed one arrived, the
            # denied one would have too.
            denied = probe.publish("zigbee2mqtt/lamp/set", b'{"state": "ON"}', qos=1)
            allowed = probe.publish("anomalies/_probe", b"allowed", qos=1)
            assert denied.wait(CONNECT_TIMEOUT_S)
            assert allowed.wait(CONNECT_TIMEOUT_S)
            seen = everything.wait_for(
                lambda seen: any(m.topic == "anomalies/_probe" for m in seen)
            )
        finally:
            probe.stop()

    assert [m.topic for m in seen] == ["anomalies/_probe"]


@pytest.mark.broker
def test_secrets_full_run_never_logs_password(
    start_broker: StartBroker,
    pki: Pki,
    tmp_path: Path,
    models: LoadedModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test that a whole locked-down run logs nothing that contains the password."""
    caplog.set_level(logging.DEBUG)
    broker = start_broker(
        _tls_settings(pki, require_certificate=True),
        _password_settings(tmp_path, acl=True),
    )
    config = tmp_path / "sidecar.yaml"
    config.touch(mode=0o600)
    document = {
        "broker": {
            "host": broker.host,
            "port": broker.port,
            "username": SIDECAR_USER,
            "password": SIDECAR_PASSWORD,
            "tls": {
                "ca_file": str(pki.ca),
                "cert_file": str(pki.client_cert),
                "key_file": str(pki.client_key),
            },
        },
        "detection": ALWAYS_ALARM,
    }
    config.write_text(yaml.safe_dump(document))
    settings = load_settings(config)

    with _running(settings, models) as service:
        assert service.adapter.subscribed.wait(CONNECT_TIMEOUT_S)
        # A junk payload is logged at DEBUG, so that level is known to be seen.
        publish(broker.tap, "zigbee2mqtt/junk_plug", b"{not json")
        seen = _verdict_and_status(broker, "secret_plug")

    _assert_raised_and_online(seen, "secret_plug")
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
    assert "secret_plug" in caplog.text
    assert SIDECAR_PASSWORD not in caplog.text
    assert SIDECAR_PASSWORD not in repr(settings)


# Invalid configurations that hold the password; none may echo it.
CONFIGS_WITH_PASSWORD = [
    pytest.param("broker:\n  password: {password}\n  port: 99999\n", id="bad-port"),
    pytest.param("broker:\n  password: [{password}]\n", id="password-not-a-string"),
    pytest.param(
        "broker:\n  password: {password}\n  tls:\n    cert_file: a.pem\n",
        id="bad-tls",
    ),
    pytest.param(
        'broker:\n  password: "{password}\n',
        id="yaml-error-on-password-line",
    ),
    pytest.param(
        "broker:\n  pasword: {password}\n",
        id="misspelt-password-key",
    ),
    pytest.param(
        "brokr:\n  password: {password}\n",
        id="misspelt-broker-section",
    ),
]


@pytest.mark.parametrize("template", CONFIGS_WITH_PASSWORD)
def test_config_error_never_shows_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str
) -> None:
    """Test that the CLI reports a bad config without echoing the password in it."""
    config = tmp_path / "bad.yaml"
    config.touch(mode=0o600)
    config.write_text(template.format(password=SIDECAR_PASSWORD))

    code = main(["run", "--config", str(config)])

    captured = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert "invalid configuration" in captured.err
    assert SIDECAR_PASSWORD not in captured.out + captured.err


def test_config_error_never_shows_password_from_environment(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Test that a password from the environment stays out of a config error."""
    _use_credentials(monkeypatch, SIDECAR_PASSWORD)
    config = tmp_path / "bad.yaml"
    config.write_text("broker:\n  port: 0\n")

    code = main(["run", "--config", str(config)])

    captured = capsys.readouterr()
    assert code == EXIT_CONFIG
    assert "broker.port" in captured.err
    assert SIDECAR_PASSWORD not in captured.out + captured.err


@pytest.mark.parametrize(
    ("mode", "with_password", "warns"),
    [
        (0o644, True, True),
        (0o640, True, True),
        (0o604, True, True),
        (0o600, True, False),
        (0o400, True, False),
        (0o644, False, False),
    ],
)
def test_load_settings_warns_on_password_readable_by_others(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mode: int,
    with_password: bool,
    warns: bool,
) -> None:
    """Test that a password in a group- or world-readable config file is warned of."""
    config = tmp_path / "sidecar.yaml"
    broker = f"  username: {SIDECAR_USER}\n"
    if with_password:
        broker += f"  password: {SIDECAR_PASSWORD}\n"
    config.write_text(f"broker:\n{broker}")
    config.chmod(mode)

    with caplog.at_level(logging.DEBUG, logger="sidecar.config"):
        load_settings(config)

    warnings = [
        record
        for record in caplog.records
        if record.name == "sidecar.config" and record.levelno == logging.WARNING
    ]
    assert len(warnings) == int(warns)
    if warns:
        message = warnings[0].getMessage()
        assert f"path={config}" in message
        assert f"mode={mode:04o}" in message
        assert SIDECAR_PASSWORD not in message
