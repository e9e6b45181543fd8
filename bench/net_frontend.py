"""pyvirtio's virtio-net front end vs DPDK's virtio_user, both against DPDK net_vhost, one run.

The back end is DPDK 22.11 testpmd ``net_vhost`` in ``rxonly`` forwarding
(scripts/peers/testpmd-vhost.sh, a fresh one per run): a C sink that counts
every frame it dequeues.  The front ends transmit (``txonly``) as fast as
they can, one after the other, alternating their order over rounds:

* DPDK testpmd with a ``virtio_user`` port (scripts/peers/testpmd-virtio-user.sh,
  ``--forward-mode=txonly --txpkts=SIZE``): C, polling;
* ``pyvirtio bench net --mode txonly --size SIZE``: :class:`NetDriver`
  (VIRTIO 1.2 §5.1.6.2 transmit with late reclaim, ``enable_cb_delayed``).

Both front ends run on CPU 0 (virtio_user's forwarding lcore; pyvirtio is
pinned there), net_vhost forwards on lcore 1.  The figure compared is what
the sink saw: the median of net_vhost's periodic RX rate samples (testpmd's
RESULT line), so both front ends are measured by the same observer; each
front end's own count is shown next to it, and pyvirtio's CPU time per
packet (the process's utime + stime; virtio_user polls a whole core).

    .venv/bin/python bench/net_frontend.py [--seconds 6] [--rounds 1] [--sizes 64,1500] [--json]

:func:`compare_frontends` returns the rows for another script (bench/net.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
PEERS = REPO / "scripts" / "peers"
FRONTENDS = ("DPDK virtio_user", "pyvirtio NetDriver")
#: The CPU both front ends transmit on (testpmd-virtio-user.sh forwards on lcore 0).
FRONTEND_CPU = 0
Row = dict[str, Any]


def result_line(text: str) -> dict[str, int]:
    """testpmd-vhost.sh's ``RESULT key=value ...`` line as numbers."""
    m = re.search(r"^RESULT (.*)$", text, re.M)
    if m is None:
        raise RuntimeError(f"no RESULT line from testpmd:\n{text[-2000:]}")
    return {k: int(v) for k, v in (kv.split("=", 1) for kv in m.group(1).split())
            if v.isdigit()}


def start_sink(sock: Path, log: Path) -> subprocess.Popen[str]:
    """net_vhost in rxonly, forwarding on lcore 1, until SIGTERM."""
    env = dict(os.environ, ROLE="vhost", FWD="rxonly", LCORES="0,1", MAIN="0", STATS="1",
               LOG=str(log))
    proc = subprocess.Popen(["bash", str(PEERS / "testpmd-vhost.sh"), str(sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, _ = proc.communicate()
            raise RuntimeError(f"net_vhost did not start:\n{out[-2000:]}")
        time.sleep(0.05)
    time.sleep(0.5)  # the socket exists before the vhost thread listens
    return proc


def stop_sink(proc: subprocess.Popen[str]) -> dict[str, int]:
    proc.terminate()  # the script turns it into SIGINT: testpmd prints its statistics
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return result_line(out)


def run_virtio_user(sock: Path, size: int, seconds: float, log: Path) -> dict[str, Any]:
    env = dict(os.environ, FWD="txonly", TXFIRST="0", LCORES="0,1", MAIN="1", STATS="1",
               TESTPMD_EXTRA=f"--txpkts={size}", LOG=str(log))
    # The script's run time includes EAL start-up (one to two seconds here).
    res = subprocess.run(["bash", str(PEERS / "testpmd-virtio-user.sh"), str(sock),
                          str(round(seconds + 2))],
                         capture_output=True, text=True, env=env, timeout=seconds + 90)
    own = result_line(res.stdout)
    # TX-dropped: bursts the ring had no room for, i.e. the sink set the pace.
    return {"own_pps": own["tx_pps_median"], "own_packets": own["tx_packets"],
            "frontend_tx_dropped": own["tx_dropped"], "cpu_us_per_packet": None}


def run_pyvirtio(sock: Path, size: int, seconds: float) -> dict[str, Any]:
    def pin() -> None:
        os.sched_setaffinity(0, {FRONTEND_CPU})

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "bench", "net",
                          "--socket-path", str(sock), "--mode", "txonly", "--size", str(size),
                          "--seconds", str(seconds), "--json"],
                         capture_output=True, text=True, timeout=seconds + 90, preexec_fn=pin)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"pyvirtio bench net failed: {res.stderr.strip()}")
    out = json.loads(res.stdout)
    # Start-up (imports, connect) included: a slight overestimate of the per-packet cost.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sent = int(out["frames_sent"])
    return {"own_pps": round(out["pps"]), "own_packets": sent,
            "kicks_per_1000": out["kicks_per_1000"],
            "interrupts_per_1000": out["interrupts_per_1000"],
            "cpu_us_per_packet": cpu * 1e6 / sent if sent else None}


def run_one(frontend: str, size: int, seconds: float, work: Path) -> Row:
    sock = work / "vhost.sock"
    sink = start_sink(sock, work / "vhost.log")
    try:
        if frontend == FRONTENDS[0]:
            own = run_virtio_user(sock, size, seconds, work / "virtio-user.log")
        else:
            own = run_pyvirtio(sock, size, seconds)
    finally:
        stats = stop_sink(sink)
    pps = stats["rx_pps_median"]
    row: Row = {"frontend": frontend, "size": size, "pps": pps,
                "gbit_s": pps * size * 8 / 1e9, "sink_packets": stats["rx_packets"],
                "sink_dropped": stats["rx_dropped"], **own}
    print(f"  {frontend:<20} {size:>5} B {pps:>12,} pps (own count {own['own_pps']:,})",
          file=sys.stderr)
    return row


def compare_frontends(sizes: tuple[int, ...] = (64, 1500), seconds: float = 6.0,
                      rounds: int = 1) -> list[Row]:
    """Median-of-rounds rows per (front end, size); ``ratio`` is pyvirtio / virtio_user,
    the median of the per-round ratios."""
    runs: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pyvirtio-bench-net-fe-") as tmp:
        for rnd in range(rounds):
            for size in sizes:
                # A B, then B A: drift in the machine's load hits both front ends.
                order = FRONTENDS if rnd % 2 == 0 else FRONTENDS[::-1]
                for fe in order:
                    row = run_one(fe, size, seconds, Path(tmp))
                    row["round"] = rnd
                    runs.append(row)
    rows: list[Row] = []
    for size in sizes:
        for fe in FRONTENDS:
            same = sorted((r for r in runs if r["frontend"] == fe and r["size"] == size),
                          key=lambda r: int(r["pps"]))
            mid = dict(same[(len(same) - 1) // 2])
            mid["rounds_pps"] = [int(r["pps"]) for r in same]
            rows.append(mid)
    # The ratio is taken within each round (the two runs next to each other), then
    # the median over rounds: the machine's load drifts more between rounds.
    for size in sizes:
        ratios = []
        for rnd in range(rounds):
            py, ref = (next(r for r in runs if r["frontend"] == fe and r["size"] == size
                            and r["round"] == rnd) for fe in FRONTENDS[::-1])
            ratios.append(py["pps"] / ref["pps"] if ref["pps"] else 0.0)
        ratios.sort()
        for r in rows:
            if r["size"] == size:
                r["rounds_ratio"] = [round(x, 3) for x in ratios]
                r["ratio"] = (1.0 if r["frontend"] == FRONTENDS[0]
                              else ratios[(len(ratios) - 1) // 2])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0,
                    help="traffic per run, start-up not included (default 6)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the front ends this many times; report the median round")
    ap.add_argument("--sizes", default="64,1500", help="frame sizes in bytes (default 64,1500)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = compare_frontends(sizes, args.seconds, args.rounds)
    if args.json:
        print(json.dumps({"seconds": args.seconds, "rounds": args.rounds,
                          "cpus": os.cpu_count(), "results": rows}, indent=2))
        return 0
    table = Table(title=f"virtio-net front ends transmitting into DPDK net_vhost rxonly, "
                        f"{args.seconds:g} s each, median of {args.rounds} round(s), "
                        f"{os.cpu_count()} CPUs")
    for col in ("size B", "front end", "pps (sink)", "Gbit/s", "ratio", "own pps",
                "CPU us/pkt", "kicks/1k", "irqs/1k"):
        table.add_column(col, justify="left" if col == "front end" else "right")
    for r in rows:
        polls = "polls" if r["cpu_us_per_packet"] is None else None
        table.add_row(str(r["size"]), r["frontend"], f"{r['pps']:,}", f"{r['gbit_s']:.2f}",
                      f"{r['ratio']:.3f}", f"{r['own_pps']:,}",
                      polls or f"{r['cpu_us_per_packet']:.2f}",
                      polls or f"{r['kicks_per_1000']:.2f}",
                      polls or f"{r['interrupts_per_1000']:.2f}")
    print("virtio_user's TX-dropped (bursts the full ring refused, the sink setting the "
          "pace): " + ", ".join(f"{r['size']} B {r['frontend_tx_dropped']:,}" for r in rows
                                if "frontend_tx_dropped" in r), file=sys.stderr)
    Console(width=max(Console().width, 120)).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
