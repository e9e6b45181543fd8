"""The two builds of the ring's hot paths (setup.py, pyvirtio/_build.py).

The suite runs against what setup.py installed — the mypyc-compiled
modules — and this file checks that it really is that build, that the
extensions are not older than their source, and that the interpreted
source (``PYVIRTIO_PURE_PYTHON=1``) passes the core tests too.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from pyvirtio import _build

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = [
    "tests/test_barrier.py",
    "tests/test_garbage_ring.py",
    "tests/test_layout.py",
    "tests/test_memory.py",
    "tests/test_notify.py",
    "tests/test_packed_device.py",
    "tests/test_packed_driver.py",
    "tests/test_packed_garbage.py",
    "tests/test_packed_layout.py",
    "tests/test_ring_statemachine.py",
    "tests/test_seed_example.py",
    "tests/test_split_device.py",
    "tests/test_split_driver.py",
]


def _expect_compiled() -> bool:
    return not (os.environ.get("PYVIRTIO_NO_MYPYC") or _build.pure_python_requested())


def test_the_suite_runs_the_build_setup_py_made() -> None:
    expected = "compiled" if _expect_compiled() else "interpreted"
    assert _build.build_kind() == expected


def test_compiled_extensions_are_not_older_than_their_source() -> None:
    if not _expect_compiled():
        assert _build.build_kind() == "interpreted"  # nothing compiled to go stale
        return
    for name in _build.COMPILED_MODULES:
        ext = Path(str(importlib.import_module(name).__file__))
        source = ext.parent / (name.rpartition(".")[2] + ".py")
        assert ext.suffix == ".so", name
        assert ext.stat().st_mtime >= source.stat().st_mtime, (
            f"{ext.name} is older than {source.name}: run scripts/bootstrap.sh to rebuild")


def test_setup_py_compiles_exactly_the_listed_modules() -> None:
    text = (ROOT / "setup.py").read_text()
    assert "COMPILED_MODULES" in text  # one list, imported from pyvirtio._build
    for name in _build.COMPILED_MODULES:
        assert (ROOT / "src" / (name.replace(".", "/") + ".py")).is_file(), name


def test_pure_python_mode_imports_source_and_passes_the_core_tests() -> None:
    env = dict(os.environ, PYVIRTIO_PURE_PYTHON="1")
    probe = subprocess.run(
        [sys.executable, "-c",
         "import pyvirtio._build as b, pyvirtio.core.split_device as d;"
         "print(b.build_kind(), d.__file__)"],
        env=env, capture_output=True, text=True, check=True, timeout=60)
    kind, path = probe.stdout.split()
    assert kind == "interpreted" and path.endswith("split_device.py")
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *CORE_TESTS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "ring build: interpreted" in res.stdout
    assert " passed" in res.stdout and " failed" not in res.stdout


def test_compiled_classes_stay_subclassable_from_python() -> None:
    from pyvirtio.core.layout import RingViews, SplitLayout
    from pyvirtio.core.memory import GuestMemory
    from pyvirtio.core.split_device import Element, SplitDeviceQueue
    from pyvirtio.core.split_driver import SplitDriverQueue

    class CountingDevice(SplitDeviceQueue):
        popped = 0

        def pop(self) -> Element | None:
            elem = super().pop()
            if elem is not None:
                self.popped += 1
            return elem

    class Memory(GuestMemory):
        pass

    mem = Memory.anonymous(1 << 16)
    try:
        layout = SplitLayout.legacy(0, 8)
        drv = SplitDriverQueue(RingViews.map(mem, layout))
        dev = CountingDevice(RingViews.map(mem, layout), mem)
        drv.add([(0x8000, 16)], [], "t")
        elem = dev.pop()
        assert elem is not None and dev.popped == 1 and len(elem.readable[0]) == 16
    finally:
        mem.close()
