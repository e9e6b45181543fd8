"""``pyvirtio bench blk``: fio-like load on a vhost-user-blk back end.

Connects pyvirtio's virtio-blk driver (VIRTIO 1.2 §5.2) as a vhost-user
front end and runs :func:`pyvirtio.devices.blk.workload.run_workload`:
IOPS, MiB/s, latency percentiles, and kicks and interrupts per 1,000
requests (what notification suppression, §2.7.10, saved).  Wiring only.
"""

from __future__ import annotations

import argparse
import json
import sys

from pyvirtio.devices.blk.workload import RW_MODES, format_fio, parse_size, run_workload


def _pow2_at_least(n: int) -> int:
    size = 2
    while size < n:
        size *= 2
    return size


def run_blk(args: argparse.Namespace) -> int:
    from pyvirtio.devices.blk.driver import BlkDriver

    try:
        bs = parse_size(args.bs)
        queue_size = max(args.queue_size, _pow2_at_least(2 * args.iodepth))
        with BlkDriver.connect(args.socket_path, queue_size=queue_size,
                               max_io=max(bs, 4096), spin=args.spin_us / 1e6) as drv:
            result = run_workload(drv, args.rw, bs, args.iodepth, args.seconds,
                                  warmup=args.warmup)
    except Exception as exc:  # a CLI reports every failure in one line
        print(f"pyvirtio bench blk: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_fio(result))
    return 1 if result.errors else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("bench", help="benchmarks against vhost-user back ends")
    sub = p.add_subparsers(dest="bench_target", metavar="TARGET", required=True)
    b = sub.add_parser("blk", help="fio-like load on a vhost-user-blk socket",
                       description=__doc__.split("\n\n")[0])
    b.add_argument("--socket-path", required=True, metavar="PATH")
    b.add_argument("--rw", choices=RW_MODES, default="randread")
    b.add_argument("--bs", default="4k", help="block size (default 4k)")
    b.add_argument("--iodepth", type=int, default=32, help="requests in flight (default 32)")
    b.add_argument("--seconds", type=float, default=10.0, help="run time (default 10)")
    b.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds first")
    b.add_argument("--queue-size", type=int, default=256, help="ring size (default 256)")
    b.add_argument("--spin-us", type=float, default=0.0, metavar="US",
                   help="busy-poll for completions this long before sleeping (default 0)")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.set_defaults(func=run_blk)
