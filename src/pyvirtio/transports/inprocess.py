"""In-process transport: driver and device share one GuestMemory in one process.

The rings are the real split rings of VIRTIO 1.2 §2.7 (legacy contiguous
layout, §2.7.2) — or, when the features include ``VIRTIO_F_RING_PACKED``,
packed rings (§2.8: descriptor ring, then the driver and device event
suppression areas) — so both sides read and write the same bytes they would
across processes; only the notifications change.  A kick (§2.7.13, "Notifying the
device") and an interrupt (§2.7.14, "Receiving Used Buffers From The Device")
are direct calls of a callback, after the side has taken its own suppression
decision (``kick_prepare`` / ``should_notify``).  The transport counts both,
per queue, which is what the tests and the notification experiments read.

Handlers run synchronously: a kick handler that pushes buffers and
interrupts calls the interrupt handler before :meth:`InProcessTransport.kick`
returns.  Handlers that do not want that recursion should record the event
and act later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvirtio.core.layout import RingViews, SplitLayout, vring_size
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.packed_device import PackedDeviceQueue
from pyvirtio.core.packed_driver import PackedDriverQueue
from pyvirtio.core.packed_layout import EVENT_SIZE, PackedLayout, PackedRingViews, packed_ring_size
from pyvirtio.core.queue import DeviceQueue, DriverQueue
from pyvirtio.core.spec import F_RING_PACKED, LEGACY_VRING_ALIGN
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.core.split_driver import SplitDriverQueue

Handler = Callable[[int], None]


@dataclass(slots=True)
class QueuePair:
    """Both sides of one queue, with the notifications that crossed between them."""

    index: int
    layout: SplitLayout | PackedLayout
    driver: DriverQueue
    device: DeviceQueue
    kicks: int = 0
    interrupts: int = 0


class InProcessTransport:
    """Queues whose driver and device sides live in this process.

    ``on_kick(queue)`` is the device's kick handler, ``on_interrupt(queue)``
    the driver's interrupt handler; either may be set later.
    """

    def __init__(self, memory: GuestMemory, allocator: BumpAllocator,
                 queue_sizes: Sequence[int], features: int = 0,
                 on_kick: Handler | None = None, on_interrupt: Handler | None = None) -> None:
        self.memory = memory
        self.features = features
        self.on_kick = on_kick
        self.on_interrupt = on_interrupt
        self.queues: list[QueuePair] = []
        for i, num in enumerate(queue_sizes):
            if features >> F_RING_PACKED & 1:
                size = packed_ring_size(num) + 2 * EVENT_SIZE
                base = allocator.alloc(size, LEGACY_VRING_ALIGN)
                memory.translate(base, size)[:] = bytes(size)
                playout = PackedLayout.contiguous(base, num)
                self.queues.append(QueuePair(
                    i, playout, PackedDriverQueue(PackedRingViews.map(memory, playout), features),
                    PackedDeviceQueue(PackedRingViews.map(memory, playout), memory, features)))
                continue
            size = vring_size(num, LEGACY_VRING_ALIGN)
            base = allocator.alloc(size, LEGACY_VRING_ALIGN)
            memory.translate(base, size)[:] = bytes(size)
            layout = SplitLayout.legacy(base, num, LEGACY_VRING_ALIGN)
            rings = RingViews.map(memory, layout)
            self.queues.append(QueuePair(
                i, layout, SplitDriverQueue(rings, features),
                SplitDeviceQueue(RingViews.map(memory, layout), memory, features)))

    def driver(self, queue: int) -> DriverQueue:
        return self.queues[queue].driver

    def device(self, queue: int) -> DeviceQueue:
        return self.queues[queue].device

    # ------------------------------------------------------- notifications
    def kick(self, queue: int) -> bool:
        """Driver side: kick ``queue`` if ``kick_prepare`` says so; True if it kicked."""
        q = self.queues[queue]
        if not q.driver.kick_prepare():
            return False
        self.notify_device(queue)
        return True

    def notify_device(self, queue: int) -> None:
        """An unconditional kick (``virtqueue_notify``)."""
        self.queues[queue].kicks += 1
        if self.on_kick is not None:
            self.on_kick(queue)

    def interrupt(self, queue: int) -> bool:
        """Device side: interrupt for ``queue`` if ``should_notify`` says so; True if it did."""
        q = self.queues[queue]
        if not q.device.should_notify():
            return False
        self.notify_driver(queue)
        return True

    def notify_driver(self, queue: int) -> None:
        """An unconditional interrupt."""
        self.queues[queue].interrupts += 1
        if self.on_interrupt is not None:
            self.on_interrupt(queue)

    @property
    def kicks(self) -> int:
        return sum(q.kicks for q in self.queues)

    @property
    def interrupts(self) -> int:
        return sum(q.interrupts for q in self.queues)
