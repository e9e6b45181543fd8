"""What every console command shares: one-line errors, defaults in --help, value checks.

A user's mistake ends a command with one line on stderr that names the
program, the value and what to do instead: exit status 2 for a usage error
(a value that can never work), 1 for a runtime failure (the world is not as
the command needs it: no back end listening, a busy back end).
"""

from __future__ import annotations

import argparse
import functools
import os
import stat
from collections.abc import Callable

from pyvirtio.core.layout import is_valid_queue_size
from pyvirtio.transports.commandline import (
    FAILURE,
    USAGE,
    ExamplesHelpFormatter,
    HelpFormatter,
    Parser,
    failure,
    one_line,
    usage_error,
)

# The one-line-error parser lives with the back-end program conventions, which
# every device program (blk, net, rng, input) uses too.
from pyvirtio.transports.vhost_user.program import BackendProgram

__all__ = ["FAILURE", "USAGE", "HelpFormatter", "Parser", "connect_problem", "failure",
           "non_negative_float", "one_line", "positive_float", "positive_int", "queue_size",
           "socket_problem", "usage_error"]


# ------------------------------------------------------------- argument types
def _number(kind: Callable[[str], float], text: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give 0 or more")
    return value


def positive_int(text: str) -> int:
    value = int(_number(int, text))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def queue_size(minimum: int = 2) -> Callable[[str], int]:
    """An argparse type: a virtqueue size, a power of two in ``minimum``..32768 (§2.7)."""

    def parse(text: str) -> int:
        value = int(_number(int, text))
        if value < minimum or not is_valid_queue_size(value):
            raise argparse.ArgumentTypeError(
                f"{text} is not a queue size: use a power of two in {minimum}..32768")
        return value

    return parse


# ------------------------------------------------------- vhost-user sockets
def socket_problem(path: str) -> str | None:
    """Why ``path`` cannot be a back end's listening socket, or None if it can be."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"no vhost-user socket at {path}: start a back end first"
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" \
            if stat.S_ISREG(mode) else "not a socket"
        return (f"{path} is {kind}, not a vhost-user socket: give the socket path a back end "
                f"listens on")
    return None


def connect_problem(path: str, exc: BaseException) -> str:
    """One line about a failure to talk to the back end at ``path``."""
    from pyvirtio.transports.vhost_user.frontend import VhostUserBusy

    if isinstance(exc, VhostUserBusy):
        return (f"{path}: back end busy (it serves another front end?): stop that front end "
                f"or start another back end")
    if isinstance(exc, ConnectionRefusedError):
        return (f"nothing listens on {path} (left behind by a back end that exited?): "
                f"start a back end first")
    if isinstance(exc, FileNotFoundError):
        return f"no vhost-user socket at {path}: start a back end first"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{path}: {exc.strerror}"
    return f"{path}: {exc}"


# ------------------------------------------------------- back-end programs
MakeProgram = Callable[[str, "argparse.ArgumentParser | None"], BackendProgram]
#: ``run(args, program)``; called with ``program`` by keyword.
RunProgram = Callable[..., int]


def register_backend(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
                     name: str, help: str, description: str, epilog: str,
                     make: MakeProgram, run: RunProgram) -> None:
    """``pyvirtio NAME``: the same program as its console script, as a sub-command."""
    p = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                              formatter_class=ExamplesHelpFormatter)
    program = make(f"pyvirtio {name}", p)
    p.set_defaults(func=functools.partial(run, program=program))


def backend_main(prog: str, make: MakeProgram, run: RunProgram,
                 argv: list[str] | None = None) -> int:
    """The console script ``prog`` of a back-end program."""
    program = make(prog, None)
    return run(program.parser.parse_args(argv), program=program)
