"""numpy is optional: the core runs without it, pyvirtio.batch says what to install.

``pyproject.toml`` keeps numpy (``batch``) and matplotlib (``plot``) out of
the dependencies of the core; ``dev`` (what bootstrap installs) has both.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_WITHOUT_NUMPY = """
import sys
sys.modules["numpy"] = None          # import numpy -> ImportError, as if not installed
sys.modules["matplotlib"] = None
import importlib, pkgutil
import pyvirtio.core
for m in pkgutil.iter_modules(pyvirtio.core.__path__, "pyvirtio.core."):
    importlib.import_module(m.name)
import pyvirtio.transports.inprocess, pyvirtio.transports.pci_legacy
from pyvirtio._build import build_kind
print(build_kind())
try:
    import pyvirtio.batch
except ImportError as exc:
    print("batch:", exc)
else:
    print("batch imported")
"""


def test_core_imports_without_numpy_and_batch_says_what_to_install() -> None:
    res = subprocess.run([sys.executable, "-c", _WITHOUT_NUMPY], capture_output=True,
                         text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    kind, batch = res.stdout.strip().splitlines()
    assert kind in ("compiled", "interpreted")
    assert batch.startswith("batch: pyvirtio.batch needs numpy")
    assert "pip install 'pyvirtio[batch]'" in batch


def test_numpy_and_matplotlib_are_extras_that_dev_includes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
             for d in project["dependencies"]}
    assert "numpy" not in names and "matplotlib" not in names
    assert "rich" in names
    extras = project["optional-dependencies"]
    assert any(d.startswith("numpy") for d in extras["batch"])
    assert any(d.startswith("matplotlib") for d in extras["plot"])
    dev_extras = {e for d in extras["dev"] if d.startswith("pyvirtio[")
                  for e in d[len("pyvirtio["):-1].split(",")}
    assert {"batch", "plot"} <= dev_extras


def test_every_command_starts_without_numpy_or_matplotlib() -> None:
    """The command line (every sub-command's module) imports without the extras."""
    code = ("import sys\nsys.modules['numpy'] = None\nsys.modules['matplotlib'] = None\n"
            "from pyvirtio.cli.main import build_parser\n"
            "p = build_parser()\nprint(p.prog)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "pyvirtio"
