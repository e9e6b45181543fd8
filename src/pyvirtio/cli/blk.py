"""``pyvirtio blk`` and ``pyvirtio-blk``: serve a disk image as a vhost-user-blk back end.

The back-end program conventions (``--socket-path``/``--fd``,
``--print-capabilities`` with type "block" and features "read-only" and
"blk-file", SIGTERM) come from
:class:`~pyvirtio.transports.vhost_user.program.BackendProgram`; the
vhost-user-blk options ``--blk-file`` and ``--read-only`` are QEMU's.
A vhost-user socket serves one front end, so one process serves several
disks by repeating ``--socket-path`` (or ``--fd``) with one ``--blk-file``
each, paired in order (or one ``--null SIZE``: a null disk per socket); the
other options apply to every disk, and every disk is a device of its own
(its own store and engine) on the one event loop.
Wiring only: the device is :class:`pyvirtio.devices.blk.device.BlkDevice`.
"""

from __future__ import annotations

import argparse
import errno
import sys

from pyvirtio.cli.common import backend_main, register_backend
from pyvirtio.core.errors import CallerError
from pyvirtio.devices.blk.engine import DEFAULT_WORKERS
from pyvirtio.devices.blk.workload import parse_size
from pyvirtio.transports.vhost_user.program import BackendProgram, Endpoint

DESCRIPTION = "vhost-user-blk back end in Python (pyvirtio): serve a disk image to a VM"
EPILOG = """examples:
  pyvirtio-blk --socket-path /tmp/blk.sock --blk-file disk.img
  qemu-system-x86_64 -m 512 -object memory-backend-memfd,id=mem,size=512M,share=on \\
      -numa node,memdev=mem -chardev socket,id=c0,path=/tmp/blk.sock \\
      -device vhost-user-blk-pci,chardev=c0 ...
  # several disks from one process: --blk-file pairs with --socket-path, in order
  pyvirtio-blk --socket-path /tmp/a.sock --blk-file a.img \\
      --socket-path /tmp/b.sock --blk-file b.img --aio threads
"""
CAPABILITIES = ("read-only", "blk-file")
SERIAL_MAX = 20  # VIRTIO_BLK_ID_BYTES


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except CallerError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 512M or 4G") from None


def _program(prog: str, parser: argparse.ArgumentParser | None = None) -> BackendProgram:
    program = BackendProgram(prog, DESCRIPTION, "block", CAPABILITIES, epilog=EPILOG,
                             binary="pyvirtio-blk", parser=parser, several_sockets=True)
    p = program.parser
    blk = p.add_argument_group("vhost-user-blk")
    blk.add_argument("--blk-file", metavar="PATH", action="append",
                     help="disk image or block device to serve; repeat it with --socket-path "
                          "(or --fd): the Nth image is served on the Nth socket")
    blk.add_argument("--null", metavar="SIZE", type=_size,
                     help="serve a null disk of SIZE (512M, 4G...) instead of a file: reads "
                          "return zeros, writes are dropped (qemu-storage-daemon's null-co); "
                          "one per socket")
    blk.add_argument("--latency-us", type=float, default=0.0, metavar="US",
                     help="with --null: every request takes this long (null-co latency-ns); "
                          "with --blk-file and --aio threads: every read and write takes this "
                          "long in a worker (a slow disk: requests stay in flight, for restart "
                          "tests)")
    blk.add_argument("--aio", choices=("threads", "io_uring", "sync"), default="sync",
                     help="sync: each request in the event loop, in order (safe across a "
                          "back-end restart even for a front end without inflight tracking: "
                          "it resumes from the used index); threads: many requests in flight "
                          "in a pool of workers (QEMU aio=threads), for slow storage, completed "
                          "out of order (safe across a restart with inflight tracking, which "
                          "QEMU's vhost-user-blk uses); io_uring: many in flight in the "
                          "kernel's io_uring (QEMU aio=io_uring; needs pyvirtio[uring]), "
                          "completed out of order like threads")
    blk.add_argument("--aio-workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                     help=f"worker threads of --aio threads (default {DEFAULT_WORKERS})")
    blk.add_argument("--cache", choices=("writeback", "none"), default="writeback",
                     help="none: O_DIRECT, bypass the host page cache; writeback: through "
                          "it (QEMU's terms; FLUSH is fdatasync either way)")
    blk.add_argument("--read-only", action="store_true",
                     help="offer VIRTIO_BLK_F_RO and never open the image for writing")
    blk.add_argument("--num-queues", type=int, default=1, metavar="N",
                     help="request queues, 1..256 (VIRTIO_BLK_F_MQ when > 1)")
    blk.add_argument("--queue-size", type=int, default=1024, metavar="N",
                     help="largest ring size accepted, a power of two up to 32768")
    blk.add_argument("--serial", default="pyvirtio-blk",
                     help="the disk's serial number (GET_ID), at most 20 ASCII characters")
    blk.add_argument("--batch", type=int, default=16, metavar="N",
                     help="complete and interrupt after half of the waiting requests, at most "
                          "N, so the driver refills the ring meanwhile (0: all available at "
                          "once)")
    return program


def run(args: argparse.Namespace, program: BackendProgram) -> int:
    program.check_args(args)
    if not args.blk_file and args.null is None:
        program.error("--blk-file is required: the disk image to serve (or --null SIZE)")
    if args.blk_file and args.null is not None:
        program.error("--blk-file and --null exclude each other")
    places = program.endpoints_of(args)
    if args.blk_file and len(args.blk_file) != len(places):
        program.error(f"{len(args.blk_file)} --blk-file for {len(places)} socket(s): give one "
                      f"--blk-file per --socket-path/--fd, paired in order")
    if args.latency_us < 0 or (args.latency_us and args.null is None and args.aio != "threads"):
        program.error("--latency-us takes a latency of 0 or more, with --null or --aio threads")
    if args.null is not None and args.null < 512:
        program.error(f"--null {args.null}: a disk has at least one 512-byte sector")
    if args.aio == "io_uring" and args.null is not None:
        program.error("--aio io_uring serves a --blk-file (a null disk has no file to read: "
                      "use --aio threads)")
    if args.aio_workers < 1:
        program.error(f"--aio-workers {args.aio_workers}: use 1 or more")
    if not 1 <= args.num_queues <= 256:
        program.error(f"--num-queues {args.num_queues}: use 1..256")
    if args.queue_size < 1 or args.queue_size > 32768 or args.queue_size & (args.queue_size - 1):
        program.error(f"--queue-size {args.queue_size}: use a power of two from 1 to 32768")
    if not args.serial.isascii() or len(args.serial) > SERIAL_MAX:
        program.error(f"--serial {args.serial!r}: use at most {SERIAL_MAX} ASCII characters")
    if args.batch < 0:
        program.error(f"--batch {args.batch}: use 0 (everything at once) or more")

    from pyvirtio.devices.blk.device import BlkDevice
    from pyvirtio.devices.blk.engine import AsyncEngine, ThreadEngine
    from pyvirtio.devices.blk.file_store import DirectIOUnsupported, FileStore, SlowFileStore
    from pyvirtio.devices.blk.null_store import NullStore
    from pyvirtio.devices.blk.store import Store
    from pyvirtio.devices.blk.uring_engine import UringEngine, UringUnavailable

    devices: list[BlkDevice] = []
    stores: list[Store] = []
    try:
        for blk_file in args.blk_file or [None] * len(places):
            store: Store
            try:
                if args.null is not None:
                    store = NullStore(args.null, args.latency_us / 1e6)
                else:
                    store = (SlowFileStore(blk_file, args.latency_us / 1e6, args.read_only,
                                           direct=args.cache == "none") if args.latency_us else
                             FileStore(blk_file, read_only=args.read_only,
                                       direct=args.cache == "none"))
            except DirectIOUnsupported as exc:
                return program.fail(str(exc.strerror))
            except OSError as exc:
                hint = ""
                if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM) and not args.read_only:
                    hint = "; to serve it read-only use --read-only"
                return program.fail(f"cannot open {blk_file}: {exc.strerror}{hint}")
            stores.append(store)
            if store.capacity == 0:
                return program.fail(f"{blk_file} is smaller than one 512-byte sector: "
                                    f"give it a size first (truncate -s 64M {blk_file})")
            # Each disk its own engine: a slow disk's workers never hold up another's.
            engine: AsyncEngine | None = None
            if args.aio == "threads":
                engine = ThreadEngine(args.aio_workers)
            elif args.aio == "io_uring":
                try:
                    engine = UringEngine()
                except UringUnavailable as exc:
                    return program.fail(str(exc))
            devices.append(BlkDevice(store, num_queues=args.num_queues,
                                     queue_size=args.queue_size, serial=args.serial,
                                     batch=args.batch, engine=engine))
        endpoints: list[Endpoint] = [(device, path, fd) for device, (path, fd)
                                     in zip(devices, places, strict=True)]
        return program.serve_all(endpoints, args)
    finally:
        for store in stores:
            store.close()


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    register_backend(subparsers, "blk", "serve a disk image as a vhost-user-blk back end",
                     DESCRIPTION, EPILOG, _program, run)


def main(argv: list[str] | None = None) -> int:
    """The ``pyvirtio-blk`` console script."""
    return backend_main("pyvirtio-blk", _program, run, argv)


if __name__ == "__main__":
    sys.exit(main())
