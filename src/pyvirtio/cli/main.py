"""The ``pyvirtio`` console script: one sub-command per module in this package.

Each sub-command module defines ``register(subparsers)`` that adds its parser
and sets ``func`` (a callable taking the parsed namespace, returning an exit
status).  Wiring only: no logic lives here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pyvirtio import __version__
from pyvirtio._build import build_kind
from pyvirtio.cli.common import Parser

# Sub-command modules under pyvirtio.cli, in the order --help lists them.
_COMMANDS = ["demo", "duel", "blk", "net", "rng", "input", "probe", "bench", "torture", "top",
             "trace"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pyvirtio",
        description="virtio in Python: split virtqueues on both sides, notification "
                    "suppression, legacy virtio-pci and vhost-user transports.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    parser.add_argument("--version", action="version", help="show the version and which build "
                        "of the ring runs, then exit",
                        version=f"pyvirtio {__version__} (ring hot paths: {build_kind()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"pyvirtio.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``pyvirtio probe ... | head``): not an error worth a
        # traceback; point stdout at /dev/null so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
