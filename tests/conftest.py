"""Shared fixtures for the core tests: a driver and a device over one guest memory.

:class:`RingPair` is the in-process pair of VIRTIO 1.2 §2.7 (split virtqueue):
a memfd-backed :class:`GuestMemory`, the legacy contiguous layout (§2.7.2) at
guest address 0, a :class:`SplitDriverQueue` and a :class:`SplitDeviceQueue`
sharing its bytes, and a bump allocator for data buffers after the ring.

``start_idx`` starts both sides at a chosen 16-bit index (near 65535 to test
the wrap).  The driver has no public API for that, so :func:`start_at` sets
its shadow indices and writes the ring's ``idx`` fields as a driver that had
already cycled ``start_idx`` buffers would have left them; the device side
uses its public ``set_state`` (vhost-user SET_VRING_BASE).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pyvirtio._build import build_kind
from pyvirtio.core.layout import DESC, DESC_SIZE, RingViews, SplitLayout, vring_size
from pyvirtio.core.memory import BumpAllocator, GuestMemory
from pyvirtio.core.spec import F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, bit
from pyvirtio.core.split_device import SplitDeviceQueue
from pyvirtio.core.split_driver import IndirectArea, SplitDriverQueue


def pytest_report_header() -> str:
    return f"pyvirtio ring build: {build_kind()}"


MODES: dict[str, int] = {
    "none": 0,
    "flags": 0,
    "event-idx": bit(F_RING_EVENT_IDX),
}
"""Notification-suppression modes: features negotiated for each.

"none" and "flags" negotiate the same features; they differ in whether the
two sides use the flags (disable/enable) at all.
"""

INDIRECT = bit(F_RING_INDIRECT_DESC)
EVENT_IDX = bit(F_RING_EVENT_IDX)


@dataclass
class RingPair:
    """Both sides of one split ring over one guest memory."""

    mem: GuestMemory
    layout: SplitLayout
    driver: SplitDriverQueue
    device: SplitDeviceQueue
    alloc: BumpAllocator
    features: int
    indirect_gpa: int | None = None
    _buffers: list[int] = field(default_factory=list)

    @property
    def num(self) -> int:
        return self.layout.num

    def buf(self, size: int, fill: bytes | None = None) -> int:
        """Allocate a data buffer in guest memory; optionally fill it."""
        addr = self.alloc.alloc(size, 8)
        if fill is not None:
            self.mem.write(addr, fill)
        return addr

    # Ring fields as the other side sees them: read/write straight from memory.
    @property
    def avail_event(self) -> int:
        return int(self.device.rings.used16[2 + 4 * self.num])

    @avail_event.setter
    def avail_event(self, value: int) -> None:
        self.device.rings.used16[2 + 4 * self.num] = value & 0xFFFF

    @property
    def used_event(self) -> int:
        return int(self.driver.rings.avail16[2 + self.num])

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.driver.rings.avail16[2 + self.num] = value & 0xFFFF

    @property
    def avail_idx(self) -> int:
        return int(self.device.rings.avail16[1])

    @property
    def used_idx(self) -> int:
        return int(self.driver.rings.used16[1])

    @property
    def avail_flags(self) -> int:
        return int(self.device.rings.avail16[0])

    @property
    def used_flags(self) -> int:
        return int(self.driver.rings.used16[0])


def start_at(pair: RingPair, idx: int) -> None:
    """Put a fresh pair at ring index ``idx`` on both sides (test-only helper).

    A driver that had already cycled ``idx`` buffers would have its shadow
    avail index and last used index at ``idx``, and the ring's ``avail.idx``,
    ``used.idx`` and both event fields would read ``idx`` too.
    """
    idx &= 0xFFFF
    drv = pair.driver
    assert drv.outstanding == 0, "start_at needs a fresh pair"
    drv.avail_idx_shadow = idx
    drv.last_used_idx = idx
    rings = drv.rings
    rings.avail16[1] = idx
    rings.used16[1] = idx
    rings.avail16[2 + pair.num] = idx
    rings.used16[2 + 4 * pair.num] = idx
    pair.device.set_state(idx, idx)


def make_pair(num: int = 8, features: int = 0, start_idx: int = 0,
              indirect_per_head: int = 4, mem_size: int = 1 << 20) -> RingPair:
    """Build a RingPair (also used directly by hypothesis tests, which cannot take fixtures)."""
    ring_bytes = vring_size(num, 4096)
    ind_bytes = IndirectArea.size_for(num, indirect_per_head) if features & INDIRECT else 0
    mem_size = max(mem_size, ring_bytes + ind_bytes + 4096 + (1 << 16))
    mem = GuestMemory.anonymous(mem_size, gpa=0)
    layout = SplitLayout.legacy(0, num, 4096)
    assert layout.total_span == ring_bytes
    alloc = BumpAllocator(ring_bytes, mem_size)
    indirect: IndirectArea | None = None
    ind_gpa: int | None = None
    if features & INDIRECT:
        ind_gpa = alloc.alloc(ind_bytes, 16)
        indirect = IndirectArea(ind_gpa, mem.translate(ind_gpa, ind_bytes), indirect_per_head)
    driver = SplitDriverQueue(RingViews.map(mem, layout), features, indirect)
    device = SplitDeviceQueue(RingViews.map(mem, layout), mem, features)
    pair = RingPair(mem, layout, driver, device, alloc, features, ind_gpa)
    if start_idx:
        start_at(pair, start_idx)
    return pair


def close_pair(pair: RingPair) -> None:
    """Unmap the memory (GuestMemory.close also closes the memfd anonymous() created)."""
    pair.mem.close()


@contextlib.contextmanager
def pair_ctx(num: int = 8, features: int = 0, start_idx: int = 0,
             indirect_per_head: int = 4) -> Iterator[RingPair]:
    pair = make_pair(num, features, start_idx, indirect_per_head)
    try:
        yield pair
    finally:
        close_pair(pair)


@pytest.fixture
def ring_pair() -> Iterator[Callable[..., RingPair]]:
    """Factory ``ring_pair(num=8, features=0, start_idx=0, indirect_per_head=4)``."""
    made: list[RingPair] = []

    def factory(num: int = 8, features: int = 0, start_idx: int = 0,
                indirect_per_head: int = 4) -> RingPair:
        pair = make_pair(num, features, start_idx, indirect_per_head)
        made.append(pair)
        return pair

    yield factory
    for pair in made:
        close_pair(pair)


def write_desc(pair: RingPair, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
    """Write descriptor ``i`` of the table as a (possibly hostile) driver would."""
    DESC.pack_into(pair.driver.rings.desc, i * DESC_SIZE, addr, length, flags, nxt)


def publish_heads(pair: RingPair, *heads: int) -> None:
    """Put raw heads in the available ring and move avail.idx, bypassing the driver."""
    avail = pair.driver.rings.avail16
    idx = int(avail[1])
    for h in heads:
        avail[2 + (idx & (pair.num - 1))] = h
        idx = (idx + 1) & 0xFFFF
    avail[1] = idx
