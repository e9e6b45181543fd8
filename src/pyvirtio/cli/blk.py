"""``pyvirtio blk`` and ``pyvirtio-blk``: serve a disk image as a vhost-user-blk back end.

Follows QEMU docs/interop/vhost-user.rst "Backend program conventions":
``--socket-path`` or ``--fd`` (an inherited listening socket),
``--print-capabilities`` (the ``VHostUserBackendCapabilities`` JSON of
docs/interop/vhost-user.json: type "block", features "read-only" and
"blk-file"), the vhost-user-blk options ``--blk-file`` and ``--read-only``;
exit status != 0 when start-up fails; SIGTERM ends the program cleanly.
``--print-descriptor`` prints the ``VhostUserBackend`` JSON descriptor
(the file ``pyvirtio/data/50-pyvirtio-blk.json``) with the binary path of
this installation, ready for /usr/share/qemu/vhost-user/ or
/etc/qemu/vhost-user/.  Wiring only: the device is
:class:`pyvirtio.devices.blk.device.BlkDevice`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from importlib import resources
from types import FrameType

log = logging.getLogger("pyvirtio.blk")

CAPABILITIES = {"type": "block", "features": ["read-only", "blk-file"]}
DESCRIPTOR = "50-pyvirtio-blk.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket-path", metavar="PATH",
                       help="listen for the front end on this Unix socket")
    where.add_argument("--fd", type=int, metavar="FDNUM",
                       help="inherited, already listening Unix socket")
    p.add_argument("--blk-file", metavar="PATH", help="disk image or block device")
    p.add_argument("--read-only", action="store_true",
                   help="offer VIRTIO_BLK_F_RO and never open the image for writing")
    p.add_argument("--num-queues", type=int, default=1, metavar="N",
                   help="request queues (VIRTIO_BLK_F_MQ when > 1; default 1)")
    p.add_argument("--queue-size", type=int, default=1024, metavar="N",
                   help="largest ring size accepted (default 1024)")
    p.add_argument("--serial", default="pyvirtio-blk", help="GET_ID string (<= 20 ASCII)")
    p.add_argument("--batch", type=int, default=16, metavar="N",
                   help="complete and interrupt after half of the waiting requests, at "
                        "most N, so the driver refills the ring meanwhile (0: all "
                        "available at once; default 16)")
    p.add_argument("--poll", action="store_true",
                   help="busy-poll the rings (spin, then sleep) instead of waiting for kicks")
    p.add_argument("--print-capabilities", action="store_true",
                   help="print the back-end capabilities as JSON and exit")
    p.add_argument("--print-descriptor", action="store_true",
                   help="print the vhost-user.json descriptor for this installation and exit")


def descriptor() -> dict[str, object]:
    raw = resources.files("pyvirtio.data").joinpath(DESCRIPTOR).read_text()
    desc: dict[str, object] = json.loads(raw)
    binary = shutil.which("pyvirtio-blk") or os.path.join(os.path.dirname(sys.executable),
                                                          "pyvirtio-blk")
    desc["binary"] = os.path.abspath(binary)
    return desc


def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    if args.print_descriptor:
        print(json.dumps(descriptor(), indent=2))
        return 0
    if args.socket_path is None and args.fd is None:
        print("pyvirtio-blk: one of --socket-path or --fd is required", file=sys.stderr)
        return 2
    if not args.blk_file:
        print("pyvirtio-blk: --blk-file is required", file=sys.stderr)
        return 2
    if not 1 <= args.num_queues <= 256:
        print("pyvirtio-blk: --num-queues must be in 1..256", file=sys.stderr)
        return 2

    from pyvirtio.devices.blk.backend_file import FileBackend
    from pyvirtio.devices.blk.device import BlkDevice
    from pyvirtio.transports.vhost_user.server import VhostUserServer

    try:
        backend = FileBackend(args.blk_file, read_only=args.read_only)
    except OSError as exc:
        print(f"pyvirtio-blk: cannot open {args.blk_file}: {exc}", file=sys.stderr)
        return 1
    device = BlkDevice(backend, num_queues=args.num_queues, queue_size=args.queue_size,
                       serial=args.serial, batch=max(0, args.batch))
    try:
        server = VhostUserServer(device, socket_path=args.socket_path, listen_fd=args.fd,
                                 poll=args.poll)
    except OSError as exc:
        print(f"pyvirtio-blk: cannot listen: {exc}", file=sys.stderr)
        backend.close()
        return 1
    log.info("serving %s (%d sectors%s) on %s with %d queue(s)%s", args.blk_file,
             backend.capacity, ", read-only" if args.read_only else "",
             args.socket_path or f"fd {args.fd}", args.num_queues,
             ", polling" if args.poll else "")

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        log.info("SIGTERM: stopping")
        server.stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("interrupted: stopping")
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.stop()
        backend.close()
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("blk", help="serve a disk image as a vhost-user-blk back end",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """The ``pyvirtio-blk`` console script."""
    p = argparse.ArgumentParser(prog="pyvirtio-blk",
                                description="vhost-user-blk back end in Python (pyvirtio)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
