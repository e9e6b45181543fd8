"""The speed duel (VIRTIO 1.2 §2.7.10, §2.8.10): real driver and device processes over a split
or a packed ring, CSV and PNG outputs."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyvirtio.demo.duel import MODES, DuelPoint, run_point, write_outputs

PYVIRTIO = [sys.executable, "-m", "pyvirtio.cli.main"]


@pytest.mark.timeout(120)
def test_duel_cli_writes_csv_and_png(tmp_path: Path) -> None:
    out = subprocess.run(
        [*PYVIRTIO, "duel", "--out", str(tmp_path), "--ratios", "0.5,2", "--buffers", "400",
         "--device-work-us", "10", "--rings", "split,packed", "--json"],
        capture_output=True, text=True, timeout=110, check=False)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["points"]) == 12
    csv_path, png_path = Path(data["csv"]), Path(data["png"])
    assert csv_path == tmp_path / "duel.csv" and png_path == tmp_path / "duel.png"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    assert {r["mode"] for r in rows} == set(MODES)
    assert sorted(r["ring"] for r in rows) == ["packed"] * 6 + ["split"] * 6
    assert sorted({float(r["ratio"]) for r in rows}) == [0.5, 2.0]
    for r in rows:
        buffers = int(r["buffers"])
        assert buffers == 400
        assert float(r["kicks_per_1000"]) == pytest.approx(1000 * int(r["kicks"]) / buffers,
                                                           abs=0.01)
        assert float(r["interrupts_per_1000"]) == pytest.approx(
            1000 * int(r["interrupts"]) / buffers, abs=0.01)
        assert float(r["driver_work_us"]) == float(r["ratio"]) * 10
        assert int(r["lost_wakeups"]) == 0
    raw = png_path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    assert width > 600 and height > 300
    assert set(rows[0]) == set(data["points"][0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_without_suppression_every_buffer_notifies(ring: str) -> None:
    p = run_point("none", 1.0, 5.0, 300, 32, ring)
    assert (p.ring, p.buffers, p.kicks, p.interrupts) == (ring, 300, 300, 300)
    assert p.kicks_per_1000 == 1000.0 and p.lost_wakeups == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["flags", "event-idx"])
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_suppressed_modes_complete_without_lost_wakeups(mode: str, ring: str) -> None:
    p = run_point(mode, 2.0, 5.0, 500, 16, ring)
    assert p.buffers == 500 and p.lost_wakeups == 0
    assert 0 < p.kicks <= 500 and p.interrupts <= 500


def test_outputs_from_given_points(tmp_path: Path) -> None:
    pts = [DuelPoint(m, r, r * 10, 10, 1000, k, i, k, i, 0.1, 1, 1, 0, ring)
           for m, k, i in (("none", 1000, 1000), ("event-idx", 10, 5)) for r in (0.5, 1, 2)
           for ring in ("split", "packed")]
    csv_path, png_path = write_outputs(pts, tmp_path / "sub")
    assert csv_path.read_text().splitlines()[0].startswith("mode,ratio,")
    assert len(csv_path.read_text().splitlines()) == 13
    assert png_path.stat().st_size > 1000
