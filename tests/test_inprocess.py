"""In-process transport: real rings in one GuestMemory, kicks and interrupts as counted calls.

(The seed article's worked example is replayed in test_seed_example.py.)
"""

from __future__ import annotations

from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.transports.inprocess import InProcessTransport

MEM = 1 << 20
BUF = 0x80000


def make(features: int = 0, sizes: tuple[int, ...] = (16,)
         ) -> tuple[InProcessTransport, list[int], list[int]]:
    mem = GuestMemory.anonymous(MEM)
    kicked: list[int] = []
    irqs: list[int] = []
    t = InProcessTransport(mem, BumpAllocator(0x1000, BUF), list(sizes), features,
                           on_kick=kicked.append, on_interrupt=irqs.append)
    return t, kicked, irqs


def test_round_trip_with_counted_notifications() -> None:
    t, kicked, irqs = make(sizes=(16, 8))
    drv, dev = t.driver(1), t.device(1)
    t.memory.write(BUF, b"ping")
    drv.add([(BUF, 4)], [(BUF + 64, 4)], "req")
    assert t.kick(1) is True
    assert kicked == [1] and t.queues[1].kicks == 1 and t.queues[0].kicks == 0
    elem = dev.pop()
    assert elem is not None and bytes(elem.readable[0]) == b"ping"
    elem.writable[0][:] = b"pong"
    dev.push(elem.head, 4)
    assert t.interrupt(1) is True
    assert irqs == [1] and t.interrupts == 1 and t.kicks == 1
    assert drv.get_buf() == ("req", 4)
    assert t.memory.read(BUF + 64, 4) == b"pong"


def test_rings_are_distinct_and_zeroed() -> None:
    t, _, _ = make(sizes=(16, 16, 4))
    starts = [q.layout.desc for q in t.queues]
    assert len(set(starts)) == 3 and all(s % 4096 == 0 for s in starts)
    assert t.device(2).available() == 0


def test_flags_suppress_kicks_and_interrupts() -> None:
    t, kicked, irqs = make()
    drv, dev = t.driver(0), t.device(0)
    dev.disable_notification()
    drv.disable_cb()
    for i in range(4):
        drv.add([(BUF + 16 * i, 16)], [], i)
        assert t.kick(0) is False
    while (e := dev.pop()) is not None:
        dev.push(e.head, 0)
        assert t.interrupt(0) is False
    assert kicked == [] and irqs == []
    assert dev.enable_notification() is False
    drv.add([(BUF, 16)], [], 9)
    assert t.kick(0) is True
    assert t.queues[0].kicks == 1 and t.queues[0].interrupts == 0


def test_unconditional_notifications_count() -> None:
    t, kicked, irqs = make(sizes=(4, 4))
    t.on_kick = None
    t.notify_device(0)
    t.notify_driver(1)
    t.notify_driver(1)
    assert (t.queues[0].kicks, t.queues[1].interrupts) == (1, 2)
    assert kicked == [] and irqs == [1, 1]
