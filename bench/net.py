"""pyvirtio-net against DPDK's net_vhost, side by side, driven by DPDK testpmd virtio_user.

Back ends (each started fresh, one after the other, alternating over rounds):

* ``pyvirtio-net --switch`` with one port: a sink (a frame to nobody is
  dropped by the switch after learning its source, the work a switch port does);
* ``pyvirtio-net --loopback``: transmitted frames come back on receive;
* DPDK 22.11 testpmd ``net_vhost`` in ``rxonly`` (sink) or ``io`` (loop)
  forwarding: the C reference.

The traffic source is DPDK testpmd with a ``virtio_user`` port (a C front
end, VIRTIO 1.2 §5.1 over QEMU docs/interop/vhost-user.rst) in ``txonly``
(sink rows) or ``io`` with ``--tx-first`` (loop rows), at 64 and 1500 bytes.
Reported: packets per second the front end got through (testpmd's own
statistics, median of its periodic samples), Gbit/s, the ratio to net_vhost,
and pyvirtio-net's CPU time per packet (utime + stime from /proc/PID/stat;
net_vhost polls, so it always uses a whole core).  pyvirtio-net is pinned to
the CPU testpmd's forwarding lcore does not use ("one core"); testpmd's
forwarding lcores spin on the others.

With ``--frontends``, also pyvirtio's own front end against DPDK's
``virtio_user``, both into net_vhost (bench/net_frontend.py).  With
``--guest``, also a Linux guest in QEMU (TCG) transmitting with the
kernel's pktgen (64-byte frames, scripts/peers/workloads/net-pktgen.sh) into
each sink: the guest is the bottleneck, so the rates should be equal.

    .venv/bin/python bench/net.py [--seconds 8] [--rounds 1] [--sizes 64,1500] [--guest]
                                  [--burst 32] [--queue-size 256] [--frontends] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from net_frontend import compare_frontends, result_line

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "scripts" / "peers"
TESTPMD = PEERS / "testpmd-vhost.sh"
CLK_TCK = os.sysconf("SC_CLK_TCK")
Row = dict[str, Any]


@dataclass
class Backend:
    name: str
    mode: str  # "sink" or "loop"


# --poll: the rings are polled, as net_vhost polls them (a whole core each);
# without it pyvirtio-net sleeps until a kick.
BACKENDS = [Backend("pyvirtio-net --switch", "sink"),
            Backend("pyvirtio-net --switch --poll", "sink"),
            Backend("DPDK net_vhost rxonly", "sink"),
            Backend("pyvirtio-net --loopback", "loop"),
            Backend("pyvirtio-net --loopback --poll", "loop"), Backend("DPDK net_vhost io", "loop")]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"back end did not start: {log.read_text()[-800:]}")
        time.sleep(0.05)
    time.sleep(0.5)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_one(be: Backend, size: int, seconds: float, work: Path, burst: int = 32,
            queue_size: int = 256) -> Row:
    sock = work / "net.sock"
    proc = start_backend(be, sock, work)
    try:
        cpu0 = cpu_seconds(proc.pid)
        env = dict(os.environ, ROLE="virtio-user", FWD="txonly" if be.mode == "sink" else "io",
                   TXFIRST="0" if be.mode == "sink" else "1", LCORES="0,1", MAIN="1",
                   TESTPMD_EXTRA=(f"--txpkts={size} --burst={burst} --txd={queue_size} "
                                  f"--rxd={queue_size}"),
                   VDEV_EXTRA=f",queue_size={queue_size}",
                   LOG=str(work / "virtio-user.log"),
                   STATS="1")
        res = subprocess.run(["bash", str(TESTPMD), str(sock), str(int(seconds))],
                             capture_output=True, text=True, env=env, timeout=seconds + 60)
        cpu1 = cpu_seconds(proc.pid)
    finally:
        stop(proc)
    stats = result_line(res.stdout)
    pps = stats["tx_pps_median"] if be.mode == "sink" else stats["rx_pps_median"]
    packets = stats["tx_packets"] if be.mode == "sink" else stats["rx_packets"]
    row: Row = {"backend": be.name, "mode": be.mode, "size": size, "burst": burst,
                "queue_size": queue_size, "pps": pps,
                "gbit_s": pps * size * 8 / 1e9, "packets": packets, "testpmd": stats}
    if be.name.startswith("pyvirtio") and packets:
        row["backend_cpu_us_per_packet"] = (cpu1 - cpu0) * 1e6 / packets
    print(f"  {be.name:<26} {be.mode:<5} {size:>5} B {pps:>12,} pps", file=sys.stderr)
    return row


def start_backend(be: Backend, sock: Path, work: Path) -> subprocess.Popen[bytes]:
    log = work / "backend.log"
    with open(log, "wb") as out:
        if be.name.startswith("pyvirtio"):
            kind = "--switch=bench" if be.mode == "sink" else "--loopback"
            # CPU 1: testpmd's virtio_user forwards on lcore 0 (its main lcore 1 sleeps).
            poll = ["--poll"] if be.name.endswith("--poll") else []
            proc = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-m",
                                     "pyvirtio.cli.net", "--socket-path", str(sock), kind,
                                     *poll],
                                    stdout=out, stderr=subprocess.STDOUT)
        else:
            env = dict(os.environ, ROLE="vhost", FWD="rxonly" if be.mode == "sink" else "io",
                       LCORES="0,1", MAIN="0", LOG=str(work / "vhost.log"))
            proc = subprocess.Popen(["bash", str(TESTPMD), str(sock)], stdout=out,
                                    stderr=subprocess.STDOUT, env=env)
    wait_socket(sock, proc, log)
    return proc


def guest_rows(work: Path) -> list[Row]:
    """A TCG guest's pktgen transmit rate into each sink back end."""
    workload = (PEERS / "workloads" / "net-pktgen.sh").read_text()
    rows: list[Row] = []
    for be in (b for b in BACKENDS if b.mode == "sink"):
        sock = work / "guest-net.sock"
        proc = start_backend(be, sock, work)
        try:
            env = dict(os.environ, MODULES="virtio_pci virtio_net pktgen")
            res = subprocess.run([str(PEERS / "boot-guest.sh"), "-n", str(sock), "-t", "240",
                                  workload], capture_output=True, text=True, env=env,
                                 timeout=300)
        finally:
            stop(proc)
        m = re.search(r"RESULT pktgen\s+(\d+)pps", res.stdout)
        if m is None:
            raise RuntimeError(f"no pktgen result from the guest:\n{res.stdout[-2000:]}")
        pps = int(m.group(1))
        rows.append({"backend": be.name, "mode": "guest pktgen", "size": 64, "pps": pps,
                     "gbit_s": pps * 64 * 8 / 1e9})
        print(f"  {be.name:<26} guest pktgen 64 B {pps:>12,} pps", file=sys.stderr)
    ref = rows[-1]["pps"]
    for r in rows:
        r["ratio_vs_dpdk"] = r["pps"] / ref if ref else 0.0
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0,
                    help="per run, testpmd's start-up included (default 8)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the back ends this many times; report the median round")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes (default 64,1500)")
    ap.add_argument("--burst", type=int, default=32,
                    help="testpmd's burst (default 32, its own default); the io loop keeps one "
                         "burst in flight, so a loop's rate is burst / round-trip time")
    ap.add_argument("--queue-size", type=int, default=256,
                    help="virtio_user's ring size (and testpmd's --txd/--rxd; default 256, its "
                         "own default): a bigger ring lets a sink take bigger batches, and with "
                         "a bigger --burst keeps more of the loop in flight")
    ap.add_argument("--guest", action="store_true",
                    help="also a TCG guest's pktgen transmit rate into each sink")
    ap.add_argument("--frontends", action="store_true",
                    help="also pyvirtio's front end vs DPDK virtio_user into net_vhost")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    guest: list[Row] = []
    runs: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-net-") as tmp:
        for rnd in range(args.rounds):
            for size in sizes:
                for be in BACKENDS if rnd % 2 == 0 else BACKENDS[::-1]:
                    row = run_one(be, size, args.seconds, Path(tmp), args.burst,
                                  args.queue_size)
                    row["round"] = rnd
                    runs.append(row)
        if args.guest:
            guest = guest_rows(Path(tmp))
    rows: list[Row] = []
    for size in sizes:
        for be in BACKENDS:
            same = sorted((r for r in runs if r["backend"] == be.name and r["size"] == size),
                          key=lambda r: int(r["pps"]))
            mid = dict(same[(len(same) - 1) // 2])
            mid["rounds_pps"] = [int(r["pps"]) for r in same]
            rows.append(mid)
    for r in rows:
        ref = next(x for x in rows if x["size"] == r["size"] and x["mode"] == r["mode"]
                   and x["backend"].startswith("DPDK"))
        if ref["pps"]:
            r["ratio_vs_dpdk"] = r["pps"] / ref["pps"]
    rows += guest
    frontends = (compare_frontends(tuple(sizes), args.seconds, args.rounds)
                 if args.frontends else [])
    if args.json:
        print(json.dumps({"seconds": args.seconds, "rounds": args.rounds,
                          "burst": args.burst, "queue_size": args.queue_size,
                          "cpus": os.cpu_count(), "results": rows,
                          "frontends": frontends}, indent=2))
        return 0
    table = Table(title=f"vhost-user-net back ends, DPDK testpmd virtio_user as the source "
                        f"(burst {args.burst}, ring {args.queue_size}), {args.seconds:g} s each, "
                        f"median of {args.rounds} round(s)")
    for col in ("mode", "size B", "back end", "pps", "Gbit/s", "ratio vs DPDK",
                "back-end CPU us/pkt"):
        table.add_column(col, justify="left" if col in ("mode", "back end") else "right")
    for r in rows:
        cpu = r.get("backend_cpu_us_per_packet")
        table.add_row(r["mode"], str(r["size"]), r["backend"], f"{r['pps']:,}",
                      f"{r['gbit_s']:.2f}", f"{r.get('ratio_vs_dpdk', 0):.2f}",
                      "polls (1 core)" if cpu is None else f"{cpu:.2f}")
    console = Console(width=max(Console().width, 140))
    console.print(table)
    if frontends:
        fe_table = Table(title="vhost-user-net front ends into DPDK net_vhost rxonly")
        for col in ("size B", "front end", "pps (sink counted)", "ratio vs virtio_user"):
            fe_table.add_column(col, justify="left" if col == "front end" else "right")
        for r in frontends:
            fe_table.add_row(str(r["size"]), str(r["frontend"]), f"{int(r['pps']):,}",
                             f"{float(r['ratio']):.2f}")
        console.print(fe_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
