"""One-line errors and defaults in ``--help``: what every pyvirtio command line shares.

A user's mistake ends a command with one line on stderr that names the
program, the value and what to do instead: exit status 2 for a usage error
(a value that can never work), 1 for a runtime failure (the world is not as
the command needs it: no back end listening, a busy back end, a socket path
taken).  Used by :mod:`pyvirtio.cli` and by the back-end program conventions
(:mod:`pyvirtio.transports.vhost_user.program`) that every device program uses.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

__all__ = ["FAILURE", "USAGE", "ExamplesHelpFormatter", "HelpFormatter", "Parser", "failure",
           "one_line", "usage_error"]

USAGE = 2
FAILURE = 1


def one_line(text: str) -> str:
    return " ".join(text.split())


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help (unless there is none to show)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        # (Identity, not ==: a default of 0 is worth showing, False of a flag is not.)
        if ("%(default)" in text or not action.option_strings
                or any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            return text
        return f"{text} (default: %(default)s)"


class ExamplesHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description and epilog as written (examples)."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: ``PROG: error: MESSAGE``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, message)
        sys.exit(USAGE)


def usage_error(prog: str, message: str) -> int:
    """Print a usage error of ``prog`` (one line) and return its exit status, 2."""
    print(f"{prog}: error: {one_line(message)} (see {prog} --help)", file=sys.stderr)
    return USAGE


def failure(prog: str, message: str) -> int:
    """Print a runtime failure of ``prog`` (one line) and return its exit status, 1."""
    print(f"{prog}: {one_line(message)}", file=sys.stderr)
    return FAILURE
