"""PackedDriverQueue against VIRTIO 1.2 §2.8 and Linux's virtio_ring.c packed functions.

What the driver writes is read back raw from the ring (§2.8.13): descriptor
contents, AVAIL/USED bits and the wrap counter (§2.8.1, §2.8.21.1), indirect
tables (§2.8.7), the driver event suppression structure (§2.8.14); what the
device writes is written raw here, as a device (or a hostile one) would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from packed_harness import (
    EVENT_IDX,
    INDIRECT,
    PackedPair,
    close_packed_pair,
    make_packed_pair,
    write_pdesc,
)
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError, QueueFull
from pyvirtio.core.packed_layout import (
    PACKED_DESC,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    avail_flags,
    used_flags,
)
from pyvirtio.core.spec import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE


@pytest.fixture
def pairs() -> Iterator[list[PackedPair]]:
    made: list[PackedPair] = []
    yield made
    for p in made:
        close_packed_pair(p)


def new(made: list[PackedPair], **kw: object) -> PackedPair:
    p = make_packed_pair(**kw)  # type: ignore[arg-type]
    made.append(p)
    return p


def desc(p: PackedPair, i: int) -> tuple[int, int, int, int]:
    return PACKED_DESC.unpack_from(p.driver.rings.desc, 16 * i)


def mark_used(p: PackedPair, pos: int, bid: int, length: int, wrap: int) -> None:
    """Write a used descriptor as a device does."""
    write_pdesc(p, pos, 0, length, bid, used_flags(wrap))


def test_add_writes_the_chain_with_ids_and_wrap_bits(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=3)
    drv = p.driver
    bid = drv.add([(0x5000, 10)], [(0x6000, 20), (0x7000, 30)], "t")
    assert bid == 0 and drv.num_free == 0 and drv.outstanding == 1
    a = avail_flags(1)
    assert desc(p, 0) == (0x5000, 10, 0, a | VRING_DESC_F_NEXT)
    assert desc(p, 1) == (0x6000, 20, 0, a | VRING_DESC_F_NEXT | VRING_DESC_F_WRITE)
    assert desc(p, 2) == (0x7000, 30, 0, a | VRING_DESC_F_WRITE)
    # The ring is full; the next add wraps into lap 0 once positions come back.
    assert drv.next_avail_idx == 0 and drv.avail_wrap_counter == 0
    with pytest.raises(QueueFull):
        drv.add([(0x5000, 1)], [], "u")
    mark_used(p, 0, 0, 60, 1)
    assert drv.get_buf() == ("t", 60)
    assert drv.last_used_idx == 0 and drv.used_wrap_counter == 0 and drv.num_free == 3
    drv.add([(0x5100, 1)], [], "u")
    assert desc(p, 0) == (0x5100, 1, 0, avail_flags(0))


def test_a_chain_across_the_end_of_the_ring_flips_the_bits_midway(
        pairs: list[PackedPair]) -> None:
    p = new(pairs, num=5, start=(3, 1))
    p.driver.add([(0x5000, 1), (0x5100, 2), (0x5200, 3)], [], "t")
    assert desc(p, 3)[3] == avail_flags(1) | VRING_DESC_F_NEXT
    assert desc(p, 4)[3] == avail_flags(1) | VRING_DESC_F_NEXT
    assert desc(p, 0)[3] == avail_flags(0)
    assert p.driver.next_avail_idx == 1 and p.driver.avail_wrap_counter == 0


def test_ids_are_reused_out_of_order(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    drv = p.driver
    ids = [drv.add([(0x5000 + i, 1)], [], f"t{i}") for i in range(4)]
    assert ids == [0, 1, 2, 3]
    # The device completes 2, then 0.
    mark_used(p, 1, 0, 0, 1)
    mark_used(p, 0, 2, 0, 1)
    assert drv.get_buf() == ("t2", 0)
    assert drv.get_buf() == ("t0", 0)
    # The id freed last is the first reused, then the one before.
    assert drv.add([(0x6000, 1)], [], "a") == 0
    assert drv.add([(0x6000, 1)], [], "b") == 2
    assert desc(p, 0)[2] == 0 and desc(p, 1)[2] == 2


def test_get_buf_skips_the_positions_of_the_chain(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=6)
    drv = p.driver
    drv.add([(0x5000, 1), (0x5100, 1), (0x5200, 1)], [], "three")
    drv.add([(0x5300, 1)], [], "one")
    mark_used(p, 0, 0, 0, 1)
    mark_used(p, 3, 1, 0, 1)
    assert drv.get_buf() == ("three", 0)
    assert drv.last_used_idx == 3
    assert drv.get_buf() == ("one", 0)
    assert drv.get_buf() is None and drv.num_free == 6


def test_indirect_table(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=2, features=INDIRECT, indirect_per_head=3)
    drv = p.driver
    assert p.indirect_gpa is not None
    bid = drv.add([(0x5000, 4)], [(0x6000, 8), (0x7000, 12)], "t")
    assert drv.num_free == 1
    slot = p.indirect_gpa + 16 * 3 * bid
    assert desc(p, 0) == (slot, 48, bid, avail_flags(1) | VRING_DESC_F_INDIRECT)
    table = [PACKED_DESC.unpack(p.mem.read(slot + 16 * j, 16)) for j in range(3)]
    assert table == [(0x5000, 4, 0, 0), (0x6000, 8, 0, VRING_DESC_F_WRITE),
                     (0x7000, 12, 0, VRING_DESC_F_WRITE)]
    with pytest.raises(CallerError):
        drv.add([(0x5000, 1)] * 4, [], "too many")
    # One segment never goes indirect.
    drv.add([(0x8000, 4)], [], "one")
    assert desc(p, 1)[3] & VRING_DESC_F_INDIRECT == 0


@pytest.mark.parametrize("flags, expected", [(VRING_PACKED_EVENT_FLAG_ENABLE, True),
                                             (VRING_PACKED_EVENT_FLAG_DISABLE, False)])
def test_kick_prepare_reads_the_device_flags(pairs: list[PackedPair], flags: int,
                                             expected: bool) -> None:
    p = new(pairs, num=4)
    p.driver.rings.device16[1] = flags
    p.driver.add([(0x5000, 1)], [], "t")
    assert p.driver.kick_prepare() is expected


@pytest.mark.parametrize("num", [3, 4, 7])
def test_kick_prepare_event_with_wrap_counter(num: int) -> None:
    """vring_need_event over ring positions, an event of the other lap one ring behind.

    Positions are laid out linearly from the driver's start (lap 0 has its
    wrap counter ``wrap``, the next lap the other); the device's event lies
    at most one ring behind the driver's new position and never ahead of it.
    The driver must kick exactly when it made the event's descriptor
    available; after a whole ring of adds it may kick when it need not.
    """
    for start in range(num):
        for wrap in (0, 1):
            for added in range(1, num + 1):
                new_pos = start + added
                for ev_pos in range(num):
                    for ev_wrap in (0, 1):
                        lap = next((k for k in (-1, 0, 1, 2)
                                    if new_pos - num <= ev_pos + k * num <= new_pos
                                    and wrap ^ (k & 1) == ev_wrap), None)
                        if lap is None:
                            continue  # no device could have named it
                        event = ev_pos + lap * num
                        wanted = start <= event < new_pos
                        p = make_packed_pair(num=num, features=EVENT_IDX, start=(start, wrap))
                        try:
                            drv = p.driver
                            drv.rings.device16[0] = ev_pos | ev_wrap << 15
                            drv.rings.device16[1] = VRING_PACKED_EVENT_FLAG_DESC
                            for i in range(added):
                                drv.add([(0x5000 + i, 1)], [], i)
                            decided = drv.kick_prepare()
                            case = (start, wrap, added, ev_pos, ev_wrap)
                            if added < num:
                                assert decided is wanted, case
                            else:
                                assert decided or not wanted, case
                        finally:
                            close_packed_pair(p)


def test_kick_prepare_after_a_full_ring_of_adds_always_kicks(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=2, features=EVENT_IDX)
    drv = p.driver
    drv.rings.device16[1] = VRING_PACKED_EVENT_FLAG_DESC
    drv.rings.device16[0] = 1 << 15  # position 0 of lap 1: long passed
    for i in range(3):
        bid = drv.add([(0x5000, 1)], [], i)
        mark_used(p, drv.last_used_idx, bid, 0, drv.used_wrap_counter)
        assert drv.get_buf() == (i, 0)
    assert drv.kick_prepare() is True


def test_disable_enable_cb_flags_mode(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    drv = p.driver
    drv.disable_cb()
    assert p.driver_event == (0, VRING_PACKED_EVENT_FLAG_DISABLE)
    assert drv.enable_cb() is False
    assert p.driver_event == (0, VRING_PACKED_EVENT_FLAG_ENABLE)
    drv.add([(0x5000, 1)], [], "t")
    mark_used(p, 0, 0, 0, 1)
    drv.disable_cb()
    assert drv.enable_cb() is True  # a used buffer is waiting: poll again


def test_event_idx_off_wrap_follows_last_used(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=3, features=EVENT_IDX)
    drv = p.driver
    drv.disable_cb()
    assert drv.enable_cb() is False
    assert p.driver_event == (0 | 1 << 15, VRING_PACKED_EVENT_FLAG_DESC)
    for i in range(3):
        drv.add([(0x5000, 1)], [], i)
    for i in range(3):
        mark_used(p, i, i, 0, 1)
        drv.get_buf()
        # Interrupts on: off_wrap names the next used descriptor, wrap included.
        nxt = (i + 1) % 3
        assert p.driver_event[0] == nxt | (0 if i == 2 else 1) << 15


def test_enable_cb_delayed_aims_at_three_quarters(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=7, features=EVENT_IDX, start=(5, 1))
    drv = p.driver
    for i in range(4):
        drv.add([(0x5000, 1), (0x5100, 1)] if i == 0 else [(0x5000, 1)], [], i)
    # 5 positions in flight: the event 3 positions on, across the end of the ring.
    # (Like Linux, the flags become DESC on the way out of DISABLE.)
    drv.disable_cb()
    assert drv.enable_cb_delayed() is False
    assert p.driver_event == ((5 + 3) % 7 | 0 << 15, VRING_PACKED_EVENT_FLAG_DESC)
    mark_used(p, 5, 0, 0, 1)
    assert drv.enable_cb_delayed() is True


def test_bad_used_ids_break_the_queue(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    drv = p.driver
    drv.add([(0x5000, 1)], [], "t")
    mark_used(p, 0, 9, 0, 1)
    with pytest.raises(PeerError, match="out of range"):
        drv.get_buf()
    with pytest.raises(QueueBrokenError):
        drv.get_buf()
    q = new(pairs, num=4)
    q.driver.add([(0x5000, 1)], [], "t")
    mark_used(q, 0, 2, 0, 1)
    with pytest.raises(PeerError, match="not an outstanding"):
        q.driver.get_buf()


def test_get_bufs_stops_before_a_bad_one(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4, features=EVENT_IDX)
    drv = p.driver
    drv.disable_cb()
    assert drv.enable_cb() is False  # flags DESC: get_bufs keeps off_wrap current
    for i in range(3):
        drv.add([(0x5000, 1)], [], i)
    mark_used(p, 0, 1, 5, 1)
    mark_used(p, 1, 1, 5, 1)  # the same id twice
    assert drv.get_bufs() == [(1, 5)]
    assert p.driver_event[0] == 1 | 1 << 15
    with pytest.raises(PeerError):
        drv.get_bufs()


def test_detach_unused_and_argument_errors(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    drv = p.driver
    drv.add([(0x5000, 1), (0x5100, 1)], [], "a")
    drv.add([(0x5000, 1)], [], "b")
    assert sorted(str(t) for t in drv.detach_unused()) == ["a", "b"]
    assert drv.num_free == 4 and drv.outstanding == 0
    with pytest.raises(CallerError):
        drv.add([], [], "x")
    with pytest.raises(CallerError):
        drv.add([(0x5000, 1)], [], None)
