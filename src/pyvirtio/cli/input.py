"""``pyvirtio input`` and ``pyvirtio-input``: a virtio keyboard as a vhost-user back end.

``pyvirtio input serve`` (= ``pyvirtio-input``) serves the device with the
back-end program conventions (``--print-capabilities`` says type "input");
``pyvirtio input type TEXT --control-socket PATH`` types on a running one.
Wiring only: the device is :mod:`pyvirtio.devices.input`.
"""

from __future__ import annotations

import argparse
import functools
import sys

from pyvirtio.transports.commandline import ExamplesHelpFormatter, failure
from pyvirtio.transports.vhost_user.program import BackendProgram

DESCRIPTION = "virtio keyboard (VIRTIO 1.2 §5.8) as a vhost-user-input back end"
EPILOG = """example:
  pyvirtio-input --socket-path /tmp/kbd.sock --control-socket /tmp/kbd.ctl
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
      -numa node,memdev=mem -chardev socket,id=k0,path=/tmp/kbd.sock \\
      -device vhost-user-input-pci,chardev=k0
  pyvirtio input type "hello" --control-socket /tmp/kbd.ctl
"""


def _program(prog: str, parser: argparse.ArgumentParser | None = None) -> BackendProgram:
    program = BackendProgram(prog, DESCRIPTION, "input", epilog=EPILOG, binary="pyvirtio-input",
                             parser=parser)
    kbd = program.parser.add_argument_group("keyboard")
    kbd.add_argument("--control-socket", metavar="PATH",
                     help="Unix socket on which 'pyvirtio input type' sends text to type")
    kbd.add_argument("--stdin", action="store_true",
                     help="type every line read from stdin, Enter included")
    kbd.add_argument("--name", default="pyvirtio keyboard",
                     help="the device name the guest sees (ID_NAME)")
    kbd.add_argument("--serial", default="pyvirtio-kbd", help="its serial (ID_SERIAL)")
    kbd.add_argument("--backlog", type=int, default=4096, metavar="N",
                     help="events kept while the guest posts no buffers; more are dropped")
    return program


def serve(args: argparse.Namespace, program: BackendProgram) -> int:
    program.check_args(args)
    if args.backlog < 1:
        program.error(f"--backlog {args.backlog}: keep at least 1 event")
    from pyvirtio.core.errors import CallerError
    from pyvirtio.devices.input import InputDevice, keyboard_config

    try:
        device = InputDevice(keyboard_config(args.name, args.serial), backlog=args.backlog,
                             control_socket=args.control_socket, stdin=args.stdin)
    except CallerError as exc:
        program.error(str(exc))
    try:
        return program.serve(device, args)
    finally:
        device.close()


def type_command(args: argparse.Namespace) -> int:
    from pyvirtio.devices.input import type_text

    prog = "pyvirtio input type"
    try:
        reply = type_text(args.control_socket, args.text)
    except (OSError, ValueError) as exc:
        return failure(prog, f"{args.control_socket}: {exc}")
    if not reply.startswith("ok"):
        return failure(prog, reply or "the back end closed the control socket without answer")
    print(reply)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("input", help="a virtio keyboard: serve it, type on it",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=ExamplesHelpFormatter)
    sub = p.add_subparsers(dest="input_command", metavar="COMMAND", required=True)
    s = sub.add_parser("serve", help="serve the keyboard (same as pyvirtio-input)",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=ExamplesHelpFormatter)
    s.set_defaults(func=functools.partial(serve, program=_program("pyvirtio input serve", s)))
    t = sub.add_parser("type", help="type text on a running pyvirtio-input",
                       description="Send TEXT to a running pyvirtio-input's control socket; "
                                   "it types it (US layout: printable ASCII, \\n, \\t).",
                       formatter_class=ExamplesHelpFormatter)
    t.add_argument("text", help="what to type")
    t.add_argument("--control-socket", required=True, metavar="PATH",
                   help="the back end's --control-socket")
    t.set_defaults(func=type_command)


def main(argv: list[str] | None = None) -> int:
    """The ``pyvirtio-input`` console script."""
    program = _program("pyvirtio-input")
    return serve(program.parser.parse_args(argv), program)


if __name__ == "__main__":
    sys.exit(main())
