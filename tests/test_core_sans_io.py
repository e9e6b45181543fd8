"""pyvirtio.core is sans-I/O (docs/architecture.md "Core is sans-I/O").

No module of core may import socket, selectors, asyncio or subprocess: checked
statically (AST of every file) and dynamically (a fresh interpreter that
imports every module of pyvirtio.core, then looks at ``sys.modules``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pyvirtio.core

FORBIDDEN = {"socket", "selectors", "asyncio", "subprocess"}
CORE_DIR = Path(pyvirtio.core.__file__).parent
CORE_FILES = sorted(CORE_DIR.rglob("*.py"))


def _is_dynamic_import(func: ast.expr) -> bool:
    """``__import__(...)`` or ``importlib.import_module(...)``."""
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                roots.add(arg.value.split(".")[0])
    return roots


def test_core_has_modules_to_scan() -> None:
    names = {p.name for p in CORE_FILES}
    assert {"split_device.py", "split_driver.py", "layout.py", "memory.py"} <= names


@pytest.mark.parametrize("path", CORE_FILES, ids=lambda p: str(p.relative_to(CORE_DIR)))
def test_no_forbidden_import_in_source(path: Path) -> None:
    bad = _imported_roots(path) & FORBIDDEN
    assert not bad, f"{path} imports {sorted(bad)}"


def test_ast_scan_catches_forbidden_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nimport socket as s\nfrom asyncio import run\n"
                      "import importlib\nimportlib.import_module('selectors')\n")
    assert _imported_roots(sample) & FORBIDDEN == {"socket", "asyncio", "selectors"}


_PROBE = """
import importlib, json, pkgutil, sys
forbidden = {forbidden!r}
before = sorted(forbidden & set(sys.modules))
import pyvirtio.core
mods = ["pyvirtio.core"]
for info in pkgutil.walk_packages(pyvirtio.core.__path__, "pyvirtio.core."):
    importlib.import_module(info.name)
    mods.append(info.name)
print(json.dumps({{"before": before, "after": sorted(forbidden & set(sys.modules)),
                  "modules": mods}}))
"""


@pytest.mark.timeout(60)
def test_importing_core_loads_no_io_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(forbidden=FORBIDDEN)],
        capture_output=True, text=True, timeout=50, check=True,
    )
    result = json.loads(out.stdout)
    assert result["before"] == []  # the probe is meaningful: none was loaded at start-up
    assert result["after"] == [], f"importing pyvirtio.core loaded {result['after']}"
    expected = {"pyvirtio.core." + p.stem for p in CORE_FILES if p.stem != "__init__"}
    assert expected <= set(result["modules"])
