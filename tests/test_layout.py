"""Split ring layout against the byte offsets of VIRTIO 1.2 §2.7.

Sections: §2.7.2 legacy layout and vring_size, §2.7.5 descriptors, §2.7.6 available
ring, §2.7.8 used ring.
"""

from __future__ import annotations

import struct

import pytest

from conftest import pair_ctx
from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.layout import (
    DESC,
    RingViews,
    SplitLayout,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    used_event_offset,
    used_ring_size,
    vring_size,
)
from pyvirtio.core.memory import GuestMemory

POW2 = [1 << k for k in range(16)]  # 1 .. 32768


def linux_vring_size(num: int, align: int) -> int:
    """Linux include/uapi/linux/virtio_ring.h vring_size, written out independently."""
    return ((16 * num + 2 * (3 + num) + align - 1) & ~(align - 1)) + 2 * 3 + 8 * num


def test_vring_size_equals_linux_for_every_power_of_two() -> None:
    assert POW2[-1] == 32768
    for num in POW2:
        assert vring_size(num, 4096) == linux_vring_size(num, 4096), num


@pytest.mark.parametrize("align", [4, 64, 4096, 65536])
def test_vring_size_other_aligns(align: int) -> None:
    for num in POW2:
        assert vring_size(num, align) == linux_vring_size(num, align)


def test_descriptor_is_16_bytes_le_addr_len_flags_next() -> None:
    assert DESC.size == 16
    raw = DESC.pack(0x1122334455667788, 0xAABBCCDD, 0x0102, 0x0304)
    assert raw[0:8] == (0x1122334455667788).to_bytes(8, "little")
    assert raw[8:12] == (0xAABBCCDD).to_bytes(4, "little")
    assert raw[12:14] == (0x0102).to_bytes(2, "little")
    assert raw[14:16] == (0x0304).to_bytes(2, "little")
    assert DESC.unpack(raw) == (0x1122334455667788, 0xAABBCCDD, 0x0102, 0x0304)


@pytest.mark.parametrize("num", [1, 2, 8, 256, 32768])
def test_part_sizes_and_event_offsets(num: int) -> None:
    assert desc_table_size(num) == 16 * num
    assert avail_ring_size(num) == 2 + 2 + 2 * num + 2
    assert used_ring_size(num) == 2 + 2 + 8 * num + 2
    assert used_event_offset(num) == 4 + 2 * num
    assert avail_event_offset(num) == 4 + 8 * num


@pytest.mark.parametrize("num", [1, 4, 256, 32768])
def test_legacy_layout_is_contiguous_and_used_aligned(num: int) -> None:
    base = 0x10000
    lay = SplitLayout.legacy(base, num, 4096)
    assert lay.desc == base
    assert lay.avail == base + 16 * num
    assert lay.used % 4096 == 0
    assert lay.used >= lay.avail + 2 * (3 + num)
    assert lay.used - (lay.avail + 2 * (3 + num)) < 4096
    assert lay.total_span == vring_size(num, 4096)


@pytest.mark.parametrize("num", [0, 3, 100, 65536])
def test_legacy_layout_rejects_bad_sizes(num: int) -> None:
    with pytest.raises(CallerError):
        SplitLayout.legacy(0, num)


def test_modern_layout_three_addresses() -> None:
    lay = SplitLayout.modern(256, 0x3000, 0x1002, 0x8004)
    assert (lay.num, lay.desc, lay.avail, lay.used) == (256, 0x3000, 0x1002, 0x8004)
    assert lay.total_span == 0x8004 + used_ring_size(256) - 0x1002


@pytest.mark.parametrize(
    ("desc", "avail", "used"),
    [(0x1008, 0x2000, 0x3000), (0x1000, 0x2001, 0x3000), (0x1000, 0x2000, 0x3002)],
)
def test_modern_layout_misaligned_is_a_peer_error(desc: int, avail: int, used: int) -> None:
    with pytest.raises(PeerError):
        SplitLayout.modern(256, desc, avail, used)


@pytest.mark.parametrize("num", [0, 3, 65536])
def test_modern_layout_bad_size_is_a_peer_error(num: int) -> None:
    with pytest.raises(PeerError):
        SplitLayout.modern(num, 0x1000, 0x2000, 0x3000)


@pytest.mark.parametrize("num", [1, 8, 256])
def test_ring_views_hit_the_spec_byte_offsets(num: int) -> None:
    with pair_ctx(num=num) as pair:
        lay, mem = pair.layout, pair.mem
        views = RingViews.map(mem, lay)
        views.avail16[0] = 0x0101
        views.avail16[1] = 0x0202
        for i in range(num):
            views.avail16[2 + i] = 0x1000 + i
        views.avail16[2 + num] = 0xBEEF  # used_event
        views.used16[0] = 0x0303
        views.used16[1] = 0x0404
        for i in range(num):
            views.used32[1 + 2 * i] = 0x2000_0000 + i
            views.used32[2 + 2 * i] = 0x3000_0000 + i
        views.used16[2 + 4 * num] = 0xCAFE  # avail_event
        avail = mem.read(lay.avail, avail_ring_size(num))
        used = mem.read(lay.used, used_ring_size(num))
        assert struct.unpack_from("<HH", avail, 0) == (0x0101, 0x0202)
        for i in range(num):
            assert struct.unpack_from("<H", avail, 4 + 2 * i)[0] == 0x1000 + i
        assert struct.unpack_from("<H", avail, used_event_offset(num))[0] == 0xBEEF
        assert struct.unpack_from("<HH", used, 0) == (0x0303, 0x0404)
        for i in range(num):
            assert struct.unpack_from("<II", used, 4 + 8 * i) == (0x2000_0000 + i, 0x3000_0000 + i)
        assert struct.unpack_from("<H", used, avail_event_offset(num))[0] == 0xCAFE
        # And the descriptor table is plain 16-byte entries from lay.desc.
        DESC.pack_into(views.desc, 16 * (num - 1), 0xABCDEF, 77, 3, 5)
        assert DESC.unpack(mem.read(lay.desc + 16 * (num - 1), 16)) == (0xABCDEF, 77, 3, 5)


def test_ring_views_reject_wrong_sizes() -> None:
    lay = SplitLayout.legacy(0, 8)
    buf = memoryview(bytearray(8192))
    with pytest.raises(CallerError):
        RingViews(lay, buf[:127], buf[:22], buf[:70])


def test_ring_views_map_unmapped_ring_is_a_peer_error() -> None:
    mem = GuestMemory.anonymous(8192, gpa=0)
    try:
        with pytest.raises(PeerError):
            RingViews.map(mem, SplitLayout.legacy(0, 256))  # needs more than 8 KiB
        with pytest.raises(PeerError):
            RingViews.map(mem, SplitLayout.modern(8, 0x10000, 0x20000, 0x30000))
    finally:
        mem.close()
