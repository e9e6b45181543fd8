"""The README's ring example runs as written, and its first lines are the two set-up commands."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text()
    first_block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first_block is not None
    lines = [ln for ln in first_block.group(1).splitlines() if ln.strip()]
    assert lines[0].startswith("bash scripts/bootstrap.sh && .venv/bin/pyvirtio demo")
    assert lines[1].startswith("bash scripts/test.sh")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_readme_ring_example_runs() -> None:
    text = README.read_text()
    section = text.split("### Use the rings directly", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    assert "drv" in namespace and "dev" in namespace


def test_readme_device_tutorial_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text.split("### Serve your own device", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None and "class Upper(Device)" in code.group(1)
    monkeypatch.chdir(tmp_path)  # the script makes upper.sock in the current directory
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    server = namespace["server"]
    assert getattr(server, "connections", 0) == 1
    deadline = time.monotonic() + 5  # stop() ends the server thread soon, not at once
    while (tmp_path / "upper.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (tmp_path / "upper.sock").exists()


def test_readme_shows_the_rng_device_as_it_is() -> None:
    text = README.read_text()
    source = (README.parent / "src" / "pyvirtio" / "devices" / "rng.py").read_text()
    assert f"```python\n{source}```" in text, "README's rng listing differs from the file"
    assert len(source.splitlines()) <= 80
