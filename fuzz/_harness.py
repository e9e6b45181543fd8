"""What every fuzz target shares: the invariant check and the atheris entry point.

The invariant (docs/architecture.md, "Guest input is hostile"): arbitrary
input from a peer raises only :class:`~pyvirtio.core.errors.PeerError` (its
subclass ``QueueBrokenError`` included) — any other exception escapes to
atheris, which reports it as a crash with the input that caused it; every
fd an iteration opened is closed when it ends; and no iteration hangs
(libFuzzer's ``-timeout``, set by the documented commands).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import types
from collections.abc import Callable

# The interpreted build: atheris instruments Python bytecode, and the mypyc-compiled
# modules would give it no coverage to steer by.
os.environ.setdefault("PYVIRTIO_PURE_PYTHON", "1")

import atheris

from pyvirtio.core.errors import PeerError

__all__ = ["PeerError", "atheris", "checked", "fuzz"]


class FdLeak(AssertionError):
    """An iteration left fds open: a leak the fuzzer must report."""


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def checked(body: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """``body`` run under the invariant: PeerError is fine, fds must balance."""

    def one_input(data: bytes) -> None:
        before = _open_fds()
        # PeerError: the peer broke the rules and was told so, the expected outcome.
        with contextlib.suppress(PeerError):
            body(data)
        after = _open_fds()
        if after != before:
            # A mapping whose views are still referenced keeps the memfd's dup
            # until they are collected: count again after a collection.
            gc.collect()
            after = _open_fds()
            if after != before:
                raise FdLeak(f"{after - before} fds left open by this input")

    return one_input


def _instrument(func: object) -> None:
    if isinstance(func, staticmethod | classmethod):
        func = func.__func__
    elif isinstance(func, property):
        for part in (func.fget, func.fset, func.fdel):
            if part is not None:
                _instrument(part)
        return
    if isinstance(func, types.FunctionType) and id(func.__code__) not in _done:
        atheris.instrument_func(func)
        _done.add(id(func.__code__))


_done: set[int] = set()


def _instrument_pyvirtio() -> None:
    """Coverage for every pyvirtio function loaded (nested functions included).

    Not atheris.instrument_imports(): pyvirtio's core modules come through
    pyvirtio._build's own loader, which its import hook does not see; and not
    atheris.instrument_all(), which also instruments the standard library
    (a minute at start-up, and coverage that is not ours).
    """
    for name, module in list(sys.modules.items()):
        if not name.startswith("pyvirtio") or module is None:
            continue
        for obj in list(vars(module).values()):
            if getattr(obj, "__module__", None) != name:
                continue
            if isinstance(obj, type):
                for attr in list(vars(obj).values()):
                    _instrument(attr)
            else:
                _instrument(obj)


def fuzz(one_input: Callable[[bytes], None]) -> None:
    """Run libFuzzer over ``one_input`` with the command line's options (see fuzz/README.md)."""
    _instrument_pyvirtio()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
