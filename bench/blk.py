"""pyvirtio-blk against qemu-storage-daemon, side by side, driven by pyvirtio's front end.

Two suites, each over vhost-user (QEMU docs/interop/vhost-user.rst) with
pyvirtio's virtio-blk driver (VIRTIO 1.2 §5.2) as the front end:

* ``pagecache``: pyvirtio-blk on every engine (``--aio sync``, the
  default, ``--aio threads`` and ``--aio io_uring``) and
  qemu-storage-daemon serve the same page-cached raw image (one after the
  other: qemu-storage-daemon locks it).  Workloads: 4K random read at
  iodepth 1 and 32, 64K sequential read (iodepth 8), 4K random write
  (iodepth 32).
* ``direct``: the same image with the page cache bypassed (O_DIRECT:
  pyvirtio-blk ``--cache none``, qemu-storage-daemon ``cache.direct=on``),
  so every request reaches the host's disk: pyvirtio-blk on its three
  engines, qemu-storage-daemon with ``aio=threads`` and ``aio=io_uring``;
  each pyvirtio-blk row's ratio is to qemu-storage-daemon on the same kind
  of engine (sync and threads to ``aio=threads``).
* ``null``: a simulated device with 100 µs per request — pyvirtio-blk
  ``--null --latency-us 100`` (both engines) against qemu-storage-daemon's
  ``null-co`` driver with ``latency-ns=100000`` — at 4K random read,
  iodepth 1, 8 and 32: a latency-bound device, where only requests in
  flight side by side raise the IOPS.
* ``guest-null`` (not run by default): the same null disks seen from fio in
  a TCG Linux guest (``vhost-user-blk-pci``, bench/blk_guest.py) instead of
  pyvirtio's front end: pyvirtio-blk ``--null 1G`` (both engines) and
  qemu-storage-daemon ``null-co``, one boot each, iodepth 1, 8 and 32.

With ``--packed`` pyvirtio-blk (threads engine) also runs with the front end
on packed rings (VIRTIO 1.2 §2.8, ``BlkDriver.connect(packed=True)``) in the
same run, next to its split-ring rows (qemu-storage-daemon's libvhost-user
has no packed ring).

Reported: IOPS, MiB/s, mean latency, kicks and interrupts per 1,000
requests, and the back end's CPU time per request (utime + stime from
/proc/PID/stat around the measured interval), with the ratio to
qemu-storage-daemon on the same suite.

    .venv/bin/python bench/blk.py [--suite pagecache,null] [--seconds 5] [--rounds 3]
                                  [--size 256M] [--latency-us 100] [--poll] [--packed]
                                  [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from blk_guest import DEPTHS as GUEST_DEPTHS
from blk_guest import add_ratios, build_fio_initramfs, fio_in_guest, guest_table
from pyvirtio.devices.blk.driver import BlkDriver
from pyvirtio.devices.blk.workload import parse_size, run_workload

REPO = Path(__file__).resolve().parent.parent
REF_BACKEND = REPO / "scripts" / "peers" / "ref-blk-backend.sh"
CLK_TCK = os.sysconf("SC_CLK_TCK")

WORKLOADS = [
    ("4K randread QD1", "randread", 4096, 1),
    ("4K randread QD32", "randread", 4096, 32),
    ("64K read QD8", "read", 65536, 8),
    ("4K randwrite QD32", "randwrite", 4096, 32),
]
DIRECT_WORKLOADS = [(f"direct {label}", rw, bs, depth) for label, rw, bs, depth in WORKLOADS]
NULL_WORKLOADS = [
    ("null 4K randread QD1", "randread", 4096, 1),
    ("null 4K randread QD8", "randread", 4096, 8),
    ("null 4K randread QD32", "randread", 4096, 32),
]
QSD = "qemu-storage-daemon"
GUEST_NULL_SIZE = 1 << 30


Row = dict[str, Any]


@dataclass
class Backend:
    name: str
    argv: list[str]
    sock: Path
    env: dict[str, str]
    workloads: list[tuple[str, str, int, int]]
    #: The back end this one's ratios are taken against.
    ref: str = QSD
    #: The front end asks for the packed ring (§2.8).
    packed: bool = False


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its threads (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start(backend: Backend, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(backend.argv, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **backend.env))
    deadline = time.monotonic() + 20
    while not backend.sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{backend.name} did not start: {log.read_text()[-500:]}")
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(backend: Backend, log: Path, seconds: float, warmup: float,
            spin: float = 0.0) -> list[Row]:
    proc = start(backend, log)
    sock = backend.sock
    rows: list[Row] = []
    try:
        for label, rw, bs, depth in backend.workloads:
            with BlkDriver.connect(str(sock), queue_size=256, max_io=65536,
                                   spin=spin, packed=backend.packed) as drv:
                # The image is this benchmark's own scratch file: writing over it is fine.
                if warmup:
                    run_workload(drv, rw, bs, depth, warmup, allow_writes=True)
                cpu0 = cpu_seconds(proc.pid)
                res = run_workload(drv, rw, bs, depth, seconds, allow_writes=True)
                cpu1 = cpu_seconds(proc.pid)
            row: Row = {"backend": backend.name, "workload": label, **res.as_dict()}
            row["backend_cpu_s"] = cpu1 - cpu0
            row["backend_cpu_us_per_req"] = ((cpu1 - cpu0) * 1e6 / res.requests
                                             if res.requests else 0.0)
            rows.append(row)
            print(f"  {backend.name:<22} {label:<18} {res.iops:>10,.0f} IOPS "
                  f"{row['backend_cpu_us_per_req']:>7.1f} us CPU/req", file=sys.stderr)
    finally:
        stop(proc)
    return rows


def qsd_null_argv(sock: Path, size: int, latency_us: float) -> list[str]:
    """qemu-storage-daemon exporting a ``null-co`` disk with a fixed latency per request."""
    return [QSD, "--blockdev",
            f"driver=null-co,node-name=disk0,size={size},read-zeroes=on,"
            f"latency-ns={round(latency_us * 1000)}",
            "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,"
            f"addr.type=unix,addr.path={sock},writable=on"]


def run_guest_null(work: Path, seconds: float, latency_us: float, rounds: int) -> list[Row]:
    """The ``guest-null`` suite: fio in one TCG guest per back end, every depth in that boot;
    ``rounds`` boots per back end, alternating, the median round per depth reported."""
    initramfs = build_fio_initramfs(work / "guest")
    s1, s2 = work / "guest-null.sock", work / "guest-qsd-null.sock"
    s3 = work / "guest-null-sync.sock"
    null = [sys.executable, "-m", "pyvirtio.cli.blk", "--null", str(GUEST_NULL_SIZE),
            "--latency-us", f"{latency_us:g}"]
    # Both engines: the guest's requests arrive one kick at a time, where the
    # synchronous engine spends less CPU per request than the thread engine.
    backends = [
        Backend("pyvirtio-blk --null (threads)",
                [*null, "--aio", "threads", "--socket-path", str(s1)], s1, {}, []),
        Backend("pyvirtio-blk --null --aio sync",
                [*null, "--aio", "sync", "--socket-path", str(s3)], s3, {}, []),
        Backend("qsd null-co", qsd_null_argv(s2, GUEST_NULL_SIZE, latency_us), s2, {}, []),
    ]
    runs: list[Row] = []
    for rnd in range(rounds):
        for i, be in enumerate(backends):
            proc = start(be, work / f"guest-backend{i}.log")
            try:
                for row in fio_in_guest(initramfs, be.name, be.sock, max(1, round(seconds)),
                                        functools.partial(cpu_seconds, proc.pid)):
                    row["round"] = rnd
                    runs.append(row)
            finally:
                stop(proc)
    rows = median_rows(runs, [b.name for b in backends],
                       [f"guest fio 4K randread QD{d}" for d in GUEST_DEPTHS])
    add_ratios(rows, "qsd null-co")
    return rows


def median_rows(runs: list[Row], names: list[str],
                labels: list[str] | None = None) -> list[Row]:
    """Per (back end, workload): the round with the median IOPS (all rounds kept in it)."""
    out: list[Row] = []
    for name in names:
        for label in labels or [w[0] for w in WORKLOADS + DIRECT_WORKLOADS + NULL_WORKLOADS]:
            same = sorted((r for r in runs if r["backend"] == name and r["workload"] == label),
                          key=lambda r: float(r["iops"]))
            if same:
                mid = dict(same[(len(same) - 1) // 2])
                mid["rounds_iops"] = [round(float(r["iops"])) for r in same]
                out.append(mid)
    return out


def make_image(path: Path, size: int) -> None:
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
    with open(path, "rb") as f:  # read it once so both back ends start page-cached
        while f.read(8 << 20):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per workload (default 5)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    ap.add_argument("--size", default="256M", help="image size (default 256M)")
    ap.add_argument("--poll", action="store_true", help="also run pyvirtio-blk --poll")
    ap.add_argument("--packed", action="store_true",
                    help="also run pyvirtio-blk (threads) with the front end on packed rings")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the back ends this many times; report the median round")
    ap.add_argument("--spin-us", type=float, default=0.0, metavar="US",
                    help="front end busy-polls completions this long before sleeping")
    ap.add_argument("--suite", default="pagecache,null",
                    help="comma-separated: pagecache (image in the page cache), direct "
                         "(the image with O_DIRECT), null (null store with --latency-us), "
                         "guest-null (the null stores from fio in a TCG guest); "
                         "default pagecache,null")
    ap.add_argument("--latency-us", type=float, default=100.0,
                    help="per-request latency of the null suite (default 100)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    suites = set(args.suite.split(","))
    if not suites <= {"pagecache", "direct", "null", "guest-null"}:
        ap.error(f"--suite {args.suite}: pagecache, direct, null and/or guest-null")

    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-") as tmp:
        work = Path(tmp)
        img = work / "disk.img"
        blk = [sys.executable, "-m", "pyvirtio.cli.blk"]
        py = [*blk, "--blk-file", str(img)]
        backends: list[Backend] = []
        if "pagecache" in suites:
            make_image(img, size)
            s1, s2, s3 = work / "pyvirtio.sock", work / "pyvirtio-poll.sock", work / "qsd.sock"
            s4 = work / "pyvirtio-sync.sock"
            s6, s7 = work / "pyvirtio-threads.sock", work / "pyvirtio-uring.sock"
            backends += [
                Backend("pyvirtio-blk", [*py, "--socket-path", str(s1)], s1, {}, WORKLOADS),
                Backend("pyvirtio-blk --aio sync", [*py, "--socket-path", str(s4), "--aio",
                                                    "sync"], s4, {}, WORKLOADS),
                Backend("pyvirtio-blk --aio threads", [*py, "--socket-path", str(s6), "--aio",
                                                       "threads"], s6, {}, WORKLOADS),
                Backend("pyvirtio-blk --aio io_uring", [*py, "--socket-path", str(s7), "--aio",
                                                        "io_uring"], s7, {}, WORKLOADS),
                Backend(QSD, [str(REF_BACKEND), str(img), str(s3)], s3,
                        {"CACHE_DIRECT": "off"}, WORKLOADS),
            ]
            if args.packed:
                s5 = work / "pyvirtio-packed.sock"
                backends.insert(1, Backend("pyvirtio-blk packed",
                                           [*py, "--socket-path", str(s5), "--aio", "threads"],
                                           s5, {}, WORKLOADS, packed=True))
            if args.poll:
                backends.insert(1, Backend("pyvirtio-blk --poll",
                                           [*py, "--socket-path", str(s2), "--poll"], s2, {},
                                           WORKLOADS))
        if "direct" in suites:
            if not img.exists():
                make_image(img, size)
            direct = [*py, "--cache", "none"]
            qsd_ref = {"threads": "qsd direct aio=threads", "io_uring": "qsd direct aio=io_uring"}
            for aio in ("sync", "threads", "io_uring"):
                sock = work / f"direct-{aio}.sock"
                backends.append(Backend(f"pyvirtio-blk --cache none --aio {aio}",
                                        [*direct, "--socket-path", str(sock), "--aio", aio],
                                        sock, {}, DIRECT_WORKLOADS,
                                        qsd_ref.get(aio, qsd_ref["threads"])))
            for aio, name in qsd_ref.items():
                sock = work / f"qsd-direct-{aio}.sock"
                backends.append(Backend(name, [
                    QSD, "--blockdev",
                    f"driver=file,node-name=file0,filename={img},cache.direct=on,aio={aio}",
                    "--blockdev", "driver=raw,node-name=disk0,file=file0",
                    "--export", "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                    f"addr.path={sock},writable=on"], sock, {}, DIRECT_WORKLOADS, name))
        if "null" in suites:
            lat = args.latency_us
            null = [*blk, "--null", str(size), "--latency-us", f"{lat:g}"]
            n1, n2, n3 = work / "null.sock", work / "null-sync.sock", work / "qsd-null.sock"
            qsd_null = qsd_null_argv(n3, size, lat)
            if args.packed:
                n4 = work / "null-packed.sock"
                backends.append(Backend("pyvirtio-blk --null (threads) packed",
                                        [*null, "--socket-path", str(n4), "--aio", "threads"],
                                        n4, {}, NULL_WORKLOADS, "qsd null-co", packed=True))
            backends += [
                Backend("pyvirtio-blk --null (threads)",
                        [*null, "--socket-path", str(n1), "--aio", "threads"],
                        n1, {}, NULL_WORKLOADS, "qsd null-co"),
                Backend("pyvirtio-blk --null --aio sync",
                        [*null, "--socket-path", str(n2), "--aio", "sync"], n2, {},
                        NULL_WORKLOADS, "qsd null-co"),
                Backend("qsd null-co", qsd_null, n3, {}, NULL_WORKLOADS, "qsd null-co"),
            ]
        runs: list[Row] = []
        # Rounds alternate the back ends so load drift on a shared machine hits all of them.
        for rnd in range(args.rounds):
            for i, be in enumerate(backends):
                for row in measure(be, work / f"backend{i}.log", args.seconds, args.warmup,
                                   args.spin_us / 1e6):
                    row["round"] = rnd
                    runs.append(row)
        guest_rows = (run_guest_null(work, args.seconds, args.latency_us, args.rounds)
                      if "guest-null" in suites else [])
    rows = median_rows(runs, [b.name for b in backends])

    ref_of = {b.name: b.ref for b in backends}
    ref = {(r["backend"], r["workload"]): r for r in rows}
    for r in rows:
        q = ref.get((ref_of[r["backend"]], r["workload"]))
        if q and float(q["iops"]) and float(q["backend_cpu_us_per_req"]):
            r["iops_ratio_vs_qsd"] = float(r["iops"]) / float(q["iops"])
            r["cpu_ratio_vs_qsd"] = (float(r["backend_cpu_us_per_req"])
                                     / float(q["backend_cpu_us_per_req"]))
    if args.json:
        print(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "image_bytes": size,
                          "spin_us": args.spin_us, "null_latency_us": args.latency_us,
                          "cpus": os.cpu_count(), "results": rows, "guest": guest_rows},
                         indent=2))
        return 0
    table = Table(title=f"vhost-user-blk back ends, pyvirtio front end, {args.seconds:g} s each, "
                        f"median of {args.rounds} round(s), {size >> 20} MiB image (page-cached; "
                        f"'direct' rows: O_DIRECT) "
                        f"and null disk with {args.latency_us:g} us latency, "
                        f"{os.cpu_count()} CPUs"
                        + (f", front end spins {args.spin_us:g} us" if args.spin_us else ""))
    for col in ("workload", "back end", "IOPS", "MiB/s", "lat avg us", "p99 us",
                "kicks/1k", "irqs/1k", "back-end CPU us/req", "IOPS ratio", "CPU ratio"):
        table.add_column(col, justify="left" if col in ("workload", "back end") else "right")
    for label, *_ in WORKLOADS + DIRECT_WORKLOADS + NULL_WORKLOADS:
        for r in rows:
            if r["workload"] != label:
                continue
            pct = r["percentiles_us"]
            assert isinstance(pct, dict)
            table.add_row(
                label, str(r["backend"]), f"{float(r['iops']):,.0f}",
                f"{float(r['mib_s']):.1f}", f"{float(r['lat_us_avg']):.1f}",
                f"{pct['99.00']:.1f}", f"{float(r['kicks_per_1000']):.1f}",
                f"{float(r['interrupts_per_1000']):.1f}",
                f"{float(r['backend_cpu_us_per_req']):.1f}",
                f"{r['iops_ratio_vs_qsd']:.2f}" if "iops_ratio_vs_qsd" in r else "",
                f"{r['cpu_ratio_vs_qsd']:.2f}" if "cpu_ratio_vs_qsd" in r else "")
    console = Console(width=max(Console().width, 160))
    if rows:
        console.print(table)
    if guest_rows:
        console.print(guest_table(guest_rows, max(1, round(args.seconds)), args.latency_us,
                                  args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
