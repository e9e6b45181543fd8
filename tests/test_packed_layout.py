"""Packed ring layout against the byte offsets of VIRTIO 1.2 §2.8.

Sections: §2.8.1 wrap counters and the AVAIL/USED bits, §2.8.10.1 sizes and
alignment, §2.8.13 descriptor format, §2.8.14 event suppression format;
QEMU docs/interop/vhost-user.rst for the packed VRING_BASE.
"""

from __future__ import annotations

import pytest

from pyvirtio.core.errors import CallerError, PeerError
from pyvirtio.core.memory import GuestMemory
from pyvirtio.core.packed_layout import (
    PACKED_DESC,
    PACKED_DESC_BODY,
    VRING_PACKED_DESC_F_AVAIL,
    VRING_PACKED_DESC_F_USED,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    PackedLayout,
    PackedRingViews,
    avail_flags,
    is_desc_avail,
    is_desc_used,
    is_valid_packed_queue_size,
    pack_vring_base,
    packed_ring_size,
    unpack_vring_base,
    used_flags,
)


def test_descriptor_is_16_bytes_le_addr_len_id_flags() -> None:
    assert PACKED_DESC.size == 16 and PACKED_DESC_BODY.size == 14
    raw = PACKED_DESC.pack(0x1122334455667788, 0xAABBCCDD, 0x0102, 0x0304)
    assert raw[0:8] == (0x1122334455667788).to_bytes(8, "little")
    assert raw[8:12] == (0xAABBCCDD).to_bytes(4, "little")
    assert raw[12:14] == (0x0102).to_bytes(2, "little")  # id
    assert raw[14:16] == (0x0304).to_bytes(2, "little")  # flags
    assert PACKED_DESC_BODY.pack(0x1122334455667788, 0xAABBCCDD, 0x0102) == raw[:14]


def test_flag_bits_and_event_flags() -> None:
    assert VRING_PACKED_DESC_F_AVAIL == 1 << 7 and VRING_PACKED_DESC_F_USED == 1 << 15
    assert (VRING_PACKED_EVENT_FLAG_ENABLE, VRING_PACKED_EVENT_FLAG_DISABLE,
            VRING_PACKED_EVENT_FLAG_DESC) == (0, 1, 2)


@pytest.mark.parametrize("wrap", [0, 1])
def test_avail_and_used_bits_for_each_wrap_counter(wrap: int) -> None:
    a, u = VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED
    # Available: AVAIL matches the counter, USED is its inverse.
    assert avail_flags(wrap) == (a if wrap else u)
    # Used: both match the counter.
    assert used_flags(wrap) == (a | u if wrap else 0)
    for other in (0, 1, 2, 4, 0x7F7F):  # bits other than AVAIL/USED do not matter
        assert is_desc_avail(avail_flags(wrap) | other & ~(a | u), wrap)
        assert not is_desc_avail(avail_flags(wrap), wrap ^ 1)
        assert is_desc_used(used_flags(wrap) | other & ~(a | u), wrap)
        assert not is_desc_used(used_flags(wrap), wrap ^ 1)
        assert not is_desc_used(avail_flags(wrap), wrap)
    # A zeroed ring is "used in lap 0": nothing for either side at wrap 1.
    assert not is_desc_avail(0, 1) and not is_desc_used(0, 1)


def test_sizes_need_not_be_powers_of_two() -> None:
    assert [n for n in range(0, 40) if is_valid_packed_queue_size(n)] == list(range(1, 40))
    assert is_valid_packed_queue_size(32768) and not is_valid_packed_queue_size(32769)
    assert packed_ring_size(3) == 48


def test_contiguous_layout_offsets_and_alignment() -> None:
    lay = PackedLayout.contiguous(0x1000, 5)
    assert (lay.desc, lay.driver, lay.device) == (0x1000, 0x1000 + 80, 0x1000 + 84)
    assert lay.total_span == 88
    with pytest.raises(CallerError):
        PackedLayout.contiguous(0x1008, 5)
    with pytest.raises(CallerError):
        PackedLayout.contiguous(0, 0)


def test_modern_layout_checks_what_the_peer_sent() -> None:
    assert PackedLayout.modern(7, 0x100, 0x204, 0x308).num == 7
    for args in [(0, 0x100, 0x200, 0x300), (32769, 0x100, 0x200, 0x300),
                 (8, 0x108, 0x200, 0x300), (8, 0x100, 0x202, 0x300), (8, 0x100, 0x200, 0x301)]:
        with pytest.raises(PeerError):
            PackedLayout.modern(*args)


def test_views_index_the_spec_fields() -> None:
    mem = GuestMemory.anonymous(1 << 16)
    try:
        lay = PackedLayout.contiguous(0x100, 3)
        v = PackedRingViews.map(mem, lay)
        PACKED_DESC.pack_into(v.desc, 16 * 2, 0xDEAD, 0x1234, 7, 0x8081)
        fields = (v.desc16[8 * 2 + 6], v.desc16[8 * 2 + 7], v.desc32[4 * 2 + 2])
        assert fields == (7, 0x8081, 0x1234)
        v.driver16[0] = 0x8002
        v.driver16[1] = 2
        assert mem.read(lay.driver, 4) == bytes([0x02, 0x80, 0x02, 0x00])
        assert v.driver32[0] == 0x8002 | 2 << 16
        v.device16[1] = 1
        assert mem.read(lay.device, 4) == bytes([0, 0, 1, 0])
        with pytest.raises(CallerError):
            PackedRingViews(lay, v.desc[:16], v.driver16, v.device16)
    finally:
        mem.close()


def test_vring_base_packs_both_positions_and_wrap_counters() -> None:
    # bits 0-14 avail index, 15 avail wrap, 16-30 used index, 31 used wrap.
    assert pack_vring_base(5, 1, 3, 0) == 5 | 1 << 15 | 3 << 16
    assert pack_vring_base(0x7FFF, 1, 0x7FFF, 1) == 0xFFFFFFFF
    for value in (0, 0x8005_0003, 0x1234_5678, 0xFFFFFFFF):
        assert pack_vring_base(*unpack_vring_base(value)) == value
