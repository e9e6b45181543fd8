"""The ``pyvirtio`` console script: every sub-command is listed and explains itself."""

from __future__ import annotations

import subprocess
import sys

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


def test_version_from_the_installed_script() -> None:
    out = subprocess.run([sys.executable, "-m", "pyvirtio.cli.main", "--version"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"pyvirtio {__version__} (ring hot paths: {build_kind()})"
