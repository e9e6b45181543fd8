"""Byte layout of the split virtqueue, VIRTIO 1.2 §2.7.

::

    descriptor table  16 * num bytes, align 16   (§2.7.5)
        le64 addr; le32 len; le16 flags; le16 next;
    available ring    6 + 2 * num bytes, align 2   (§2.7.6)
        le16 flags; le16 idx; le16 ring[num]; le16 used_event;
    used ring         6 + 8 * num bytes, align 4   (§2.7.8)
        le16 flags; le16 idx; struct { le32 id; le32 len; } ring[num]; le16 avail_event;

The legacy interface (§2.7.2) puts the three parts in one contiguous block:
the descriptor table, the available ring right after it, then the used ring
at the next multiple of ``align`` (4096 for virtio-pci).  Its total size is
:func:`vring_size`, the same formula as Linux's ``vring_size``.

:class:`RingViews` turns a layout plus guest memory into the typed views both
ring sides use, so the driver and the device read and write the same bytes
the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.spec import MAX_QUEUE_SIZE

if TYPE_CHECKING:
    from pyvirtio.core.memory import GuestMemory

DESC_SIZE: Final = 16
DESC = struct.Struct("<QIHH")
# Typed handles on DESC's methods, shared by every module that reads or
# writes descriptors: the declared field types let mypyc keep the fields as
# native integers (setup.py) instead of generic objects.
unpack_desc: Final[Callable[[memoryview, int], tuple[int, int, int, int]]] = DESC.unpack_from
pack_desc: Final[Callable[[memoryview, int, int, int, int, int], None]] = DESC.pack_into
USED_ELEM_SIZE: Final = 8

# Byte offsets inside the rings, §2.7.6 and §2.7.8.
AVAIL_FLAGS: Final = 0
AVAIL_IDX: Final = 2
AVAIL_RING: Final = 4
USED_FLAGS: Final = 0
USED_IDX: Final = 2
USED_RING: Final = 4

DESC_ALIGN: Final = 16
AVAIL_ALIGN: Final = 2
USED_ALIGN: Final = 4


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    """flags, idx, ring[num], used_event."""
    return 2 * (3 + num)


def used_ring_size(num: int) -> int:
    """flags, idx, ring[num] of 8-byte elements, avail_event."""
    return 2 * 3 + USED_ELEM_SIZE * num


def used_event_offset(num: int) -> int:
    """Byte offset of ``used_event`` inside the available ring."""
    return AVAIL_RING + 2 * num


def avail_event_offset(num: int) -> int:
    """Byte offset of ``avail_event`` inside the used ring."""
    return USED_RING + USED_ELEM_SIZE * num


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def vring_size(num: int, align: int) -> int:
    """Bytes of the legacy contiguous ring of ``num`` entries (Linux ``vring_size``)."""
    return align_up(desc_table_size(num) + avail_ring_size(num), align) + used_ring_size(num)


def is_valid_queue_size(num: int) -> bool:
    """Split rings have a power-of-two size of at most 32768 (§2.7)."""
    return 0 < num <= MAX_QUEUE_SIZE and num & (num - 1) == 0


@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True)
class SplitLayout:
    """Where the three parts of one split ring live (guest or user addresses)."""

    num: int
    desc: int
    avail: int
    used: int

    @classmethod
    def legacy(cls, base: int, num: int, align: int = 4096) -> SplitLayout:
        """The contiguous legacy layout starting at ``base`` (§2.7.2)."""
        if not is_valid_queue_size(num):
            raise CallerError(f"queue size {num} is not a power of two in 1..32768")
        avail = base + desc_table_size(num)
        used = align_up(avail + avail_ring_size(num), align)
        return cls(num, base, avail, used)

    @classmethod
    def modern(cls, num: int, desc: int, avail: int, used: int) -> SplitLayout:
        """Three separately placed parts (§2.7, VIRTIO 1.0 and later).

        Raises :class:`PeerError`: the addresses come from the other side.
        """
        if not is_valid_queue_size(num):
            raise PeerError(f"queue size {num} is not a power of two in 1..32768")
        if desc % DESC_ALIGN or avail % AVAIL_ALIGN or used % USED_ALIGN:
            raise PeerError(
                f"misaligned ring: desc={desc:#x} (align 16) avail={avail:#x} (align 2) "
                f"used={used:#x} (align 4)"
            )
        return cls(num, desc, avail, used)

    @property
    def total_span(self) -> int:
        """From the lowest part to the end of the highest (for the legacy layout: vring_size)."""
        ends = (
            self.desc + desc_table_size(self.num),
            self.avail + avail_ring_size(self.num),
            self.used + used_ring_size(self.num),
        )
        return max(ends) - min(self.desc, self.avail, self.used)


@mypyc_attr(allow_interpreted_subclasses=True)
class RingViews:
    """Typed views of one split ring's three parts in shared memory.

    ``avail16`` indexes the available ring in 16-bit words: ``[0]`` flags,
    ``[1]`` idx, ``[2 + i]`` ring[i], ``[2 + num]`` used_event.
    ``used16`` indexes the used ring in 16-bit words: ``[0]`` flags, ``[1]``
    idx, ``[2 + 4 * num]`` avail_event; ``used32`` in 32-bit words:
    ``[1 + 2 * i]`` ring[i].id, ``[2 + 2 * i]`` ring[i].len.  Every index read
    is one aligned load of the right width (a single ``memoryview`` item).
    """

    __slots__ = ("avail16", "desc", "layout", "num", "used16", "used32")

    def __init__(self, layout: SplitLayout, desc: memoryview, avail: memoryview,
                 used: memoryview) -> None:
        num = layout.num
        if (len(desc) != desc_table_size(num) or len(avail) != avail_ring_size(num)
                or len(used) != used_ring_size(num)):
            raise CallerError("ring views have the wrong sizes for the layout")
        self.layout = layout
        self.num = num
        self.desc = desc.cast("B")
        self.avail16 = avail.cast("B").cast("H")
        # The used ring is 6 + 8*num bytes: the 32-bit view covers the whole
        # 4-byte words only (flags/idx word, then the elements).
        used_b = used.cast("B")
        self.used16 = used_b.cast("H")
        self.used32 = used_b[: 4 + USED_ELEM_SIZE * num].cast("I")

    @classmethod
    def map(cls, memory: GuestMemory, layout: SplitLayout) -> RingViews:
        """Translate the layout's guest addresses (PeerError if any part is unmapped)."""
        num = layout.num
        return cls(
            layout,
            memory.translate(layout.desc, desc_table_size(num)),
            memory.translate(layout.avail, avail_ring_size(num)),
            memory.translate(layout.used, used_ring_size(num)),
        )
