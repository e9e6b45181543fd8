"""fio in a TCG Linux guest on a vhost-user-blk back end: ``bench/blk.py --suite guest-null``.

The guest is the tests' Debian kernel + busybox initramfs (tests/qemu_guest.py,
scripts/peers/make-initramfs.sh) with the host's ``/usr/bin/fio`` copied in.
QEMU's ``vhost-user-blk-pci`` device hands the rings to the back end (QEMU
docs/interop/vhost-user.rst); the guest's virtio_blk driver (Linux
``virtio_queue_rq``, VIRTIO 1.2 §5.2) sees ``/dev/vda``.  One boot per back
end (and round) runs fio once per iodepth — 4K random read, libaio,
O_DIRECT, time-based — and prints one console line as each depth starts and
one with its result::

    PVFIO-START qd=8
    PVFIO qd=8 iops=1234 kib=24680 lat_us=6481.2 err=0

(fio's terse output, version 3: field 5 is the error, 6 the KiB read, 8 the
read IOPS, 40 the mean total read latency in µs).  The host parses those
lines; nothing else of fio's output is needed, so the guest needs no JSON
tool.  Between the two lines the host samples the back end's CPU time, for
its CPU per request: on a machine with few CPUs the back end's CPU competes
with the TCG vCPU thread that runs the guest's fio.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from qemu_guest import VhostUserDevice, boot, build_initramfs  # noqa: E402 - the tests' helpers

DEPTHS = (1, 8, 32)
FIO = "/usr/bin/fio"
MODULES = ("virtio_pci", "virtio_blk")
# Every boot (~15-20 s under TCG with fio's libraries) plus fio's start-up per depth.
BOOT_BUDGET_S = 180.0

GUEST_SCRIPT = """for d in {depths}; do
echo PVFIO-START qd=$d
fio --name=pv --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randread --bs=4k \
--iodepth=$d --runtime={seconds} --time_based --output-format=terse --terse-version=3 > /tmp/f
awk -F';' -v d=$d '{{print "PVFIO qd=" d " iops=" $8 " kib=" $6 " lat_us=" $40 " err=" $5}}' /tmp/f
done
echo PVFIO-DONE
"""

LINE = re.compile(r"PVFIO qd=(\d+) iops=(\d+) kib=(\d+) lat_us=([0-9.]+) err=(\d+)")

Row = dict[str, Any]


def build_fio_initramfs(out: Path) -> Path:
    """The guests' kernel + initramfs with fio in it (built once, shared by all boots)."""
    return build_initramfs(out, MODULES, extra_bins=(FIO,))


def parse_fio_line(line: str) -> tuple[int, int, int, float]:
    """``(iodepth, IOPS, requests, mean latency µs)`` from one ``PVFIO`` console line."""
    m = LINE.search(line)
    if m is None:
        raise ValueError(f"not a PVFIO line: {line!r}")
    depth, iops, kib, lat, err = int(m[1]), int(m[2]), int(m[3]), float(m[4]), int(m[5])
    if err:
        raise RuntimeError(f"fio in the guest failed at iodepth {depth}: error {err}")
    return depth, iops, kib // 4, lat


def fio_in_guest(initramfs: Path, backend: str, sock: Path, seconds: int,
                 cpu_seconds: Callable[[], float]) -> list[Row]:
    """Boot one guest on ``sock``, run fio at every depth, return one row per depth.

    ``cpu_seconds``: the back end's CPU time so far (sampled around each depth).
    """
    script = GUEST_SCRIPT.format(depths=" ".join(map(str, DEPTHS)), seconds=seconds)
    guest = boot(initramfs, script, [VhostUserDevice("vhost-user-blk-pci", sock)],
                 timeout=BOOT_BUDGET_S + len(DEPTHS) * seconds * 2)
    rows: list[Row] = []
    try:
        for _ in DEPTHS:
            guest.wait_for("PVFIO-START")
            cpu0 = cpu_seconds()
            depth, iops, requests, lat = parse_fio_line(guest.wait_for("PVFIO qd="))
            cpu = cpu_seconds() - cpu0
            rows.append({"backend": backend, "workload": f"guest fio 4K randread QD{depth}",
                         "iodepth": depth, "iops": iops, "requests": requests,
                         "lat_us_avg": lat, "backend_cpu_s": cpu,
                         "backend_cpu_us_per_req": cpu * 1e6 / requests if requests else 0.0})
            print(f"  {backend:<22} guest fio QD{depth:<3} {iops:>10,} IOPS "
                  f"{rows[-1]['backend_cpu_us_per_req']:>7.1f} us CPU/req", file=sys.stderr)
        guest.wait_for("PVFIO-DONE")
        result = guest.finish()
    finally:
        guest.kill()
    if result.rc != 0:
        raise RuntimeError(f"guest on {backend} ended with rc {result.rc}:\n{result.log[-2000:]}")
    return rows


def add_ratios(rows: list[Row], ref: str) -> None:
    """Each row's IOPS over ``ref``'s at the same depth; each back end's QD32/QD1."""
    by = {(r["backend"], r["iodepth"]): r for r in rows}
    for r in rows:
        q = by.get((ref, r["iodepth"]))
        if q and q["iops"]:
            r["iops_ratio_vs_qsd"] = r["iops"] / q["iops"]
        one = by.get((r["backend"], DEPTHS[0]))
        if one and one["iops"]:
            r["iops_vs_qd1"] = r["iops"] / one["iops"]


def guest_table(rows: list[Row], seconds: int, latency_us: float, rounds: int) -> Table:
    table = Table(title=f"fio in a TCG guest (1 vCPU) on vhost-user-blk-pci, null disk with "
                        f"{latency_us:g} us latency, 4K randread libaio O_DIRECT, "
                        f"{seconds} s per depth, one boot per back end and round, "
                        f"median of {rounds} round(s)")
    for col in ("workload", "back end", "IOPS", "lat avg us", "back-end CPU us/req",
                "IOPS ratio", "vs QD1"):
        table.add_column(col, justify="left" if col in ("workload", "back end") else "right")
    for depth in DEPTHS:
        for r in rows:
            if r["iodepth"] == depth:
                table.add_row(
                    str(r["workload"]), str(r["backend"]), f"{r['iops']:,}",
                    f"{r['lat_us_avg']:.1f}", f"{r['backend_cpu_us_per_req']:.1f}",
                    f"{r['iops_ratio_vs_qsd']:.2f}" if "iops_ratio_vs_qsd" in r else "",
                    f"{r['iops_vs_qd1']:.1f}x" if "iops_vs_qd1" in r else "")
    return table
