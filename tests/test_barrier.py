"""The full fence of core/barrier.py (Linux virtio_mb; VIRTIO 1.2 §2.7.7, §2.7.10, §2.7.13)."""

from __future__ import annotations

import platform

from pyvirtio.core import barrier


def test_full_fence_is_callable_and_reentrant_in_sequence() -> None:
    assert callable(barrier.full_fence)
    for _ in range(1000):
        barrier.full_fence()


def test_full_fence_leaves_the_lock_free() -> None:
    barrier.full_fence()
    # The lock behind the fence is never left held, so a fence never blocks.
    assert not barrier._lock.locked()
    assert barrier._lock.acquire(blocking=False)
    barrier._lock.release()


def test_fence_is_hardware_barrier_on_x86_64() -> None:
    machine = platform.machine()
    assert barrier.fence_is_hardware_barrier() == (machine in ("x86_64", "AMD64"))
    if machine == "x86_64":
        assert barrier.fence_is_hardware_barrier() is True
