"""Specification of payload parsing: bytes in, finite readings or a reason out."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.payload import (
    DEFAULT_IGNORED_KEYS,
    MAX_ARRAY_ITEMS,
    MAX_JSON_DEPTH,
    PayloadKind,
    Readings,
    parse_payload,
)

# Bounded so the property tests run in a few seconds; no example database, so
# the test run leaves no files behind.
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, database=None)
# The project root, so a child interpreter imports this checkout's `sidecar`.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# A 64 KiB scalar parses in milliseconds when the parser is linear; the budget
# also covers starting a child interpreter on a loaded CI runner.
PARSE_BUDGET_S = 3.0
# Frigate snapshot header: JPEG start-of-image plus a JFIF APP0 segment.
JPEG_HEADER = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


class _UndecodableBytes(bytes):
    """Bytes that fail the test if anyone tries to decode them."""

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        """Refuse to decode: an oversized payload must be judged by length."""
        message = f"payload of {len(self)} bytes was decoded"
        raise AssertionError(message)


def _assert_finite(readings: Readings) -> None:
    """Check the invariant every consumer relies on: values are finite floats."""
    for key, value in readings.values.items():
        assert isinstance(value, float), key
        assert math.isfinite(value), key


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"21.37", 21.37),
        (b"-3", -3.0),
        (b"+4", 4.0),
        (b"1e3", 1000.0),
        (b".5", 0.5),
        (b" 42 \n", 42.0),
        (b"0", 0.0),
    ],
)
def test_parse_payload_plain_number(payload: bytes, expected: float) -> None:
    """Test that a plain number becomes one reading under the given key."""
    readings = parse_payload(payload, key="temp")

    assert readings.kind is PayloadKind.NUMBER
    assert readings.values == {"temp": expected}
    assert readings.missing == frozenset()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"273600 seconds", 273600.0),
        ("21.5 °C".encode(), 21.5),
        (b"48W", 48.0),
        (b"87 %", 87.0),
    ],
)
def test_parse_payload_number_with_unit(payload: bytes, expected: float) -> None:
    """Test that a unit glued to a number is dropped and the number kept."""
    readings = parse_payload(payload, key="uptime")

    assert readings.kind is PayloadKind.NUMBER
    assert readings.values == {"uptime": expected}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(b'"21.5"', 21.5), (b"'7'", 7.0), (b'"-0.25"', -0.25)],
)
def test_parse_payload_quoted_number(payload: bytes, expected: float) -> None:
    """Test that a quoted number (statestream attributes) is read as a number."""
    readings = parse_payload(payload, key="value")

    assert readings.kind is PayloadKind.NUMBER
    assert readings.values == {"value": expected}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"ON", 1.0),
        (b"OFF", 0.0),
        (b"on", 1.0),
        (b"off", 0.0),
        (b"open", 1.0),
        (b"closed", 0.0),
        (b"true", 1.0),
        (b"false", 0.0),
        (b"TRUE", 1.0),
        (b"Online", 1.0),
        (b"Offline", 0.0),
    ],
)
def test_parse_payload_state_word(payload: bytes, expected: float) -> None:
    """Test that binary state words become 1.0 or 0.0."""
    readings = parse_payload(payload, key="state")

    assert readings.kind is PayloadKind.WORD
    assert readings.values == {"state": expected}


@pytest.mark.parametrize(
    "payload",
    [
        b"nan",
        b"NaN",
        b"-nan",
        b"None",
        b"null",
        b"unavailable",
        b"unknown",
        b'""',
        b"  ",
        b"1e999",
    ],
)
def test_parse_payload_missing_marker_is_missing_not_zero(payload: bytes) -> None:
    """Test that failed-reading markers are reported missing, never as 0."""
    readings = parse_payload(payload, key="grid_power")

    assert readings.kind is PayloadKind.MISSING
    assert readings.values == {}
    assert readings.missing == frozenset({"grid_power"})
    assert readings.usable


def test_parse_payload_empty_value_in_json_is_missing() -> None:
    """Test that `{"value":""}` marks `value` missing instead of reading 0."""
    readings = parse_payload(b'{"value":""}')

    assert readings.kind is PayloadKind.JSON
    assert readings.values == {}
    assert readings.missing == frozenset({"value"})


def test_parse_payload_empty_payload_is_empty() -> None:
    """Test that an empty payload (a cleared retained topic) carries nothing."""
    readings = parse_payload(b"")

    assert readings.kind is PayloadKind.EMPTY
    assert not readings.usable


@pytest.mark.parametrize(
    "payload", [b"hello world", b"mosquitto version 2.0.18", b"single"]
)
def test_parse_payload_free_text_has_no_readings(payload: bytes) -> None:
    """Test that free text is recognised as text and yields no reading."""
    readings = parse_payload(payload)

    assert readings.kind is PayloadKind.TEXT
    assert not readings.usable


def test_parse_payload_tasmota_sensor_flattens_to_dotted_keys() -> None:
    """Test that Tasmota's nested SENSOR JSON flattens to dotted keys."""
    payload = json.dumps(
        {
            "Time": "2024-05-03T07:15:00",
            "DS18B20": {"Id": "01144A1B2C3D", "Temperature": 19.6},
            "ENERGY": {"Total": 312.448, "Power": 48, "Factor": 0.62},
            "TempUnit": "C",
        }
    ).encode()

    readings = parse_payload(payload)

    assert readings.kind is PayloadKind.JSON
    assert readings.values == {
        "DS18B20.Temperature": 19.6,
        "ENERGY.Total": 312.448,
        "ENERGY.Power": 48.0,
        "ENERGY.Factor": 0.62,
    }


def test_parse_payload_shelly_component_keys_keep_their_colon() -> None:
    """Test that Shelly Gen2 `switch:0` components flatten under their key."""
    payload = json.dumps(
        {
            "src": "shellyplus1pm-a0b1c2d3e4f5",
            "method": "NotifyStatus",
            "params": {"ts": 1714720000.42, "switch:0": {"id": 0, "apower": 12.4}},
        }
    ).encode()

    readings = parse_payload(payload)

    assert readings.values == {
        "params.switch:0.id": 0.0,
        "params.switch:0.apower": 12.4,
    }


def test_parse_payload_zigbee2mqtt_nested_color_flattens() -> None:
    """Test that z2m `color` {x, y} and `update.state` flatten as expected."""
    payload = json.dumps(
        {
            "state": "ON",
            "brightness": 200,
            "color": {"x": 0.3131, "y": 0.3232},
            "linkquality": 132,
            "update": {"state": "idle"},
            "update_available": None,
        }
    ).encode()

    readings = parse_payload(payload)

    assert readings.values == {
        "state": 1.0,
        "brightness": 200.0,
        "color.x": 0.3131,
        "color.y": 0.3232,
        "linkquality": 132.0,
    }
    assert readings.missing == frozenset({"update_available"})


@pytest.mark.parametrize(
    "payload",
    [
        b'{"AM2301":{"Temperature":NaN}}',
        b'{"AM2301":{"Temperature":Infinity}}',
        b'{"AM2301":{"Temperature":-Infinity}}',
        b'{"AM2301":{"Temperature":"nan"}}',
        b'{"AM2301":{"Temperature":null}}',
        b'{"AM2301":{"Temperature":1e999}}',
        b'{"AM2301":{"Temperature":nan}}',
        b'{"AM2301":{"Temperature": -nan }}',
        b'{"AM2301":{"Temperature":inf}}',
        b'{"AM2301":{"Temperature":None}}',
    ],
)
def test_parse_payload_non_finite_json_number_is_missing(payload: bytes) -> None:
    """Test that NaN, Infinity and overflowing numbers in JSON become missing."""
    readings = parse_payload(payload)

    assert readings.kind is PayloadKind.JSON
    assert readings.values == {}
    assert readings.missing == frozenset({"AM2301.Temperature"})


def test_parse_payload_time_like_keys_never_become_readings() -> None:
    """Test that device clocks (Time, ts, last_seen...) are never readings."""
    payload = json.dumps(
        {
            "Time": "1970-01-01T00:00:03",
            "ts": 1714720000.42,
            "tst": 1714720000,
            "last_seen": 1714720364000,
            "UptimeSec": 11560,
            "params": {"ts": 1714720000.42},
            "aenergy": {"total": 1834.22, "minute_ts": 1714719960},
            "temperature": 21.74,
        }
    ).encode()

    readings = parse_payload(payload)

    assert readings.values == {"aenergy.total": 1834.22, "temperature": 21.74}
    leaf_names = {key.rsplit(".", 1)[-1].lower() for key in readings.values}
    assert leaf_names.isdisjoint(DEFAULT_IGNORED_KEYS)


def test_parse_payload_oversized_is_not_decoded() -> None:
    """Test that a payload over the cap is OVERSIZED without being decoded."""
    payload = _UndecodableBytes(b"7" * 1025)

    readings = parse_payload(payload, max_bytes=1024)

    assert readings.kind is PayloadKind.OVERSIZED
    assert not readings.usable


def test_parse_payload_at_the_size_cap_is_parsed() -> None:
    """Test that a payload of exactly `max_bytes` is still parsed."""
    readings = parse_payload(b"1234", max_bytes=4)

    assert readings.kind is PayloadKind.NUMBER
    assert readings.values == {"value": 1234.0}


@pytest.mark.parametrize(
    "payload",
    [
        JPEG_HEADER + bytes(range(256)),
        PNG_HEADER,
        b"\xc3\x28",
        b"21.5\xff",
        b"21.5\x00",
        b'{"a":1}\x00',
    ],
)
def test_parse_payload_binary_is_binary(payload: bytes) -> None:
    """Test that images, invalid UTF-8 and NUL bytes are BINARY, not read."""
    readings = parse_payload(payload)

    assert readings.kind is PayloadKind.BINARY
    assert not readings.usable


def test_parse_payload_deep_nesting_is_unparsable() -> None:
    """Test that 100,000 nested `[` are UNPARSABLE rather than a RecursionError."""
    readings = parse_payload(b"[" * 100_000, max_bytes=1_000_000)

    assert readings.kind is PayloadKind.UNPARSABLE


def test_parse_payload_nesting_limit_is_exact() -> None:
    """Test that nesting up to MAX_JSON_DEPTH parses and one more level does not."""
    inside = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    beyond = b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)

    assert parse_payload(inside).kind is PayloadKind.JSON
    assert parse_payload(beyond).kind is PayloadKind.UNPARSABLE


def test_parse_payload_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Test that brackets inside JSON strings do not trip the nesting limit."""
    payload = json.dumps({"text": "[" * 1000, "power": 5}).encode()

    readings = parse_payload(payload)

    assert readings.values == {"power": 5.0}


@pytest.mark.parametrize("payload", [b"{", b'{"a": }', b"[1, 2", b"{'a': 1}"])
def test_parse_payload_broken_json_is_unparsable(payload: bytes) -> None:
    """Test that malformed JSON is UNPARSABLE and carries no readings."""
    readings = parse_payload(payload)

    assert readings.kind is PayloadKind.UNPARSABLE
    assert not readings.usable


@pytest.mark.parametrize(
    ("key_count", "max_keys", "kept", "dropped"),
    [(70, 64, 64, 6), (10, 4, 4, 6), (4, 4, 4, 0), (3, 64, 3, 0)],
)
def test_parse_payload_key_limit_counts_dropped_keys(
    key_count: int, max_keys: int, kept: int, dropped: int
) -> None:
    """Test that keys beyond `max_keys` are dropped and counted."""
    payload = json.dumps({f"k{index}": index for index in range(key_count)}).encode()

    readings = parse_payload(payload, max_keys=max_keys)

    assert len(readings.values) == kept
    assert readings.dropped_keys == dropped


def test_parse_payload_small_array_is_kept_by_index() -> None:
    """Test that a short numeric array (Shelly `by_minute`) becomes indexed keys."""
    payload = b'{"aenergy":{"by_minute":[212.1,208.9,215.0]}}'

    readings = parse_payload(payload)

    assert readings.values == {
        "aenergy.by_minute.0": 212.1,
        "aenergy.by_minute.1": 208.9,
        "aenergy.by_minute.2": 215.0,
    }


def test_parse_payload_long_array_is_skipped() -> None:
    """Test that an array longer than MAX_ARRAY_ITEMS is skipped entirely."""
    payload = json.dumps(
        {"waypoints": list(range(MAX_ARRAY_ITEMS + 1)), "batt": 63}
    ).encode()

    readings = parse_payload(payload)

    assert readings.values == {"batt": 63.0}
    assert readings.dropped_keys == 0


def test_parse_payload_array_keeps_only_numeric_items() -> None:
    """Test that strings, nulls and objects inside arrays are not readings."""
    readings = parse_payload(b'{"a":[1,"x",null,{"b":2},true]}')

    assert readings.values == {"a.0": 1.0, "a.4": 1.0}


def test_parse_payload_numeric_string_in_json_is_read() -> None:
    """Test that OwnTracks-style numbers sent as strings are read as numbers."""
    readings = parse_payload(b'{"batt":"63","power":"12 W","action":"single"}')

    assert readings.values == {"batt": 63.0, "power": 12.0}


_LARGE_BLOBS = st.tuples(st.binary(min_size=1, max_size=64), st.integers(1, 4096)).map(
    lambda chunk_and_count: chunk_and_count[0] * chunk_and_count[1]
)
_PAYLOAD_BYTES = st.one_of(
    st.binary(max_size=2048),
    _LARGE_BLOBS,
    st.binary(max_size=256).map(lambda tail: JPEG_HEADER + tail),
    st.binary(max_size=256).map(lambda tail: b"{" + tail),
    st.binary(max_size=256).map(lambda tail: b"[" * 40 + tail),
)


@PROPERTY_SETTINGS
@given(payload=_PAYLOAD_BYTES, max_keys=st.integers(1, 64))
def test_parse_payload_any_bytes_never_raise(payload: bytes, max_keys: int) -> None:
    """Test that arbitrary bytes never raise and only finite values come out."""
    readings = parse_payload(payload, max_keys=max_keys)

    _assert_finite(readings)
    assert len(readings.values) <= max_keys
    assert readings.dropped_keys >= 0


_JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16),
    st.sampled_from(["nan", "None", "unavailable", "", "ON", "273600 seconds"]),
)
_JSON_DOCUMENTS = st.recursive(
    _JSON_LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=12),
        st.dictionaries(st.text(max_size=12), children, max_size=8),
    ),
    max_leaves=60,
)


@PROPERTY_SETTINGS
@given(document=_JSON_DOCUMENTS, ensure_ascii=st.booleans())
def test_parse_payload_any_json_never_raises(document: Any, ensure_ascii: bool) -> None:
    """Test that any JSON document (NaN, big ints, unicode keys) parses safely."""
    text = json.dumps(document, ensure_ascii=ensure_ascii)
    payload = text.encode("utf-8", errors="surrogatepass")

    readings = parse_payload(payload)

    _assert_finite(readings)
    if ensure_ascii:
        assert readings.kind is not PayloadKind.BINARY


_DUPLICATE_PRONE_MEMBERS = st.lists(
    st.tuples(st.sampled_from(["a", "A", "ts", "value", "é", "a.b"]), _JSON_LEAVES),
    max_size=12,
)


@PROPERTY_SETTINGS
@given(members=_DUPLICATE_PRONE_MEMBERS)
def test_parse_payload_duplicate_json_keys_never_raise(
    members: list[tuple[str, Any]],
) -> None:
    """Test that objects with duplicate keys (raw JSON text) parse safely."""
    body = ",".join(f"{json.dumps(key)}:{json.dumps(value)}" for key, value in members)

    readings = parse_payload(("{" + body + "}").encode())

    assert readings.kind is PayloadKind.JSON
    _assert_finite(readings)
    assert set(readings.values).isdisjoint({"ts"})


def test_parse_payload_long_digit_run_with_long_suffix_is_fast() -> None:
    """Test that a 64 KiB digit run with a 13-letter suffix parses within budget."""
    script = (
        "from sidecar.payload import parse_payload\n"
        "parse_payload(b'1' * 65000 + b'x' * 13)\n"
    )

    try:
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=PROJECT_ROOT,
            timeout=PARSE_BUDGET_S,
            check=True,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"parse_payload took longer than {PARSE_BUDGET_S} s")


def test_parse_payload_bare_failed_words_leave_other_keys_readable() -> None:
    """Test that one bare `nan` (invalid JSON) does not lose the other readings."""
    readings = parse_payload(b'{"AM2301":{"Temperature":nan,"Humidity":41.5}}')

    assert readings.values == {"AM2301.Humidity": 41.5}
    assert readings.missing == frozenset({"AM2301.Temperature"})


def test_parse_payload_bare_word_inside_a_string_is_not_rewritten() -> None:
    """Test that the repair of bare words only ever touches value positions."""
    readings = parse_payload(b'{"note":"nan, inf", "t": 3')

    assert readings.kind is PayloadKind.UNPARSABLE
