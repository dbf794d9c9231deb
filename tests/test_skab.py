"""SKAB files become one device each, fitted on 400 rows, scored on the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.skab import FIT_ROWS, load_skab

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "skab"
needs_data = pytest.mark.skipif(
    not DATA.is_dir(),
    reason=f"SKAB data not found at {DATA} (../shared/data is absent)",
)
_HEADER = "datetime;Accelerometer1RMS;Current;Volume Flow RateRMS;anomaly;changepoint"


def _experiment(path: Path, rows: int, fault_from: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [_HEADER]
    for i in range(rows):
        minute, second = divmod(i, 60)
        label = float(i >= fault_from)
        lines.append(
            f"2020-03-09 10:{minute:02d}:{second:02d};0.02{i % 10};1.3;32.0;{label};0.0"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_load_skab_fits_on_the_first_400_rows_of_each_file(tmp_path: Path) -> None:
    """Test that each labeled file is a device whose first 400 rows are the fit part."""
    _experiment(tmp_path / "valve1" / "0.csv", 600, fault_from=500)
    _experiment(tmp_path / "other" / "2.csv", 450, fault_from=100)
    (tmp_path / "anomaly-free").mkdir()
    (tmp_path / "anomaly-free" / "anomaly-free.csv").write_text(
        "datetime;Current\n2020-02-08 10:00:00;1.0\n", encoding="utf-8"
    )

    data = load_skab(tmp_path)

    assert sorted(data.streams) == ["other.2", "valve1.0"]
    assert data.scored_from == {"other.2": FIT_ROWS, "valve1.0": FIT_ROWS}
    valve = data.streams["valve1.0"]
    assert sum(m.label for m in valve[FIT_ROWS:]) == 100
    assert json.loads(valve[0].message.payload) == {
        "Accelerometer1RMS": 0.020,
        "Current": 1.3,
        "Volume Flow RateRMS": 32.0,
    }
    assert data.fit_streams["other.2"] == data.streams["other.2"][:FIT_ROWS]


def test_load_skab_refuses_a_folder_without_experiments(tmp_path: Path) -> None:
    """Test that an empty folder is reported with where the files were sought."""
    with pytest.raises(FileNotFoundError, match="no SKAB files"):
        load_skab(tmp_path)


@pytest.mark.data
@needs_data
def test_load_skab_matches_the_leaderboard_protocol_counts() -> None:
    """Test the SOURCE.md counts: 34 files, 23,801 scored rows, 12,771 anomalous."""
    data = load_skab(DATA)

    scored = [m for d, s in data.streams.items() for m in s[data.scored_from[d] :]]
    assert len(data.streams) == 34
    assert len(scored) == 23_801
    assert sum(m.label for m in scored) == 12_771
