"""Which build of the ring's hot paths is running: mypyc-compiled or interpreted.

``setup.py`` compiles the modules of :data:`COMPILED_MODULES` with mypyc (the
same fully typed Python source, translated to C extension modules at install
time).  Setting ``PYVIRTIO_PURE_PYTHON=1`` in the environment before
pyvirtio is imported runs their ``.py`` source instead — for debugging with
full Python tracebacks, for coverage, and to compare the two builds
(``bench/ring.py`` reports both).  Both builds pass the same tests.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

#: The modules setup.py compiles (the per-request path of both ring sides).
COMPILED_MODULES: tuple[str, ...] = (
    "pyvirtio.batch",
    "pyvirtio.core.barrier",
    "pyvirtio.core.chain",
    "pyvirtio.core.errors",
    "pyvirtio.core.layout",
    "pyvirtio.core.memory",
    "pyvirtio.core.notify",
    "pyvirtio.core.packed_device",
    "pyvirtio.core.packed_driver",
    "pyvirtio.core.packed_layout",
    "pyvirtio.core.ring_stats",
    "pyvirtio.core.split_device",
    "pyvirtio.core.split_driver",
)

PURE_ENV = "PYVIRTIO_PURE_PYTHON"


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the ``.py`` file of a compiled module even when its extension sits beside it."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES or not path:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path:
            source = os.path.join(entry, leaf)
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


class _DocumentedExtensionLoader(importlib.machinery.ExtensionFileLoader):
    """Loads a compiled module, then gives it its source docstrings (mypyc drops them)."""

    def exec_module(self, module: ModuleType) -> None:
        super().exec_module(module)
        from pyvirtio._docstrings import attach, attach_loaded

        # This module is complete only now: a module of its group that it
        # imported may have run attach_loaded while it was still half made.
        attach(module)

        # Modules of the same mypyc group that this one imported were initialised
        # natively, without passing through this loader: document them too.
        attach_loaded(COMPILED_MODULES)


class _DocstringFinder(importlib.abc.MetaPathFinder):
    """Finds the extension of a compiled module and loads it with its docstrings."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and type(spec.loader) is importlib.machinery.ExtensionFileLoader:
            spec.loader = _DocumentedExtensionLoader(spec.loader.name, spec.loader.path)
        return spec


def pure_python_requested() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def install_source_finder() -> None:
    """Make the compiled modules import from source (idempotent)."""
    if not any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceFinder())


def install_docstring_loader() -> None:
    """Make the compiled modules carry their source docstrings (idempotent)."""
    if not any(isinstance(f, _DocstringFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _DocstringFinder())


def build_kind() -> str:
    """"compiled" if every module of COMPILED_MODULES is a mypyc extension, else "interpreted".

    A mix (some compiled, some not) is reported as "mixed": it means a
    partial build and is never what setup.py produces.
    """
    kinds: set[bool] = set()
    for name in COMPILED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            # An optional module whose extra is not installed (pyvirtio.batch: numpy).
            continue
        kinds.add(str(module.__file__).endswith(".py"))
    if kinds == {False}:
        return "compiled"
    if kinds == {True}:
        return "interpreted"
    return "mixed"
