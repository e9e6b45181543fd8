"""The compiled build documents itself like the source (pyvirtio/_docstrings.py).

mypyc drops docstrings; pyvirtio puts them back when a compiled module is
imported.  Checked in a child process running the build setup.py installed
(the suite's own process may run the interpreted source), against the
docstrings ``ast`` reads from the source.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from pyvirtio import _build
from pyvirtio._docstrings import source_docstrings

ROOT = Path(__file__).resolve().parent.parent


def _public_source_docs() -> dict[str, str]:
    """module:qualname -> docstring of every public class, function, method, property."""
    docs: dict[str, str] = {}
    for name in _build.COMPILED_MODULES:
        tree = ast.parse((ROOT / "src" / (name.replace(".", "/") + ".py")).read_text())
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            if (doc := ast.get_docstring(node, clean=False)) is not None:
                docs[f"{name}:{node.name}"] = doc
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if (isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_")
                            and (doc := ast.get_docstring(sub, clean=False)) is not None):
                        docs.setdefault(f"{name}:{node.name}.{sub.name}", doc)
    return docs


_CHILD = textwrap.dedent("""
    import importlib, inspect, json, sys
    from pyvirtio._build import build_kind
    out = {"build": build_kind(), "docs": {}, "signatures": {}, "not_importable": []}
    for key in json.loads(sys.argv[1]):
        module, qualname = key.split(":")
        try:
            obj = importlib.import_module(module)
        except ImportError:  # an optional module whose extra is not installed
            out["not_importable"].append(module)
            continue
        for part in qualname.split("."):
            obj = inspect.getattr_static(obj, part, None)  # None: a stale build lacks it
        obj = getattr(obj, "__func__", obj)
        out["docs"][key] = obj.__doc__
        if callable(obj) and not isinstance(obj, type):
            try:
                out["signatures"][key] = list(inspect.signature(obj).parameters)
            except ValueError:
                out["signatures"][key] = None
    print(json.dumps(out))
""")


def test_the_compiled_build_carries_the_source_docstrings() -> None:
    expected = _public_source_docs()
    core = {"pyvirtio.core.split_driver:SplitDriverQueue.add",
            "pyvirtio.core.split_driver:SplitDriverQueue.kick_prepare",
            "pyvirtio.core.split_device:SplitDeviceQueue.pop",
            "pyvirtio.core.split_device:SplitDeviceQueue.should_notify",
            "pyvirtio.core.memory:GuestMemory", "pyvirtio.core.layout:SplitLayout.legacy"}
    assert core <= set(expected)  # the README's API is documented in the source
    env = {k: v for k, v in os.environ.items() if k != _build.PURE_ENV}
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(sorted(expected))],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(res.stdout)
    assert got["build"] == ("interpreted" if os.environ.get("PYVIRTIO_NO_MYPYC") else "compiled")
    assert not any(m.startswith("pyvirtio.core.") for m in got["not_importable"])
    wrong = {k: got["docs"].get(k) for k, doc in expected.items()
             if k.split(":")[0] not in got["not_importable"] and got["docs"].get(k) != doc}
    assert not wrong, f"{len(wrong)} of {len(expected)} docstrings missing: {sorted(wrong)}"
    # mypyc's signature line is kept in front of the docstring.
    assert got["signatures"]["pyvirtio.core.split_driver:SplitDriverQueue.add"] == [
        "self", "out_segs", "in_segs", "token"]


def test_help_shows_the_docstrings_of_the_compiled_build() -> None:
    env = {k: v for k, v in os.environ.items() if k != _build.PURE_ENV}
    text = subprocess.run(
        [sys.executable, "-c",
         "import pydoc, pyvirtio.core.split_driver as m;"
         "print(pydoc.render_doc(m.SplitDriverQueue, renderer=pydoc.plaintext))"],
        env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "The driver's view of one split virtqueue" in text
    assert "Make a buffer available" in text


def test_source_docstrings_reads_functions_classes_properties(tmp_path: Path) -> None:
    src = tmp_path / "sample.py"
    src.write_text(textwrap.dedent('''
        """Module doc."""

        class Box:
            """Box doc."""

            @property
            def size(self) -> int:
                """Size doc."""
                return 1

            @size.setter
            def size(self, value: int) -> None:
                """Setter doc (not the property's)."""

            @classmethod
            def make(cls) -> "Box":
                """Make doc."""
                return cls()

        def plain() -> str:
            x = "a constant, not a docstring"
            return x

        def outer() -> None:
            """Outer doc."""
            def inner() -> None:
                """Inner doc."""
    '''))
    docs = source_docstrings("sample", str(src))
    assert docs == {"": "Module doc.", "Box": "Box doc.", "Box.size": "Size doc.",
                    "Box.make": "Make doc.", "outer": "Outer doc."}
