"""``pyvirtio demo``: a guest process and a host process over legacy virtio-pci + virtio-net.

Wiring only; the demo lives in :mod:`pyvirtio.demo` (VIRTIO 1.2 §4.1.4.8,
§5.1, notification suppression §2.7.7/§2.7.10; with ``--ring packed`` §2.8 on
the in-process transport, :mod:`pyvirtio.demo.inprocess`).
"""

from __future__ import annotations

import argparse
import json
import signal
from typing import Any

from rich.console import Console
from rich.live import Live

from pyvirtio.cli.common import positive_float, queue_size
from pyvirtio.demo.host import SUPPRESSION_MODES, DemoConfig, Snapshot, run_demo
from pyvirtio.demo.inprocess import run_inprocess_demo
from pyvirtio.demo.report import live_view, result_table


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo", help="guest and host processes exchanging frames over a shared vring",
        description="Run a virtio-net driver (guest process) against a loopback device (host "
                    "process) over legacy virtio-pci: shared memfd memory, register accesses "
                    "over a socketpair, kicks through ioeventfds, interrupts through irqfds. "
                    "With --ring packed the same driver and device run in one process over "
                    "the in-process transport instead: legacy virtio-pci has no packed ring.")
    p.add_argument("--suppression", choices=SUPPRESSION_MODES, default="event-idx",
                   help="none: never suppress; flags: VRING_USED_F_NO_NOTIFY / "
                        "VRING_AVAIL_F_NO_INTERRUPT; event-idx: VIRTIO_RING_F_EVENT_IDX")
    p.add_argument("--ring", choices=("split", "packed"), default="split",
                   help="split: VIRTIO 1.2 §2.7, guest and host processes over legacy "
                        "virtio-pci; packed: §2.8, driver and device in one process over the "
                        "in-process transport (legacy virtio-pci cannot carry a packed ring)")
    p.add_argument("--seconds", type=positive_float, default=3.0,
                   help="how long the guest sends")
    p.add_argument("--queue-size", type=queue_size(4), default=256,
                   help="size of rx and tx queues (power of two, 4..32768)")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Ctrl-C stops the demo (and its guest process) even when the parent started it
    # with SIGINT ignored or blocked (both are inherited across exec).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    config = DemoConfig(args.suppression, args.seconds, args.queue_size, args.ring)
    runner = run_inprocess_demo if args.ring == "packed" else run_demo
    err = Console(stderr=True)
    if err.is_terminal:
        with Live(console=err, auto_refresh=False, transient=True) as live:
            def tick(snap: Snapshot) -> None:
                live.update(live_view(snap, config.suppression), refresh=True)
            result = runner(config, tick)
    else:
        result = runner(config)
    data = result.to_json()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        out = Console()
        out.print(result_table(data))
        for line in data["frames"]["error_samples"] + data["errors"]:
            out.print(f"[red]error:[/red] {line}")
    return 0 if result.ok else 1
