"""The full fence of core/barrier.py (Linux virtio_mb; VIRTIO 1.2 §2.7.7, §2.7.10, §2.7.13)."""

from __future__ import annotations

import mmap
import os
import platform
import signal

import pytest

from pyvirtio.core import barrier


def test_full_fence_is_callable_and_reentrant_in_sequence() -> None:
    assert callable(barrier.full_fence)
    for _ in range(1000):
        barrier.full_fence()


def test_full_fence_leaves_the_lock_free() -> None:
    barrier.full_fence()
    # The lock behind the fence is never left held, so a fence never blocks.
    assert barrier._FENCE.lock.acquire(False)
    barrier._FENCE.lock.release()


def test_fence_uses_the_cheap_semaphore_lock() -> None:
    # /dev/shm exists here, so the fast lock was made, not the fallback.
    assert type(barrier._FENCE.lock).__name__ == "SemLock"


def test_fence_lock_is_a_semaphore_of_its_own_in_a_forked_child() -> None:
    parent_lock = barrier._FENCE.lock
    pid = os.fork()
    if pid == 0:  # pragma: no cover - reported through the exit status
        ok = barrier._FENCE.lock is not parent_lock and barrier._FENCE.lock.acquire(False)
        if ok:
            barrier._FENCE.lock.release()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert barrier._FENCE.lock is parent_lock


def test_fence_is_hardware_barrier_on_x86_64() -> None:
    machine = platform.machine()
    assert barrier.fence_is_hardware_barrier() == (machine in ("x86_64", "AMD64"))
    if machine == "x86_64":
        assert barrier.fence_is_hardware_barrier() is True


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64", ""])
def test_other_architectures_are_not_claimed(machine: str) -> None:
    # The fence and the free write/read barriers are x86-64 (TSO) arguments;
    # anywhere else pyvirtio says so instead of silently losing wake-ups.
    msg = barrier.arch_warning(machine)
    assert msg is not None and "only correct on x86-64" in msg
    for x86 in ("x86_64", "AMD64"):
        assert barrier.arch_warning(x86) is None


# ----------------------------------------------------------------- litmus test
# The store-buffering litmus test ("SB", Dekker): two processes on two CPUs each
# store their own flag, then load the other's.  If both loads miss the other's
# store, a store was reordered after a later load — exactly the reordering that
# loses a wake-up between publishing an index and reading the peer's event index.
# It is observable from Python on x86-64 without a fence, and never with one.

_FLAG = (0, 16)  # 32-bit word indices, one cache line apart
_GATE1 = (32, 48)
_GATE2 = (64, 80)
_RES = (96, 112)


def _sb_side(words: memoryview, me: int, first: int, rounds: int, fenced: bool) -> int:
    other = 1 - me
    fence = barrier.full_fence
    seen_reorders = 0
    for r in range(first, first + rounds):
        words[_GATE1[me]] = r
        while words[_GATE1[other]] < r:
            pass
        words[_FLAG[me]] = r
        if fenced:
            fence()
        saw = words[_FLAG[other]] == r
        words[_RES[me]] = 2 * r + saw
        words[_GATE2[me]] = r
        while words[_GATE2[other]] < r:
            pass
        if words[_RES[0]] == 2 * r and words[_RES[1]] == 2 * r:
            seen_reorders += 1
    return seen_reorders


def _sb_run(rounds: int, fenced: bool, first: int, words: memoryview, cpus: list[int]) -> int:
    """Run ``rounds`` rounds in this process and a forked twin; return the reorders seen."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is the parent's result
        try:
            os.sched_setaffinity(0, {cpus[1]})
            _sb_side(words, 1, first, rounds, fenced)
        finally:
            os._exit(0)
    old = os.sched_getaffinity(0)
    finished = False
    try:
        os.sched_setaffinity(0, {cpus[0]})
        seen = _sb_side(words, 0, first, rounds, fenced)
        finished = True
    finally:
        os.sched_setaffinity(0, old)
        if not finished:
            # Interrupted (the test's timeout): the twin would wait for us forever.
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert status == 0
    return seen


@pytest.mark.timeout(240)
def test_store_load_reordering_is_real_and_the_fence_stops_it() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "the litmus test needs two CPUs (the project's machines have 2)"
    mm = mmap.mmap(-1, 4096)  # MAP_SHARED | MAP_ANONYMOUS: shared with the forked twin
    words = memoryview(mm).cast("I")
    try:
        chunk, rounds, reorders, first = 1_000_000, 0, 0, 1
        while reorders < 5 and rounds < 30_000_000:
            reorders += _sb_run(chunk, False, first, words, cpus)
            rounds += chunk
            first += chunk
        print(f"\nwithout a fence: {reorders} store->load reorders in {rounds:,} rounds")
        assert reorders > 0, "no reordering observed: the litmus test cannot judge the fence here"
        # With the fence: several times the rounds it took to see the reorderings.
        fenced_rounds = min(max(3 * rounds, 3_000_000), 30_000_000)
        fenced = _sb_run(fenced_rounds, True, first, words, cpus)
        print(f"with full_fence(): {fenced} in {fenced_rounds:,} rounds")
        assert fenced == 0
    finally:
        words.release()
        mm.close()
