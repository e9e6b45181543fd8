"""bench/blk_guest.py: the console lines fio's guest script prints, and the ratios.

The guest run itself is a benchmark (``bench/blk.py --suite guest-null``), not a
test; this checks the host side's reading of fio's terse fields (error, KiB read,
IOPS, mean latency) and the ratios over qemu-storage-daemon and over QD1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from blk_guest import GUEST_SCRIPT, add_ratios, parse_fio_line


def test_parse_fio_line_reads_depth_iops_requests_latency() -> None:
    line = "[   31.2] PVFIO qd=8 iops=1742 kib=34840 lat_us=4530.12 err=0"
    assert parse_fio_line(line) == (8, 1742, 8710, 4530.12)


def test_parse_fio_line_refuses_a_failed_run_and_other_lines() -> None:
    with pytest.raises(RuntimeError, match="iodepth 32: error 5"):
        parse_fio_line("PVFIO qd=32 iops=0 kib=0 lat_us=0.000000 err=5")
    with pytest.raises(ValueError, match="not a PVFIO line"):
        parse_fio_line("PVFIO-START qd=1")


def test_guest_script_prints_what_the_host_parses() -> None:
    script = GUEST_SCRIPT.format(depths="1 8 32", seconds=5)
    assert "--iodepth=$d --runtime=5 --time_based" in script
    assert "--terse-version=3" in script
    # awk prints the fields in the order LINE expects.
    assert '" iops=" $8 " kib=" $6 " lat_us=" $40 " err=" $5' in script


def test_add_ratios_over_qsd_and_over_qd1() -> None:
    rows = [{"backend": b, "iodepth": d, "iops": i} for b, d, i in (
        ("py", 1, 100), ("py", 8, 400), ("py", 32, 900),
        ("qsd", 1, 50), ("qsd", 8, 500), ("qsd", 32, 1000))]
    add_ratios(rows, "qsd")
    assert [r["iops_ratio_vs_qsd"] for r in rows] == [2.0, 0.8, 0.9, 1.0, 1.0, 1.0]
    assert [r["iops_vs_qd1"] for r in rows] == [1.0, 4.0, 9.0, 1.0, 10.0, 20.0]
