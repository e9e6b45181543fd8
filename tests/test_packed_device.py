"""PackedDeviceQueue against VIRTIO 1.2 §2.8 and QEMU's virtio.c packed functions.

The driver's side is written raw here (write_pdesc), as a guest would, to
reach every rule: chains in the ring (§2.8.6), indirect tables (§2.8.7),
used descriptors (§2.8.9), event suppression (§2.8.10, §2.8.14), and the
hostile cases of docs/architecture.md "Guest input is hostile".
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
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError
from pyvirtio.core.packed_layout import (
    PACKED_DESC,
    VRING_PACKED_EVENT_FLAG_DESC,
    VRING_PACKED_EVENT_FLAG_DISABLE,
    VRING_PACKED_EVENT_FLAG_ENABLE,
    avail_flags,
    used_flags,
)
from pyvirtio.core.spec import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

A1 = avail_flags(1)
N, W, IND = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT
DATA = 0x8000


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


def table(p: PackedPair, gpa: int, *descs: tuple[int, int, int, int]) -> None:
    for j, d in enumerate(descs):
        p.mem.write(gpa + 16 * j, PACKED_DESC.pack(*d))


def test_empty_ring_and_a_chain_in_the_ring(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=5)
    dev = p.device
    assert dev.pop() is None and dev.available() == 0 and dev.is_empty()
    p.mem.write(DATA, b"hello")
    write_pdesc(p, 1, DATA + 16, 4, 3, A1 | W)
    write_pdesc(p, 2, DATA + 32, 8, 3, A1 | W)  # the id is read from the last one
    write_pdesc(p, 0, DATA, 5, 0, A1 | N)
    p.driver.rings.desc16[8 * 1 + 7] = A1 | W | N
    assert dev.available() == 1
    elem = dev.pop()
    assert elem is not None and elem.head == 3
    assert [bytes(v) for v in elem.readable] == [b"hello"]
    assert [len(v) for v in elem.writable] == [4, 8]
    assert elem.readable[0].readonly
    assert dev.inuse == 3 and dev.in_flight == 1 and dev.last_avail_idx == 3


def test_chain_across_the_end_of_the_ring(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=3, start=(2, 1))
    write_pdesc(p, 0, DATA + 16, 4, 1, avail_flags(0) | W)  # next lap: other bits
    write_pdesc(p, 2, DATA, 4, 1, A1 | N)
    elem = p.device.pop()
    assert elem is not None and elem.head == 1 and len(elem.writable) == 1
    assert p.device.get_state()[0] == 1  # position 1, wrap counter 0


def test_indirect_table(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=2, features=INDIRECT)
    table(p, 0x4000, (DATA, 4, 99, 0), (DATA + 8, 8, 0, W | N))  # id, NEXT ignored
    write_pdesc(p, 0, 0x4000, 32, 1, A1 | IND | W)
    elem = p.device.pop()
    assert elem is not None and elem.head == 1
    assert [len(v) for v in elem.readable] == [4] and [len(v) for v in elem.writable] == [8]
    assert p.device.inuse == 1


HOSTILE: dict[str, list[tuple[int, int, int, int, int]]] = {
    # name: descriptors (position, addr, len, id, flags); all on a queue of 4
    "id out of range": [(0, DATA, 4, 4, A1)],
    "chained descriptor not available": [(0, DATA, 4, 0, A1 | N), (1, DATA, 4, 0, 0)],
    "chained descriptor of the wrong lap": [(0, DATA, 4, 0, A1 | N),
                                           (1, DATA, 4, 0, avail_flags(0))],
    "chain longer than the queue": [(i, DATA, 4, 0, A1 | N) for i in range(4)],
    "indirect inside a chain": [(0, DATA, 4, 0, A1 | N), (1, 0x4000, 16, 0, A1 | IND)],
    "readable after writable": [(0, DATA, 4, 0, A1 | W | N), (1, DATA, 4, 0, A1)],
    "zero length": [(0, DATA, 0, 0, A1)],
    "outside memory": [(0, 1 << 40, 4, 0, A1)],
    "length wraps 2^64": [(0, (1 << 64) - 2, 4, 0, A1)],
    "indirect not negotiated": [(0, 0x4000, 16, 0, A1 | IND)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_rings_break_the_queue(pairs: list[PackedPair], name: str) -> None:
    p = new(pairs, num=4)
    for pos, addr, length, bid, flags in reversed(HOSTILE[name]):
        write_pdesc(p, pos, addr, length, bid, flags)
    with pytest.raises(PeerError) as info:
        p.device.pop()
    assert not isinstance(info.value, QueueBrokenError)
    assert p.device.broken is not None and p.device.inuse == 0
    with pytest.raises(QueueBrokenError):
        p.device.pop()


@pytest.mark.parametrize("length, entries", [(0, []), (24, []), (16, [(0x4000, 16, 0, IND)]),
                                             (16 * 1025, [])])
def test_hostile_indirect_tables(pairs: list[PackedPair], length: int,
                                 entries: list[tuple[int, int, int, int]]) -> None:
    p = new(pairs, num=4, features=INDIRECT)
    table(p, 0x4000, *entries)
    write_pdesc(p, 0, 0x4000, length, 0, A1 | IND)
    with pytest.raises(PeerError):
        p.device.pop()
    q = new(pairs, num=4, features=INDIRECT)
    write_pdesc(q, 0, 0x4000, 16, 0, A1 | IND | N)  # indirect with NEXT
    with pytest.raises(PeerError):
        q.device.pop()


def test_an_id_in_flight_twice_breaks_the_queue(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    write_pdesc(p, 0, DATA, 4, 2, A1)
    write_pdesc(p, 1, DATA, 4, 2, A1)
    assert p.device.pop() is not None
    with pytest.raises(PeerError, match="already in flight"):
        p.device.pop()


def test_more_in_flight_than_the_ring_holds_breaks_it(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=2)
    write_pdesc(p, 0, DATA, 4, 0, A1)
    write_pdesc(p, 1, DATA, 4, 1, A1)
    assert p.device.pop() is not None and p.device.pop() is not None
    # Position 0 of lap 0 made available again while both are in flight.
    write_pdesc(p, 0, DATA, 4, 0, avail_flags(0))
    with pytest.raises(PeerError, match="size exceeded"):
        p.device.pop()


def test_fill_flush_writes_used_at_the_positions_the_driver_reads(
        pairs: list[PackedPair]) -> None:
    p = new(pairs, num=6)
    drv, dev = p.driver, p.device
    a = drv.add([(DATA, 4), (DATA, 4), (DATA, 4)], [], "a")  # three positions
    b = drv.add([(DATA, 4)], [(DATA + 64, 8)], "b")  # two
    c = drv.add([(DATA, 4)], [], "c")  # one
    elems = [dev.pop() for _ in range(3)]
    assert [e.head for e in elems if e is not None] == [a, b, c]
    # Complete c, then a, then b: used descriptors at 0, 1 and 4.
    dev.fill(c, 0, 0)
    dev.fill(a, 0, 1)
    dev.fill(b, 8, 2)
    dev.flush(3)
    desc16 = drv.rings.desc16
    assert [desc16[8 * i + 6] for i in (0, 1, 4)] == [c, a, b]
    assert desc16[8 * 4 + 7] == used_flags(1) | W  # b wrote 8 bytes
    assert desc16[8 * 0 + 7] == used_flags(1)
    assert dev.get_state() == (0, 0) and dev.inuse == 0
    assert drv.get_bufs() == [("c", 0), ("a", 0), ("b", 8)]


def test_flush_refuses_what_is_not_in_flight(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    p.driver.add([(DATA, 4)], [], "t")
    elem = p.device.pop()
    assert elem is not None
    p.device.fill(3, 0, 0)
    with pytest.raises(CallerError):
        p.device.flush(1)
    p.device.fill(elem.head, 0, 0)
    with pytest.raises(CallerError):
        p.device.flush(2)
    p.device.push(elem.head, 0)
    assert p.driver.get_buf() == ("t", 0)


def test_unpop_and_pop_batch(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=5)
    for i in range(3):
        p.driver.add([(DATA, 4), (DATA, 4)] if i == 1 else [(DATA, 4)], [], i)
    batch = p.device.pop_batch(8)
    assert [e.head for e in batch] == [0, 1, 2] and p.device.inuse == 4
    p.device.unpop(2)
    assert p.device.get_state()[0] == 1 | 1 << 15 and p.device.inuse == 1
    assert [e.head for e in p.device.pop_batch(1)] == [1]
    p.device.push(1, 0)
    with pytest.raises(CallerError):
        p.device.unpop(1)  # buffer 0 is not the most recent pop
    assert [e.head for e in p.device.pop_batch(8)] == [2]


def test_pop_batch_stops_before_a_bad_buffer(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    write_pdesc(p, 0, DATA, 4, 0, A1)
    write_pdesc(p, 1, DATA, 4, 9, A1)
    assert [e.head for e in p.device.pop_batch(4)] == [0]
    assert p.device.broken is None
    with pytest.raises(PeerError):
        p.device.pop_batch(4)


def test_should_notify_follows_the_driver_flags(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=4)
    p.driver.add([(DATA, 4)], [], "t")
    elem = p.device.pop()
    assert elem is not None
    p.device.push(elem.head, 0)
    assert p.device.should_notify() is True
    p.driver.disable_cb()
    assert p.device.should_notify() is False


def test_should_notify_event_idx(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=3, features=EVENT_IDX)
    drv, dev = p.driver, p.device
    drv.rings.driver16[1] = VRING_PACKED_EVENT_FLAG_DESC
    drv.rings.driver16[0] = 2 | 1 << 15  # interrupt when position 2 of lap 1 is used
    for i in range(3):
        drv.add([(DATA, 4)], [], i)
    heads = [e.head for e in dev.pop_batch(3)]
    dev.push(heads[0], 0)
    assert dev.should_notify() is True  # the first decision always interrupts
    dev.push(heads[1], 0)
    assert dev.should_notify() is False  # 1 -> 2 does not pass position 2
    dev.push(heads[2], 0)  # 2 -> 0 of the next lap: the used index wrapped
    assert dev.should_notify() is True
    drv.rings.driver16[0] = 1  # position 1 of lap 0
    drv.get_bufs()
    drv.add([(DATA, 4)], [], "x")
    elem = dev.pop()
    assert elem is not None
    dev.push(elem.head, 0)
    assert dev.should_notify() is False  # 0 -> 1 of lap 0 does not pass 1
    dev.set_state(1, 1)
    assert dev.should_notify() is True  # set_state forgets what was signalled


def test_enable_disable_notification(pairs: list[PackedPair]) -> None:
    for features, on in [(0, (0, VRING_PACKED_EVENT_FLAG_ENABLE)),
                         (EVENT_IDX, (3 | 0 << 15, VRING_PACKED_EVENT_FLAG_DESC))]:
        p = new(pairs, num=5, features=features, start=(3, 0))
        p.device.disable_notification()
        assert p.device_event[1] == VRING_PACKED_EVENT_FLAG_DISABLE
        assert p.device.enable_notification() is False
        assert p.device_event == on
        p.driver.add([(DATA, 4)], [], "t")
        p.device.disable_notification()
        assert p.device.enable_notification() is True  # the re-check sees it


def test_state_and_vring_base(pairs: list[PackedPair]) -> None:
    p = new(pairs, num=7)
    dev = p.device
    dev.set_state(6 | 0 << 15, 4 | 1 << 15)
    assert dev.get_state() == (6, 4 | 1 << 15)
    assert dev.vring_base() == 6 | (4 | 1 << 15) << 16
    dev.set_vring_base(2 | 1 << 15 | 5 << 16)
    assert (dev.last_avail_idx, dev.last_avail_wrap_counter, dev.used_idx,
            dev.used_wrap_counter) == (2, 1, 5, 0)
    for bad in (7, 0x8007, 0x10000, -1):
        with pytest.raises(CallerError):
            dev.set_state(bad)
