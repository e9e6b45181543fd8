"""Cross-process stress: 1,000,000 buffers, EVENT_IDX, blocking eventfd waits, zero hangs.

Two processes share a memfd GuestMemory holding one split ring (VIRTIO 1.2
§2.7, legacy layout §2.7.2) and its buffers.  The driver (this process) kicks
through one eventfd (ioeventfd), the device (a forked child) interrupts
through another (irqfd); ``VIRTIO_F_EVENT_IDX`` is negotiated (§2.7.7.2,
§2.7.10).  Each side runs the loop real code runs — notifications off,
process everything, notifications on, re-check, and only if nothing is
pending block on its eventfd — with a watchdog timeout on every wait.  A
timeout while work is pending for the sleeper is a lost wake-up (the store →
load reordering the full fence in ``core/barrier.py`` exists to prevent).
The driver adds at most ``BATCH`` buffers per pass, so both sides work at the
same time and the device often empties the ring just as the driver adds: the
window in which a missing re-check or fence would lose a wake-up.

Data travels both ways: the driver writes each buffer's sequence number in a
readable segment, the device checks it against its own count and writes it
back into the writable segment; the driver checks token, length and bytes,
so every buffer comes back exactly once and in order.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import pytest

from pyvirtio.core.layout import RingViews, SplitLayout, vring_size
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, bit
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.core.split_driver import SplitDriverQueue
from pyvirtio.io.eventfd import EventFd

TOTAL = 1_000_000
NUM = 256
WATCHDOG_S = 5.0  # a wait this long with work pending is a lost wake-up
DEADLINE_S = 240.0  # give up (and fail) rather than hang the suite
FEATURES = bit(F_RING_EVENT_IDX)
BATCH = 8  # the driver adds at most this many per pass, so both sides run concurrently
SLOT = 16  # per ring slot: 8 readable bytes, then 8 writable bytes
BUF_BASE = vring_size(NUM, 4096)
MEM_SIZE = BUF_BASE + NUM * SLOT


@dataclass
class Counters:
    buffers: int = 0
    notifications: int = 0  # kicks sent (driver) / interrupts sent (device)
    wakeups: int = 0  # waits that returned a signal
    sleeps: int = 0  # times the side blocked
    lost: int = 0  # watchdog timeouts with work pending: lost wake-ups
    idle_timeouts: int = 0  # watchdog timeouts with nothing pending for this side
    errors: int = 0  # data or order mismatches (device side)


def _device(fd: int, kick_fd: int, call_fd: int, conn: Connection) -> None:
    """The device process: serve TOTAL buffers, then report its counters."""
    c = Counters()
    mem = GuestMemory.from_fd(fd, MEM_SIZE)
    q = SplitDeviceQueue(RingViews.map(mem, SplitLayout.legacy(0, NUM)), mem, FEATURES)
    kick, call = EventFd(kick_fd), EventFd(call_fd)
    deadline = time.monotonic() + DEADLINE_S
    expect = 0
    try:
        while c.buffers < TOTAL and time.monotonic() < deadline:
            q.disable_notification()
            while True:
                n = 0
                while (e := q.pop()) is not None:
                    seq = int.from_bytes(e.readable[0], "little")
                    if seq != expect:
                        c.errors += 1
                    expect += 1
                    e.writable[0][:] = e.readable[0]
                    q.fill(e.head, 8, n)
                    n += 1
                if not n:
                    break
                q.flush(n)
                c.buffers += n
                if q.should_notify():
                    call.signal()
                    c.notifications += 1
            if c.buffers >= TOTAL:
                break
            if q.enable_notification():
                continue  # work arrived while notifications were off: no sleep
            c.sleeps += 1
            if kick.wait(WATCHDOG_S):
                c.wakeups += 1
            elif q.available():
                c.lost += 1
            else:
                c.idle_timeouts += 1
    finally:
        conn.send(c)
        conn.close()


def _driver(q: SplitDriverQueue, mem: GuestMemory, kick: EventFd, call: EventFd) -> Counters:
    c = Counters()
    deadline = time.monotonic() + DEADLINE_S
    slots = [mem.translate(BUF_BASE + i * SLOT, SLOT) for i in range(NUM)]
    added = done = 0
    while done < TOTAL and time.monotonic() < deadline:
        q.disable_cb()
        # Refill: each request takes two descriptors (readable seq, writable reply).
        n = 0
        while added < TOTAL and q.num_free >= 2 and n < BATCH:
            slot = added % NUM
            gpa = BUF_BASE + slot * SLOT
            slots[slot][:8] = added.to_bytes(8, "little")
            slots[slot][8:] = b"\xff" * 8
            q.add([(gpa, 8)], [(gpa + 8, 8)], added)
            added += 1
            n += 1
        if n and q.kick_prepare():
            kick.signal()
            c.notifications += 1
        got = 0
        while (r := q.get_buf()) is not None:
            token, length = r
            view = slots[done % NUM]
            assert token == done, f"buffer {token} came back where {done} was due"
            assert length == 8
            assert int.from_bytes(view[8:], "little") == done
            done += 1
            got += 1
        if got or n or done >= TOTAL:
            continue
        if q.enable_cb():
            continue  # used buffers arrived while interrupts were off
        c.sleeps += 1
        if call.wait(WATCHDOG_S):
            c.wakeups += 1
        elif q.more_used():
            c.lost += 1
        else:
            c.idle_timeouts += 1
    c.buffers = done
    return c


@pytest.mark.timeout(300)
def test_million_buffers_between_two_processes_without_lost_wakeups() -> None:
    mem = GuestMemory.anonymous(MEM_SIZE, gpa=0)
    fd = mem.regions[0].fd
    q = SplitDriverQueue(RingViews.map(mem, SplitLayout.legacy(0, NUM)), FEATURES)
    kick, call = EventFd(), EventFd()
    parent_conn, child_conn = multiprocessing.Pipe(duplex=False)
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_device, args=(fd, kick.fd, call.fd, child_conn), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    try:
        drv = _driver(q, mem, kick, call)
        assert parent_conn.poll(60), "device process sent no report"
        dev: Counters = parent_conn.recv()
        proc.join(30)
        elapsed = time.perf_counter() - t0
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent_conn.close()
        child_conn.close()
        kick.close()
        call.close()
        mem.close()
    print(
        f"\n{TOTAL} buffers in {elapsed:.1f} s ({TOTAL / elapsed / 1000:.0f} k/s): "
        f"kicks {drv.notifications} ({1000 * drv.notifications / TOTAL:.2f}/1000), "
        f"interrupts {dev.notifications} ({1000 * dev.notifications / TOTAL:.2f}/1000); "
        f"driver sleeps {drv.sleeps} wakeups {drv.wakeups}; "
        f"device sleeps {dev.sleeps} wakeups {dev.wakeups}; "
        f"lost wake-ups driver {drv.lost} device {dev.lost}; "
        f"idle timeouts driver {drv.idle_timeouts} device {dev.idle_timeouts}"
    )
    assert drv.buffers == TOTAL and dev.buffers == TOTAL
    assert dev.errors == 0
    assert drv.lost == 0 and dev.lost == 0, "lost wake-up: a side slept with work pending"
    assert drv.idle_timeouts == 0 and dev.idle_timeouts == 0, "a side waited a whole watchdog"
    # Notifications really were exchanged and really were suppressed.
    assert 0 < drv.notifications < TOTAL and 0 < dev.notifications < TOTAL
