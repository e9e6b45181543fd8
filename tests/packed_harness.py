"""Both sides of one packed ring (VIRTIO 1.2 §2.8) over one guest memory, for the packed tests.

:class:`PackedPair` is the packed counterpart of conftest's ``RingPair``: a
memfd-backed :class:`GuestMemory`, the descriptor ring and both event
suppression structures at guest address 0, a :class:`PackedDriverQueue` and a
:class:`PackedDeviceQueue` sharing them, an indirect area when
INDIRECT_DESC is negotiated, and a bump allocator for data buffers.

``start`` puts a fresh pair at a chosen ring position and wrap counter.  The
driver has no public API for that (Linux starts every ring at 0 with wrap
counter 1), so :func:`start_packed_at` sets its positions and writes the
descriptors' flags as a ring that had already gone round would hold them;
the device uses its public ``set_state`` (vhost-user SET_VRING_BASE).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.packed_device import PackedDeviceQueue
from pyvirtio.core.packed_driver import PackedDriverQueue
from pyvirtio.core.packed_layout import (
    PACKED_DESC,
    PACKED_DESC_SIZE,
    PackedLayout,
    PackedRingViews,
    avail_flags,
    used_flags,
)
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvirtio.core.split_driver import IndirectArea

INDIRECT = bit(F_RING_INDIRECT_DESC)
EVENT_IDX = bit(F_RING_EVENT_IDX)
MODES: dict[str, int] = {"none": 0, "flags": 0, "event-idx": EVENT_IDX}
"""Suppression modes and the features each negotiates ("none" and "flags"
differ only in whether the two sides touch the suppression structures)."""


@dataclass
class PackedPair:
    """Both sides of one packed ring over one guest memory."""

    mem: GuestMemory
    layout: PackedLayout
    driver: PackedDriverQueue
    device: PackedDeviceQueue
    alloc: BumpAllocator
    features: int
    indirect_gpa: int | None = None

    @property
    def num(self) -> int:
        return self.layout.num

    def buf(self, size: int, fill: bytes | None = None) -> int:
        """Allocate a data buffer in guest memory; optionally fill it."""
        addr = self.alloc.alloc(size, 8)
        if fill is not None:
            self.mem.write(addr, fill)
        return addr

    # The suppression structures as the other side sees them.
    @property
    def driver_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the driver wrote."""
        v = self.device.rings.driver16
        return int(v[0]), int(v[1])

    @property
    def device_event(self) -> tuple[int, int]:
        """(off_wrap, flags) the device wrote."""
        v = self.driver.rings.device16
        return int(v[0]), int(v[1])

    def desc_flags(self, i: int) -> int:
        return int(self.driver.rings.desc16[8 * i + 7])


def start_packed_at(pair: PackedPair, pos: int, wrap: int) -> None:
    """Put a fresh pair at ring position ``pos`` of the lap with wrap counter ``wrap``.

    Descriptors before ``pos`` were used in this lap, the others in the
    previous one (test-only helper).
    """
    drv = pair.driver
    assert drv.outstanding == 0, "start_packed_at needs a fresh pair"
    desc16 = drv.rings.desc16
    for i in range(pair.num):
        desc16[8 * i + 7] = used_flags(wrap if i < pos else wrap ^ 1)
    drv.next_avail_idx = drv.last_used_idx = pos
    drv.avail_wrap_counter = drv.used_wrap_counter = wrap
    drv._avail_used_flags = avail_flags(wrap)
    pair.device.set_state(pos | wrap << 15)


def make_packed_pair(num: int = 8, features: int = 0, start: tuple[int, int] | None = None,
                     indirect_per_head: int = 4, mem_size: int = 1 << 20) -> PackedPair:
    """Build a PackedPair (hypothesis tests call it directly: they cannot take fixtures)."""
    layout = PackedLayout.contiguous(0, num)
    ring_bytes = layout.total_span
    ind_bytes = IndirectArea.size_for(num, indirect_per_head) if features & INDIRECT else 0
    mem_size = max(mem_size, ring_bytes + ind_bytes + 4096 + (1 << 16))
    mem = GuestMemory.anonymous(mem_size, gpa=0)
    alloc = BumpAllocator(ring_bytes, mem_size)
    indirect: IndirectArea | None = None
    ind_gpa: int | None = None
    if features & INDIRECT:
        ind_gpa = alloc.alloc(ind_bytes, 16)
        indirect = IndirectArea(ind_gpa, mem.translate(ind_gpa, ind_bytes), indirect_per_head)
    driver = PackedDriverQueue(PackedRingViews.map(mem, layout), features, indirect)
    device = PackedDeviceQueue(PackedRingViews.map(mem, layout), mem, features)
    pair = PackedPair(mem, layout, driver, device, alloc, features, ind_gpa)
    if start is not None:
        start_packed_at(pair, *start)
    return pair


def close_packed_pair(pair: PackedPair) -> None:
    pair.mem.close()


def write_pdesc(pair: PackedPair, i: int, addr: int, length: int, bid: int, flags: int) -> None:
    """Write ring descriptor ``i`` as a (possibly hostile) driver would."""
    PACKED_DESC.pack_into(pair.driver.rings.desc, i * PACKED_DESC_SIZE, addr, length, bid, flags)
