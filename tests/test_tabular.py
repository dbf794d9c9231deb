"""User tables become labeled per-device streams, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.tabular import TableError, check_routing, load_table, parse_time
from sidecar.__main__ import main
from sidecar.config import ModelSettings, Settings


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_table_groups_devices_sorts_by_time_and_labels(tmp_path: Path) -> None:
    """Test that rows become time-ordered per-device JSON payloads."""
    path = _write(
        tmp_path / "history.csv",
        [
            "time,entity,temperature,humidity,label",
            "2024-01-01T00:00:10Z,kitchen,21.5,40,0",
            "2024-01-01T00:00:00Z,kitchen,21.0,unavailable,0",
            "2024-01-01T00:00:05Z,hall,19.0,50,1",
        ],
    )

    data = load_table(path, device_column="entity", label_column="label", fit_share=0.5)

    kitchen = data.streams["kitchen"]
    assert [m.message.received_at for m in kitchen] == [1704067200.0, 1704067210.0]
    assert json.loads(kitchen[0].message.payload) == {
        "temperature": 21.0,
        "humidity": None,
    }
    assert kitchen[0].message.topic == "table/kitchen"
    assert [m.label for m in data.streams["hall"]] == [1]
    assert data.scored_from == {"kitchen": 1, "hall": 0}
    assert data.fit_streams["kitchen"] == kitchen[:1]
    check_routing(data.streams, Settings())


def test_load_table_reads_json_lines_as_one_device(tmp_path: Path) -> None:
    """Test that JSON lines with epoch milliseconds make one device by file name."""
    path = _write(
        tmp_path / "power.jsonl",
        [json.dumps({"ts": 1_700_000_000_000 + i, "watts": i}) for i in range(3)],
    )

    data = load_table(path)

    assert list(data.streams) == ["power"]
    assert data.streams["power"][0].message.received_at == 1_700_000_000.0
    assert all(m.label == 0 for m in data.streams["power"])


def test_load_table_skips_text_columns_when_guessing(tmp_path: Path) -> None:
    """Test that a column of words is not taken as a reading unless named."""
    path = _write(tmp_path / "t.csv", ["time,state,value", "1,on,2", "2,off,3"])

    data = load_table(path)

    assert json.loads(data.streams["t"][0].message.payload) == {"value": 2.0}
    with pytest.raises(TableError, match=r"t.csv:2: column 'state'"):
        load_table(path, value_columns=["state"])


@pytest.mark.parametrize(
    ("lines", "kwargs", "message"),
    [
        (["when,value", "1,2"], {}, "no time column found"),
        (["time,value", "1,2"], {"device_column": "room"}, "no column named 'room'"),
        (["time,value", "1,2", "yesterday,3"], {}, r"x.csv:3: column 'time'"),
        (["time,value,y", "1,2,0", "2,3,7"], {"label_column": "y"}, r":3: column 'y'"),
        (["time,name", "1,a"], {}, "no numeric value columns"),
    ],
)
def test_load_table_names_the_column_and_line_of_a_problem(
    tmp_path: Path, lines: list[str], kwargs: dict[str, str], message: str
) -> None:
    """Test that missing or unparsable columns are reported where they are."""
    path = _write(tmp_path / "x.csv", lines)
    with pytest.raises(TableError, match=message):
        load_table(path, **kwargs)  # type: ignore[arg-type]


def test_load_table_reports_a_broken_json_line(tmp_path: Path) -> None:
    """Test that a line that is not a JSON object is named."""
    path = _write(tmp_path / "x.jsonl", ['{"time": 1, "v": 2}', "[1, 2]"])
    with pytest.raises(TableError, match=r"x.jsonl:2: not a JSON object"):
        load_table(path)


def test_parse_time_reads_iso_and_epochs() -> None:
    """Test the time formats users export: ISO with or without zone, epochs."""
    assert parse_time("1970-01-01T00:01:00+00:00") == 60.0
    assert parse_time("1970-01-01 00:01:00") == 60.0
    assert parse_time("60") == 60.0
    with pytest.raises(ValueError, match="Invalid isoformat"):
        parse_time("noon")


def test_evaluate_csv_end_to_end_writes_the_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Test `evaluate --dataset csv --models DIR` on a small labeled file."""
    rows = ["time,device,temperature,label"]
    for i in range(400):
        fault = i >= 300
        value = 40.0 + (i % 7) if fault else 20.0 + 0.5 * ((i * 7919) % 13) / 13
        rows.append(f"{1_700_000_000 + 60 * i},fridge,{value:.3f},{int(fault)}")
    path = _write(tmp_path / "fridge.csv", rows)
    out = tmp_path / "eval.json"

    code = main(
        [
            "evaluate",
            "--dataset",
            "csv",
            "--data",
            str(path),
            "--device-column",
            "device",
            "--label-column",
            "label",
            "--fit-share",
            "0.5",
            "--baselines",
            "--models",
            str(ModelSettings().directory),
            "--json",
            str(out),
        ]
    )

    assert code == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["dataset"] == "csv"
    assert report["models_directory"] == str(ModelSettings().directory)
    assert report["scored_windows"] == 200
    for name in ("hybrid", "rf", "cnn", "iforest", "hst", "zscore"):
        assert report[name]["windows"] == 200
        assert report[name]["attack_windows"] == 100
    assert "zscore" in capsys.readouterr().out


def test_evaluate_csv_without_data_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Test that `--dataset csv` without `--data` exits 2 with a message."""
    assert main(["evaluate", "--dataset", "csv"]) == 2
    assert "--data is required" in capsys.readouterr().err
