"""Build hook: compile the ring's hot paths with mypyc.

The modules named in ``pyvirtio._build.COMPILED_MODULES`` are ordinary,
fully type-hinted Python (mypy --strict); mypyc (part of mypy) translates
them to C extension modules at install time, which makes the per-request
path about twice as fast (bench/ring.py measures both builds).  Nothing
else changes: the same source is the documentation, the reference and,
with ``PYVIRTIO_PURE_PYTHON=1`` at run time, what actually runs.  Set
``PYVIRTIO_NO_MYPYC=1`` at install time to skip compiling altogether
(needed only where there is no C compiler).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
# The one list of compiled modules lives with the code that reports the build.
from pyvirtio._build import COMPILED_MODULES

COMPILED = [os.path.join("src", *name.split(".")) + ".py" for name in COMPILED_MODULES]


def ext_modules() -> list[object]:
    if os.environ.get("PYVIRTIO_NO_MYPYC"):
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", group_name="pyvirtio"))


setup(ext_modules=ext_modules())
