"""Build hook: compile the ring's hot paths with mypyc.

The modules below are ordinary, fully type-hinted Python (mypy --strict);
mypyc (part of mypy) translates them to C extension modules at install
time, which makes the per-request path about twice as fast (bench/ring.py
measures both builds).  Nothing else changes: the same source is the
documentation, the reference and, with ``PYVIRTIO_PURE_PYTHON=1`` at run
time, what actually runs (pyvirtio/_pure.py).  Set
``PYVIRTIO_NO_MYPYC=1`` at install time to skip compiling altogether.
"""

from __future__ import annotations

import os

from setuptools import setup

COMPILED = [
    "src/pyvirtio/core/barrier.py",
    "src/pyvirtio/core/chain.py",
    "src/pyvirtio/core/errors.py",
    "src/pyvirtio/core/layout.py",
    "src/pyvirtio/core/memory.py",
    "src/pyvirtio/core/notify.py",
    "src/pyvirtio/core/split_device.py",
    "src/pyvirtio/core/split_driver.py",
]


def ext_modules() -> list[object]:
    if os.environ.get("PYVIRTIO_NO_MYPYC"):
        return []
    from mypyc.build import mypycify

    return list(mypycify(COMPILED, opt_level="3", group_name="pyvirtio"))


setup(ext_modules=ext_modules())
