"""``pyvirtio rng``: the ``pyvirtio-rng`` back end as a sub-command (same options).

Wiring only: the device and its command line are :mod:`pyvirtio.devices.rng`.
"""

from __future__ import annotations

import argparse
import functools

from pyvirtio.devices import rng
from pyvirtio.transports.commandline import ExamplesHelpFormatter

DESCRIPTION = "virtio entropy device (VIRTIO 1.2 §5.4) as a vhost-user back end"
EPILOG = """example:
  pyvirtio rng --socket-path /tmp/rng.sock --max-bytes 4096 --period-ms 1000
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
      -numa node,memdev=mem -chardev socket,id=r0,path=/tmp/rng.sock \\
      -device vhost-user-rng-pci,chardev=r0
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("rng", help="serve a virtio entropy device (vhost-user-rng)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=ExamplesHelpFormatter)
    p.set_defaults(func=functools.partial(rng.run, rng.program("pyvirtio rng", p)))
