"""Memory ordering between the two sides of a ring in shared memory — x86-64 only.

VIRTIO 1.2 §2.7.13 (driver) and §2.7.7/§2.7.10 (device) need three kinds of
ordering, which Linux calls ``virtio_wmb``, ``virtio_rmb`` and ``virtio_mb``:

* write barrier (publish ring entries before the index): on x86-64 stores are
  never reordered with older stores (TSO), and each store pyvirtio does is a
  separate call into memoryview's C code — from the interpreter or from the
  mypyc-compiled module alike — which no compiler reorders, so program order
  already gives it;
* read barrier (read the index before the entries it covers): loads are never
  reordered with older loads on x86-64; likewise free;
* **full barrier** between publishing an index and reading the other side's
  event index or flags.  x86-64 *does* reorder a store with a later load to a
  different address (the store buffer), which is exactly the classic lost
  wake-up: the driver publishes ``avail.idx`` and reads a stale
  ``avail_event``, while the device publishes ``avail_event`` and reads a
  stale ``avail.idx``; both decide the other will act, and both sleep.

Python has no fence primitive.  :func:`full_fence` takes and releases an
uncontended POSIX semaphore: glibc's ``sem_trywait`` is a ``lock cmpxchg``
and ``sem_post`` another.  A locked instruction is a full barrier on x86-64
(Intel SDM vol. 3 §9.2.2: locked instructions have a total order and are not
reordered with loads or stores), so the fence is real and needs no C code
of our own.  The semaphore is the C lock under :class:`multiprocessing.Lock`,
whose ``acquire`` goes straight to ``sem_trywait`` (about 35 ns for the pair),
while :class:`threading.Lock` on CPython 3.11 reads the monotonic clock and
parses keyword arguments on every acquire (about 105 ns); the fence runs
three times per request, so that difference is a sixth of a request's cost.
Where no named semaphore can be made (no ``/dev/shm``), the
:class:`threading.Lock` pair serves instead — the same ``sem_*`` calls
underneath.  A forked child makes its own semaphore, so two processes never
contend for one.

Two tests back this up.  ``tests/test_barrier.py`` runs the store-buffering
litmus test between two processes pinned to two CPUs: without a fence, Python
code on this machine sees a store pass a later load tens of times per million
rounds (the hazard is real even at interpreter speed); with :func:`full_fence`
between them, never in several million rounds.  The cross-process stress test
(``tests/test_stress_crossprocess.py``) moves a million buffers with blocking
eventfd waits and counts lost wake-ups: zero.

The lock is private to this module and never held across anything, so it can
never be contended for longer than one acquire/release pair of another thread.

**x86-64 only.**  All three arguments above are x86-64 (TSO) arguments, and
none holds on arm64 or another weakly ordered CPU:

* arm64 reorders a store with a later store and a load with a later load, so
  ring entries and the index that publishes them need ``dmb`` barriers
  (``virtio_wmb``/``virtio_rmb`` are real instructions there), and
  memoryview's plain stores and loads issue none;
* glibc's ``sem_trywait`` on arm64 is an *acquire* compare-and-swap and
  ``sem_post`` a *release* operation.  Acquire keeps later accesses after
  it and release keeps earlier ones before it, but an earlier store may still
  sink below the acquire and a later load rise above the release, meeting
  and passing each other inside the pair: no store-to-load ordering, which
  is the one thing the full fence is for.

Python offers no portable way to issue ``dmb ish``, so pyvirtio does not claim
arm64: :func:`fence_is_hardware_barrier` answers False there, importing this
module on another architecture warns once (:func:`arch_warning`), and the
README lists it under "Known limits".
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any, Final, Protocol

if sys.byteorder != "little":  # pragma: no cover - pyvirtio targets x86-64 hosts
    raise ImportError("pyvirtio maps virtio's little-endian rings with native typed views")

#: platform.machine() names of the CPUs whose ordering the module docstring argues for.
X86_64_NAMES: Final = ("x86_64", "AMD64")
_ARCH = platform.machine()


def arch_warning(machine: str) -> str | None:
    """The warning to give on ``machine``, or None on x86-64."""
    if machine in X86_64_NAMES:
        return None
    return (f"pyvirtio's shared-ring memory ordering is only correct on x86-64, not on "
            f"{machine or 'this CPU'}: a driver and device in two processes may lose "
            f"wake-ups or read stale ring entries (pyvirtio.core.barrier)")


_WARNING = arch_warning(_ARCH)
if _WARNING is not None:  # pragma: no cover - the test machines are x86-64
    warnings.warn(_WARNING, RuntimeWarning, stacklevel=2)


class _FenceLock(Protocol):
    def acquire(self, blocking: bool = True, /) -> bool: ...
    def release(self) -> None: ...


def _make_lock() -> _FenceLock:
    # The C semaphore lock under multiprocessing.Lock, made directly: the
    # multiprocessing package itself would import socket and subprocess,
    # which the sans-I/O core must not load (tests/test_core_sans_io.py).
    with contextlib.suppress(ImportError, AttributeError, OSError, TypeError):
        semlock: Any = importlib.import_module("_multiprocessing").SemLock
        for _ in range(8):
            name = f"/pyvirtio-fence-{os.getpid()}-{os.urandom(6).hex()}"
            with contextlib.suppress(FileExistsError):
                # kind 1 = semaphore, value 1, max 1; unlinked at once (no name
                # is left behind in /dev/shm, nothing for a tracker to clean).
                lock: _FenceLock = semlock(1, 1, 1, name, True)
                return lock
    return threading.Lock()  # pragma: no cover - no /dev/shm, or another interpreter


class _Fence:
    """The semaphore behind :func:`full_fence` and its two bound methods.

    An object rather than module globals so that the compiled fence reads
    the methods from fixed slots instead of looking names up in a dict.
    """

    __slots__ = ("acquire", "lock", "release")
    lock: _FenceLock
    acquire: Callable[[], object]
    release: Callable[[], object]

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        """Make a new semaphore (a forked child must not share its parent's)."""
        self.lock = _make_lock()
        self.acquire = self.lock.acquire
        self.release = self.lock.release


_FENCE: Final = _Fence()
os.register_at_fork(after_in_child=_FENCE.renew)


def full_fence() -> None:
    """Order every earlier load and store before every later one (``virtio_mb``)."""
    fence = _FENCE
    fence.acquire()
    fence.release()


def fence_is_hardware_barrier() -> bool:
    """Whether :func:`full_fence` is documented above to be a real barrier here (x86-64)."""
    return _ARCH in X86_64_NAMES
