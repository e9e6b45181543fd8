"""``pyvirtio bench blk``: fio-like load on a vhost-user-blk back end.

Connects pyvirtio's virtio-blk driver (VIRTIO 1.2 §5.2) as a vhost-user
front end and runs :func:`pyvirtio.devices.blk.workload.run_workload`:
IOPS, MiB/s, latency percentiles, and kicks and interrupts per 1,000
requests (what notification suppression, §2.7.10, saved).

``pyvirtio bench net``: pyvirtio's virtio-net driver (§5.1) as a traffic
generator / sink on a vhost-user-net back end
(:func:`pyvirtio.devices.net.workload.run_net_bench`).  Wiring only.
"""

from __future__ import annotations

import argparse
import json
import sys

from pyvirtio.cli.common import (
    connect_problem,
    failure,
    non_negative_float,
    positive_float,
    positive_int,
    queue_size,
    socket_problem,
    usage_error,
)
from pyvirtio.core.errors import CallerError
from pyvirtio.devices.blk.workload import RW_MODES, format_fio, parse_size, run_workload
from pyvirtio.devices.net.workload import MODES as NET_MODES
from pyvirtio.devices.net.workload import check_size

PROG = "pyvirtio bench blk"
NET_PROG = "pyvirtio bench net"


def _block_size(text: str) -> int:
    try:
        return parse_size(text)
    except CallerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_blk(args: argparse.Namespace) -> int:
    from pyvirtio.devices.blk.driver import BlkDriver

    path = args.socket_path
    if args.rw.endswith("write") and not args.allow_writes:
        return usage_error(PROG, f"--rw {args.rw} overwrites the disk behind {path} with "
                                 f"random blocks (its data is lost): add --allow-writes if "
                                 f"nothing on it matters")
    # A request takes two descriptors (header+data, status), so the ring holds half as many.
    if args.iodepth > args.queue_size // 2:
        return usage_error(PROG, f"--iodepth {args.iodepth} does not fit a ring of "
                                 f"--queue-size {args.queue_size} (2 descriptors per request): "
                                 f"use --iodepth {args.queue_size // 2} or less, or a larger "
                                 f"--queue-size")
    problem = socket_problem(path)
    if problem is not None:
        return failure(PROG, problem)
    try:
        with BlkDriver.connect(path, queue_size=args.queue_size,
                               max_io=max(args.bs, 4096), spin=args.spin_us / 1e6,
                               packed=args.packed) as drv:
            result = run_workload(drv, args.rw, args.bs, args.iodepth, args.seconds,
                                  warmup=args.warmup, allow_writes=args.allow_writes)
    except Exception as exc:  # a CLI reports every failure in one line
        return failure(PROG, connect_problem(path, exc))
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_fio(result))
    return 1 if result.errors else 0


def _frame_size(text: str) -> int:
    try:
        return check_size(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    except CallerError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_net(args: argparse.Namespace) -> int:
    from pyvirtio.devices.net.driver import NetDriver
    from pyvirtio.devices.net.workload import format_result, live_progress, run_net_bench

    path = args.socket_path
    problem = socket_problem(path)
    if problem is not None:
        return failure(NET_PROG, problem)
    try:
        with NetDriver.connect(path, queue_size=args.queue_size, packed=args.packed) as drv, \
                live_progress(sys.stderr.isatty()) as progress:
            result = run_net_bench(drv, args.mode, args.size, args.seconds, batch=args.batch,
                                   progress=progress)
    except Exception as exc:  # a CLI reports every failure in one line
        return failure(NET_PROG, connect_problem(path, exc))
    print(json.dumps(result.as_dict(), indent=2) if args.json else format_result(result))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("bench", help="benchmarks against vhost-user back ends",
                              description="Benchmarks against vhost-user back ends.")
    sub = p.add_subparsers(dest="bench_target", metavar="TARGET", required=True)
    b = sub.add_parser(
        "blk", help="fio-like load on a vhost-user-blk socket",
        description="Connect pyvirtio's virtio-blk driver to a vhost-user-blk back end as its "
                    "front end and keep --iodepth requests in flight for --seconds: IOPS, "
                    "MiB/s, latency percentiles, and kicks and interrupts per 1,000 requests. "
                    "Write workloads destroy the data on the back end's disk and run only "
                    "with --allow-writes.")
    b.add_argument("--socket-path", required=True, metavar="PATH",
                   help="the Unix socket the back end listens on")
    b.add_argument("--rw", choices=RW_MODES, default="randread",
                   help="access pattern; write and randwrite overwrite the disk")
    b.add_argument("--allow-writes", action="store_true",
                   help="let --rw write/randwrite overwrite the back end's disk with random "
                        "blocks (whatever it holds is lost)")
    b.add_argument("--bs", type=_block_size, default="4k",
                   help="block size: bytes, or with k/m/g, a multiple of 512")
    b.add_argument("--iodepth", type=positive_int, default=32,
                   help="requests in flight, at most half of --queue-size")
    b.add_argument("--seconds", type=positive_float, default=10.0, help="measured run time")
    b.add_argument("--warmup", type=non_negative_float, default=0.0,
                   help="unmeasured seconds before the measurement")
    b.add_argument("--queue-size", type=queue_size(), default=256,
                   help="ring size, a power of two (2 descriptors per request)")
    b.add_argument("--spin-us", type=non_negative_float, default=0.0, metavar="US",
                   help="busy-poll for completions this long before sleeping")
    b.add_argument("--packed", action="store_true",
                   help="ask for the packed ring (VIRTIO_F_RING_PACKED, VIRTIO 1.2 §2.8) "
                        "instead of the split ring; fails if the back end does not offer it")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(func=run_blk)

    n = sub.add_parser(
        "net", help="traffic generator / sink on a vhost-user-net socket",
        description="Connect pyvirtio's virtio-net driver to a vhost-user-net back end as its "
                    "front end and move --size-byte Ethernet frames for --seconds: txonly "
                    "transmits, rxonly counts what the back end sends, io transmits and "
                    "receives what comes back (a looping or forwarding back end). Reports "
                    "packets per second, Gbit/s, drops, and kicks and interrupts per 1,000 "
                    "packets; a live progress line on stderr when it is a terminal.")
    n.add_argument("--socket-path", required=True, metavar="PATH",
                   help="the Unix socket the back end listens on")
    n.add_argument("--mode", choices=NET_MODES, default="io",
                   help="txonly: send only; rxonly: receive only; io: send and receive back")
    n.add_argument("--size", type=_frame_size, default=64,
                   help="Ethernet frame size in bytes without FCS, 60..1514")
    n.add_argument("--seconds", type=positive_float, default=5.0, help="measured run time")
    n.add_argument("--queue-size", type=queue_size(), default=256,
                   help="size of each ring (receiveq1, transmitq1), a power of two")
    n.add_argument("--batch", type=positive_int, default=64,
                   help="frames per transmit batch (one kick) and per receive call")
    n.add_argument("--packed", action="store_true",
                   help="ask for the packed ring (VIRTIO_F_RING_PACKED, VIRTIO 1.2 §2.8) "
                        "instead of the split ring; fails if the back end does not offer it")
    n.add_argument("--json", action="store_true", help="print the result as JSON")
    n.set_defaults(func=run_net)
