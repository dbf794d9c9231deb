"""MQTTset: attacks spliced, re-timed, into legitimate traffic; no identity leaks."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from converters.mqttset import ATTACKS, FIT_SHARE, load_mqttset
from converters.tabular import check_routing
from sidecar.config import Settings

DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "mqttset_reduced_messages"
)
needs_data = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"MQTTset data not found at {DATA} (../shared/data is absent)",
)
_COLUMNS = [
    "capture",
    "label",
    "frame_time_epoch",
    "src_ip",
    "src_port",
    "direction",
    "mqtt_type",
    "topic",
    "payload_head",
    "client_id",
]


def _capture(folder: Path, label: str, rows: list[tuple[float, str, str, str]]) -> None:
    with (folder / f"mqtt_messages_{label}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(_COLUMNS)
        for time, kind, topic, payload in rows:
            writer.writerow(
                [
                    label,
                    label,
                    time,
                    "192.168.1.90",
                    "1883",
                    "to_broker",
                    kind,
                    topic,
                    payload,
                    "attacker-id",
                ]
            )
            # The broker's forwarded copy must not be counted twice.
            writer.writerow(
                [
                    label,
                    label,
                    time,
                    "10.0.0.1",
                    "1883",
                    "from_broker",
                    kind,
                    topic,
                    payload,
                    "",
                ]
            )


def _folder(tmp_path: Path) -> Path:
    legit = [(1000.0 + i, "PUBLISH", "Smoke", str(i % 3)) for i in range(100)]
    _capture(tmp_path, "legitimate", legit)
    _capture(
        tmp_path,
        "flood",
        [(5e8 + i / 100, "PUBLISH", "Smoke", "-42") for i in range(5)],
    )
    _capture(
        tmp_path,
        "malformed",
        [(7e8 + i, "PUBLISH", "Topic1", "test") for i in range(3)],
    )
    _capture(tmp_path, "malariados", [(6e8, "PUBLISH", "mqtt-malaria/c/data/1/1", "x")])
    for label in ("bruteforce", "slowite"):
        _capture(tmp_path, label, [(8e8, "CONNECT", "", "")])
    return tmp_path


def test_load_mqttset_splices_attacks_re_timed_after_the_fit_part(
    tmp_path: Path,
) -> None:
    """Test that attacks keep their own gaps, land in the test part, on legit time."""
    data = load_mqttset(_folder(tmp_path))

    smoke = data.streams["Smoke"]
    times = [m.message.received_at for m in smoke]
    assert times == sorted(times)
    assert times[0] == 0.0
    flood = [m for m in smoke if m.label == 1]
    assert [m.attack_type for m in flood] == ["flood"] * 5
    fit_end = FIT_SHARE * 99.0
    assert all(fit_end < m.message.received_at < 99.0 for m in flood)
    times_of_flood = [m.message.received_at for m in flood]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times_of_flood)]
    assert gaps == pytest.approx([0.01] * 4, abs=1e-6)
    assert data.scored_from["Smoke"] == sum(1 for t in times if t < fit_end)
    assert [m.label for m in data.fit_streams["Smoke"]] == [0] * 40
    assert [m.attack_type for m in data.streams["Topic1"]] == ["malformed"] * 3
    assert data.notes["unobservable"] == ["bruteforce", "slowite"]
    assert data.notes["not_routed_to_a_device"] == {"malariados": 1}
    check_routing(data.streams, data.settings_for(Settings()))


def test_load_mqttset_payloads_carry_no_address_port_or_client(tmp_path: Path) -> None:
    """Test that only topic and payload reach a message, never capture identity."""
    data = load_mqttset(_folder(tmp_path))

    for stream in data.streams.values():
        for item in stream:
            text = item.message.payload.decode() + item.message.topic
            assert "192.168" not in text
            assert "attacker-id" not in text
            assert item.message.received_at < 1e6


@pytest.mark.data
@needs_data
def test_load_mqttset_on_the_captures_splices_the_observable_attacks() -> None:
    """Test the real captures: three attacks spliced, two unobservable, 10+ devices."""
    data = load_mqttset(DATA)

    assert sorted(data.notes["spliced"]) == ["flood", "malariados", "malformed"]
    assert data.notes["unobservable"] == ["bruteforce", "slowite"]
    assert set(ATTACKS) >= set(data.notes["spliced"])
    assert {"Movement", "Smoke", "Temperature", "Topic1"} <= set(data.streams)
    legit = sum(1 for s in data.streams.values() for m in s if m.label == 0)
    assert legit == 13_985
    first_attack = min(
        m.message.received_at for s in data.streams.values() for m in s if m.label
    )
    assert first_attack > FIT_SHARE * 2760
    assert json.loads(data.streams["Temperature"][0].message.payload) == -42
