"""The ``pyvirtio`` console script: every sub-command is listed and explains itself."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pyvirtio import __version__
from pyvirtio._build import build_kind
from pyvirtio.cli.main import _COMMANDS, build_parser


def test_help_lists_every_subcommand() -> None:
    text = build_parser().format_help()
    for name in _COMMANDS:
        assert name in text


@pytest.mark.parametrize("name", _COMMANDS)
def test_each_subcommand_has_a_description(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pyvirtio {name}")
    assert len(out.splitlines()) > 3


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser under ``parser`` that runs a command (``pyvirtio bench blk``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in action.choices.values():
            yield from _commands(child)


COMMANDS = {p.prog: p for p in _commands(build_parser())}


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_every_option_is_explained_with_its_default(prog: str) -> None:
    parser = COMMANDS[prog]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{prog} {action.option_strings}: no help text"
        if action.option_strings and not any(
                action.default is v for v in (None, False, argparse.SUPPRESS)):
            # The rendered help of this option, up to the next option.
            opt = action.option_strings[-1]
            entry = text.split(f"  {opt}", 1)[1].split("\n  -", 1)[0]
            assert "default" in entry, f"{prog} {opt}: default {action.default!r} not shown"


@pytest.mark.parametrize("prog", sorted(COMMANDS))
def test_help_is_plain_text(prog: str) -> None:
    text = COMMANDS[prog].format_help()
    assert "``" not in text and ":mod:" not in text and ":func:" not in text


def test_version_from_the_installed_script() -> None:
    out = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"pyvirtio {__version__} (ring hot paths: {build_kind()})"
