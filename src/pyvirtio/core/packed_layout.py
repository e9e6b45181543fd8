"""Byte layout of the packed virtqueue, VIRTIO 1.2 §2.8.

::

    descriptor ring            16 * num bytes, align 16   (§2.8.13, §2.8.10.1)
        le64 addr; le32 len; le16 id; le16 flags;
    driver event suppression   4 bytes, align 4            (§2.8.14, the Driver Area)
    device event suppression   4 bytes, align 4            (§2.8.14, the Device Area)
        le16 off_wrap;   bits 0-14 descriptor offset, bit 15 wrap counter
        le16 flags;      ENABLE 0, DISABLE 1, DESC 2 (DESC only with EVENT_IDX)

A descriptor is available when its AVAIL bit (7) equals the driver's wrap
counter and its USED bit (15) does not; used when both equal the device's
wrap counter (§2.8.1).  Both counters start at 1 over a zeroed ring, so a
zeroed descriptor reads as "used in lap 0" to both sides: nothing to do.
Queue sizes need not be powers of two: 1..32768 (§2.8, §2.8.10.1).

Memory order, the packed counterpart of the split ring's "entries before the
index" (docs/architecture.md "Memory ordering"): a descriptor's ``flags`` is
what publishes it, so a writer stores addr/len/id first and ``flags`` last, as
one aligned 16-bit store; a chain's first descriptor's flags is stored after
every other descriptor of the chain (§2.8.6, §2.8.21.1), and a batch of used
descriptors publishes its first one last (§2.8.9, "Multi-buffer requests").
A reader loads ``flags`` once, as one aligned 16-bit load through
:attr:`PackedRingViews.desc16`, and only then the other fields (x86-64 keeps
loads in order; core/barrier.py).
The event suppression structure is read as one aligned 32-bit load
(:attr:`PackedRingViews.driver32`), so ``off_wrap`` and ``flags`` come from the
same instant, as Linux's ``virtqueue_kick_prepare_packed`` reads its snapshot.

vhost-user's VRING_BASE carries a packed ring's state as one 32-bit number
(QEMU docs/interop/vhost-user.rst, "Vring descriptor indices for packed
virtqueues"): bits 0-14 the next available descriptor, bit 15 its wrap
counter, bits 16-30 the next used descriptor, bit 31 its wrap counter;
:func:`pack_vring_base` and :func:`unpack_vring_base` convert.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from mypy_extensions import mypyc_attr

from pyvirtio.core.errors import CallerError, PeerError

if TYPE_CHECKING:
    from pyvirtio.core.memory import GuestMemory

PACKED_DESC_SIZE: Final = 16
#: The whole descriptor: addr, len, id, flags (§2.8.13).
PACKED_DESC = struct.Struct("<QIHH")
#: Everything but ``flags``: written before it, read after it.
PACKED_DESC_BODY = struct.Struct("<QIH")
# Typed handles (see layout.py): mypyc keeps the fields as native integers.
unpack_packed_desc: Final[Callable[[memoryview, int], tuple[int, int, int, int]]] = (
    PACKED_DESC.unpack_from)
pack_packed_desc: Final[Callable[[memoryview, int, int, int, int, int], None]] = (
    PACKED_DESC.pack_into)
unpack_desc_body: Final[Callable[[memoryview, int], tuple[int, int, int]]] = (
    PACKED_DESC_BODY.unpack_from)
pack_desc_body: Final[Callable[[memoryview, int, int, int, int], None]] = (
    PACKED_DESC_BODY.pack_into)

# Byte offsets inside one descriptor (§2.8.13).
PD_ADDR: Final = 0
PD_LEN: Final = 8
PD_ID: Final = 12
PD_FLAGS: Final = 14
# The same fields as indices of the typed views, per descriptor i:
# desc16[8 * i + 6] id, desc16[8 * i + 7] flags, desc32[4 * i + 2] len.
D16_PER_DESC: Final = 8
D16_ID: Final = 6
D16_FLAGS: Final = 7
D32_PER_DESC: Final = 4
D32_LEN: Final = 2

# Descriptor flags (§2.8.1, §2.8.3, §2.8.6, §2.8.7).
VRING_PACKED_DESC_F_AVAIL_BIT: Final = 7
VRING_PACKED_DESC_F_USED_BIT: Final = 15
VRING_PACKED_DESC_F_AVAIL: Final = 1 << 7
VRING_PACKED_DESC_F_USED: Final = 1 << 15
#: Both wrap bits: equal in a used descriptor, different in an available one.
AVAIL_USED_MASK: Final = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED

# Event suppression (§2.8.10, §2.8.14).
EVENT_SIZE: Final = 4
EVENT_ALIGN: Final = 4
EVENT_OFF_WRAP: Final = 0
EVENT_FLAGS: Final = 2
VRING_PACKED_EVENT_FLAG_ENABLE: Final = 0
VRING_PACKED_EVENT_FLAG_DISABLE: Final = 1
VRING_PACKED_EVENT_FLAG_DESC: Final = 2
#: Bit of ``off_wrap`` (and of a vhost-user ring state) that holds the wrap counter.
VRING_PACKED_EVENT_F_WRAP_CTR: Final = 15
OFF_MASK: Final = 0x7FFF

DESC_ALIGN: Final = 16
MAX_PACKED_QUEUE_SIZE: Final = 32768


def packed_ring_size(num: int) -> int:
    """Bytes of the descriptor ring of ``num`` entries."""
    return PACKED_DESC_SIZE * num


def is_valid_packed_queue_size(num: int) -> bool:
    """Packed rings have any size in 1..32768 (§2.8: "up to 2^15 entries")."""
    return 0 < num <= MAX_PACKED_QUEUE_SIZE


def avail_flags(wrap: int) -> int:
    """The AVAIL/USED bits that make a descriptor available in lap ``wrap`` (§2.8.1)."""
    return VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED


def used_flags(wrap: int) -> int:
    """The AVAIL/USED bits that mark a descriptor used in lap ``wrap`` (§2.8.1)."""
    return AVAIL_USED_MASK if wrap else 0


def is_desc_avail(flags: int, wrap: int) -> bool:
    """AVAIL matches ``wrap`` and USED does not (QEMU ``is_desc_avail``)."""
    return flags & AVAIL_USED_MASK == (VRING_PACKED_DESC_F_AVAIL if wrap
                                       else VRING_PACKED_DESC_F_USED)


def is_desc_used(flags: int, wrap: int) -> bool:
    """AVAIL and USED both match ``wrap`` (Linux ``is_used_desc_packed``)."""
    return flags & AVAIL_USED_MASK == (AVAIL_USED_MASK if wrap else 0)


def pack_vring_base(avail_idx: int, avail_wrap: int, used_idx: int, used_wrap: int) -> int:
    """The 32-bit VRING_BASE of a packed ring (QEMU docs/interop/vhost-user.rst)."""
    return ((avail_idx & OFF_MASK) | (avail_wrap & 1) << 15
            | ((used_idx & OFF_MASK) | (used_wrap & 1) << 15) << 16)


def unpack_vring_base(num: int) -> tuple[int, int, int, int]:
    """(avail index, avail wrap, used index, used wrap) from a packed VRING_BASE."""
    return num & OFF_MASK, num >> 15 & 1, num >> 16 & OFF_MASK, num >> 31 & 1


@mypyc_attr(allow_interpreted_subclasses=True)
@dataclass(frozen=True, slots=True)
class PackedLayout:
    """Where the three parts of one packed ring live (guest or user addresses).

    ``driver`` is the Driver Area (the driver event suppression structure,
    which the driver writes and the device reads); ``device`` the Device Area.
    """

    num: int
    desc: int
    driver: int
    device: int

    @classmethod
    def contiguous(cls, base: int, num: int) -> PackedLayout:
        """The descriptor ring at ``base``, then the driver and the device areas."""
        if not is_valid_packed_queue_size(num):
            raise CallerError(f"packed queue size {num} is not in 1..32768")
        if base % DESC_ALIGN:
            raise CallerError(f"descriptor ring at {base:#x} is not 16-byte aligned")
        driver = base + packed_ring_size(num)
        return cls(num, base, driver, driver + EVENT_SIZE)

    @classmethod
    def modern(cls, num: int, desc: int, driver: int, device: int) -> PackedLayout:
        """Three separately placed parts, as a transport reports them.

        Raises :class:`PeerError`: the addresses come from the other side.
        """
        if not is_valid_packed_queue_size(num):
            raise PeerError(f"packed queue size {num} is not in 1..32768")
        if desc % DESC_ALIGN or driver % EVENT_ALIGN or device % EVENT_ALIGN:
            raise PeerError(
                f"misaligned packed ring: desc={desc:#x} (align 16) driver={driver:#x} "
                f"(align 4) device={device:#x} (align 4)")
        return cls(num, desc, driver, device)

    @property
    def total_span(self) -> int:
        """From the lowest part to the end of the highest."""
        ends = (self.desc + packed_ring_size(self.num), self.driver + EVENT_SIZE,
                self.device + EVENT_SIZE)
        return max(ends) - min(self.desc, self.driver, self.device)


@mypyc_attr(allow_interpreted_subclasses=True)
class PackedRingViews:
    """Typed views of one packed ring's three parts in shared memory.

    ``desc`` is the descriptor ring in bytes (for struct packing), ``desc16``
    in 16-bit words (``[8 * i + 7]`` flags and ``[8 * i + 6]`` id of
    descriptor ``i``), ``desc32`` in 32-bit words (``[4 * i + 2]`` len).
    ``driver16``/``device16`` index an event suppression structure as
    ``[0]`` off_wrap and ``[1]`` flags; ``driver32``/``device32`` ``[0]`` is
    both at once (off_wrap in the low half).  Each field access is one
    aligned load or store of its width (a single ``memoryview`` item).
    """

    __slots__ = ("desc", "desc16", "desc32", "device16", "device32", "driver16", "driver32",
                 "layout", "num")

    def __init__(self, layout: PackedLayout, desc: memoryview, driver: memoryview,
                 device: memoryview) -> None:
        if (len(desc) != packed_ring_size(layout.num) or len(driver) != EVENT_SIZE
                or len(device) != EVENT_SIZE):
            raise CallerError("packed ring views have the wrong sizes for the layout")
        self.layout = layout
        self.num = layout.num
        self.desc = desc.cast("B")
        self.desc16 = self.desc.cast("H")
        self.desc32 = self.desc.cast("I")
        driver_b = driver.cast("B")
        device_b = device.cast("B")
        self.driver16 = driver_b.cast("H")
        self.driver32 = driver_b.cast("I")
        self.device16 = device_b.cast("H")
        self.device32 = device_b.cast("I")

    @classmethod
    def map(cls, memory: GuestMemory, layout: PackedLayout) -> PackedRingViews:
        """Translate the layout's guest addresses (PeerError if any part is unmapped)."""
        return cls(layout, memory.translate(layout.desc, packed_ring_size(layout.num)),
                   memory.translate(layout.driver, EVENT_SIZE),
                   memory.translate(layout.device, EVENT_SIZE))
