"""Device side of the split virtqueue (VIRTIO 1.2 §2.7.5, §2.7.7, §2.7.8, §2.7.10; QEMU virtio.c).

Hostile rings are written straight into guest memory (``write_desc`` /
``publish_heads``) the way a broken or malicious driver would.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conftest import EVENT_IDX, INDIRECT, RingPair, publish_heads, write_desc
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError
from pyvirtio.core.layout import DESC, RingViews
from pyvirtio.core.notify import vring_need_event
from pyvirtio.core.spec import (
    F_NOTIFY_ON_EMPTY,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    bit,
)
from pyvirtio.core.split_device import SplitDeviceQueue

Pair = Callable[..., RingPair]
NEXT, WRITE, IND = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


def _add(pair: RingPair, token: object = 1) -> int:
    """Add a one-descriptor buffer (4 writable bytes)."""
    return pair.driver.add([], [(pair.buf(4), 4)], token=token)


def test_empty_ring(ring_pair: Pair) -> None:
    dev = ring_pair(num=8).device
    assert dev.pop() is None and dev.pop_head() is None
    assert dev.available() == 0 and dev.is_empty()


def test_available_counts_and_pop_walks_raw_chain(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    a, b, c = pair.buf(3, b"abc"), pair.buf(4), pair.buf(5)
    write_desc(pair, 5, a, 3, NEXT, 2)
    write_desc(pair, 2, b, 4, NEXT | WRITE, 7)
    write_desc(pair, 7, c, 5, WRITE, 0)
    publish_heads(pair, 5)
    assert pair.device.available() == 1
    e = pair.device.pop()
    assert e is not None and e.head == 5
    assert [bytes(v) for v in e.readable] == [b"abc"]
    assert [len(v) for v in e.writable] == [4, 5]
    assert pair.device.available() == 0
    assert pair.device.get_state() == (1, 0)


def _expect_broken(pair: RingPair) -> None:
    with pytest.raises(PeerError) as info:
        pair.device.pop()
    assert type(info.value) is PeerError
    assert pair.device.broken
    with pytest.raises(QueueBrokenError):
        pair.device.pop()
    with pytest.raises(QueueBrokenError):
        pair.device.enable_notification()
    assert issubclass(QueueBrokenError, PeerError)


def test_avail_idx_too_far_ahead(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    pair.driver.rings.avail16[1] = 5
    _expect_broken(pair)


def test_head_out_of_range(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    publish_heads(pair, 4)
    _expect_broken(pair)


HOSTILE_CHAINS: dict[str, list[tuple[int, int, int, int, int]]] = {
    # (index, addr offset from the data area or -1 for unmapped, len, flags, next)
    "loop": [(0, 0, 8, NEXT, 1), (1, 8, 8, NEXT, 0)],
    "self-loop": [(0, 0, 8, NEXT, 0)],
    "next-out-of-range": [(0, 0, 8, NEXT, 4)],
    "zero-length": [(0, 0, 0, 0, 0)],
    "unmapped": [(0, -1, 8, 0, 0)],
    "readable-after-writable": [(0, 0, 8, NEXT | WRITE, 1), (1, 8, 8, 0, 0)],
    "indirect-with-next": [(0, 0, 32, IND | NEXT, 1), (1, 8, 8, 0, 0)],
    "indirect-len-0": [(0, 0, 0, IND, 0)],
    "indirect-len-not-16x": [(0, 0, 24, IND, 0)],
    "indirect-unmapped": [(0, -1, 32, IND, 0)],
    # A direct chain may end in one indirect descriptor (§2.7.5.3.2), under the same rules.
    "direct-then-indirect-with-next": [(0, 0, 8, NEXT, 1), (1, 16, 32, IND | NEXT, 2),
                                       (2, 8, 8, 0, 0)],
    "direct-then-indirect-len-0": [(0, 0, 8, NEXT, 1), (1, 16, 0, IND, 0)],
    "direct-then-indirect-len-not-16x": [(0, 0, 8, NEXT, 1), (1, 16, 24, IND, 0)],
    "direct-then-indirect-unmapped": [(0, 0, 8, NEXT, 1), (1, -1, 32, IND, 0)],
    "direct-loop-before-indirect": [(0, 0, 8, NEXT, 1), (1, 8, 8, NEXT, 0)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE_CHAINS))
def test_hostile_chains_break_the_queue(ring_pair: Pair, name: str) -> None:
    pair = ring_pair(num=4, features=INDIRECT)
    data = pair.buf(64)
    for i, off, length, flags, nxt in HOSTILE_CHAINS[name]:
        addr = 1 << 40 if off < 0 else data + off
        write_desc(pair, i, addr, length, flags, nxt)
    publish_heads(pair, 0)
    _expect_broken(pair)


def test_hostile_indirect_tables(ring_pair: Pair) -> None:
    cases = {
        "nested": (0, 0, 16, IND, 0),
        "loop": (0, 0, 8, NEXT, 0),
        "next-past-table": (0, 0, 8, NEXT, 2),
        "zero-len": (0, 0, 0, 0, 0),
    }
    for name, (i, off, length, flags, nxt) in cases.items():
        pair = ring_pair(num=4, features=INDIRECT)
        table, data = pair.buf(32), pair.buf(64)
        pair.mem.write(table, bytes(32))
        DESC.pack_into(pair.mem.translate(table, 32), 16 * i, data + off, length, flags, nxt)
        DESC.pack_into(pair.mem.translate(table, 32), 16, data, 8, 0, 0)
        write_desc(pair, 1, table, 32, IND, 0)
        publish_heads(pair, 1)
        with pytest.raises(PeerError):
            pair.device.pop()
        assert pair.device.broken, name


def _indirect_tail_pair(ring_pair: Pair, prefix: list[tuple[int, int, int]],
                        table: list[tuple[int, int, int, int]],
                        features: int = INDIRECT) -> RingPair:
    """Head 0 starts a direct chain of ``prefix`` (data offset, len, WRITE or 0)
    whose last descriptor is INDIRECT and names ``table`` (data offset, len, flags, next)."""
    pair = ring_pair(num=4, features=features)
    data = pair.buf(256, bytes(range(256)))
    tbl = pair.buf(16 * len(table))
    for j, (off, length, flags, nxt) in enumerate(table):
        DESC.pack_into(pair.mem.translate(tbl, 16 * len(table)), 16 * j, data + off, length,
                       flags, nxt)
    for i, (off, length, w) in enumerate(prefix):
        write_desc(pair, i, data + off, length, w | NEXT, i + 1)
    write_desc(pair, len(prefix), tbl, 16 * len(table), IND, 0)
    publish_heads(pair, 0)
    return pair


@pytest.mark.parametrize(("prefix", "table", "readable", "writable"), [
    # header + indirect table of data and status: what a driver that keeps a
    # header in the ring and spills the rest to an indirect table writes
    ([(0, 8, 0)], [(16, 8, NEXT, 1), (32, 4, WRITE, 0)], [(0, 8), (16, 8)], [(32, 4)]),
    ([(0, 8, 0), (8, 8, 0)], [(16, 16, 0, 0)], [(0, 8), (8, 8), (16, 16)], []),
    ([(0, 8, 0), (8, 4, WRITE)], [(64, 8, WRITE | NEXT, 1), (80, 8, WRITE, 0)],
     [(0, 8)], [(8, 4), (64, 8), (80, 8)]),
    ([(0, 8, WRITE), (8, 8, WRITE), (16, 8, WRITE)], [(64, 8, WRITE, 0)],
     [], [(0, 8), (8, 8), (16, 8), (64, 8)]),
])
def test_direct_chain_ending_in_an_indirect_descriptor(
        ring_pair: Pair, prefix: list[tuple[int, int, int]],
        table: list[tuple[int, int, int, int]], readable: list[tuple[int, int]],
        writable: list[tuple[int, int]]) -> None:
    # VIRTIO 1.2 §2.7.5.3.2: "The device MUST handle the case of zero or more
    # normal chained descriptors followed by a single descriptor with
    # flags&VIRTQ_DESC_F_INDIRECT" (Linux vhost's get_vq_desc does).
    def expect(spans: list[tuple[int, int]]) -> list[bytes]:
        return [bytes(range(off, off + length)) for off, length in spans]

    for batched in (False, True):
        pair = _indirect_tail_pair(ring_pair, prefix, table)
        if batched:
            (e,) = pair.device.pop_batch()
        else:
            got = pair.device.pop()
            assert got is not None
            e = got
        assert e.head == 0 and not pair.device.broken
        assert [bytes(v) for v in e.readable] == expect(readable)
        assert [bytes(v) for v in e.writable] == expect(writable)
        assert all(v.readonly for v in e.readable)
        assert not any(v.readonly for v in e.writable)
        pair.device.push(e.head, 0)
        assert pair.driver.rings.used32[1] == 0 and pair.device.inuse == 0


@pytest.mark.parametrize(("prefix", "table", "features"), [
    ([(0, 8, 0)], [(16, 8, IND, 0)], INDIRECT),                      # nested indirect
    ([(0, 8, WRITE)], [(16, 8, 0, 0)], INDIRECT),                    # readable after writable
    ([(0, 8, 0)], [(16, 8, NEXT, 0)], INDIRECT),                     # loop inside the table
    ([(0, 8, 0)], [(16, 8, NEXT, 1)], INDIRECT),                     # next past the table
    ([(0, 8, 0)], [(16, 0, 0, 0)], INDIRECT),                        # zero-length buffer
    ([(0, 8, 0)], [(16, 8, 0, 0)], 0),                               # feature not negotiated
])
def test_hostile_indirect_tail_breaks_the_queue(ring_pair: Pair,
                                                prefix: list[tuple[int, int, int]],
                                                table: list[tuple[int, int, int, int]],
                                                features: int) -> None:
    _expect_broken(_indirect_tail_pair(ring_pair, prefix, table, features))


def test_chain_of_full_table_length_is_fine(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    data = pair.buf(64)
    for i in range(4):
        write_desc(pair, i, data + 16 * i, 16, NEXT if i < 3 else 0, i + 1 if i < 3 else 0)
    publish_heads(pair, 0)
    e = pair.device.pop()
    assert e is not None and len(e.readable) == 4


def test_writes_stay_inside_writable_buffers(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    out, inb = pair.buf(8, b"R" * 8), pair.buf(8, b"\0" * 8)
    guard_before, guard_after = pair.mem.read(inb - 8, 8), pair.mem.read(inb + 8, 8)
    pair.driver.add([(out, 8)], [(inb, 8)], token=1)
    e = pair.device.pop()
    assert e is not None
    with pytest.raises(TypeError):
        e.readable[0][0] = 0  # readable buffers are read-only views
    with pytest.raises((ValueError, IndexError)):
        e.writable[0][:9] = b"x" * 9  # a view cannot grow past its buffer
    e.writable[0][:] = b"W" * 8
    assert pair.mem.read(inb - 8, 8) == guard_before
    assert pair.mem.read(inb + 8, 8) == guard_after
    assert pair.mem.read(out, 8) == b"R" * 8


def test_fill_flush_batches(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    drv, dev = pair.driver, pair.device
    for t in range(5):
        _add(pair, token=t)
    elems = [dev.pop() for _ in range(5)]
    for off, e in enumerate(elems):
        assert e is not None
        dev.fill(e.head, off + 1, offset=off)
    assert pair.used_idx == 0  # nothing published before flush
    assert drv.get_buf() is None
    with pytest.raises(CallerError):
        dev.flush(6)
    dev.flush(5)
    assert pair.used_idx == 5 and dev.get_state() == (5, 5)
    assert [drv.get_buf() for _ in range(5)] == [(t, t + 1) for t in range(5)]


def test_unpop_gives_heads_back(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    for t in range(3):
        _add(pair, token=t)
    heads = [pair.device.pop_head() for _ in range(3)]
    pair.device.unpop(2)
    assert pair.device.available() == 2
    assert [pair.device.pop_head() for _ in range(2)] == heads[1:]
    with pytest.raises(CallerError):
        pair.device.unpop(4)


def test_should_notify_with_flags(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    drv, dev = pair.driver, pair.device
    _add(pair)
    e = dev.pop()
    assert e is not None
    dev.push(e.head, 0)
    assert dev.should_notify() is True
    drv.disable_cb()
    assert dev.should_notify() is False
    pair.driver.rings.avail16[0] = 0
    assert dev.should_notify() is True


def test_should_notify_event_idx_first_interrupt_always_sent(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=EVENT_IDX)
    drv, dev = pair.driver, pair.device
    for t in range(4):
        _add(pair, token=t)
    elems = [dev.pop() for _ in range(4)]
    pair.used_event = 100  # far away: vring_need_event alone would say no
    dev.push(elems[0].head, 0)  # type: ignore[union-attr]
    assert not vring_need_event(100, 1, 0)
    assert dev.should_notify() is True  # signalled_used_valid was false
    dev.push(elems[1].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is False
    # The driver consumed both and asks for the next one.
    assert drv.get_buf() is not None and drv.get_buf() is not None
    assert pair.used_event == 2
    dev.push(elems[2].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is True
    # The flag means nothing under EVENT_IDX.
    pair.driver.rings.avail16[0] = VRING_AVAIL_F_NO_INTERRUPT
    pair.used_event = 3
    dev.push(elems[3].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is True


@pytest.mark.parametrize("used_event", range(0, 12))
def test_should_notify_event_idx_matches_need_event(ring_pair: Pair, used_event: int) -> None:
    pair = ring_pair(num=16, features=EVENT_IDX)
    dev = pair.device
    for t in range(12):
        _add(pair, token=t)
    elems = [dev.pop() for _ in range(12)]
    dev.push(elems[0].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is True
    pair.used_event = used_event
    old = 1
    for e in elems[1:4]:
        dev.push(e.head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() == vring_need_event(used_event, 4, old)


def test_set_state_rearms_the_first_interrupt(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=EVENT_IDX)
    dev = pair.device
    _add(pair)
    e = dev.pop()
    assert e is not None
    dev.push(e.head, 0)
    assert dev.should_notify() is True
    pair.used_event = 0x8000
    dev.set_state(*dev.get_state())
    _add(pair, token=2)
    e = dev.pop()
    assert e is not None
    dev.push(e.head, 0)
    assert dev.should_notify() is True


def test_notify_on_empty(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=bit(F_NOTIFY_ON_EMPTY))
    drv, dev = pair.driver, pair.device
    drv.disable_cb()
    _add(pair, token=1)
    _add(pair, token=2)
    e1 = dev.pop()
    assert e1 is not None
    dev.push(e1.head, 0)
    assert dev.should_notify() is False  # not empty: a buffer is still available
    e2 = dev.pop()
    assert e2 is not None
    assert dev.should_notify() is False  # empty, but a buffer is still in use
    dev.push(e2.head, 0)
    assert dev.should_notify() is True  # empty and nothing in use: always notify


def test_disable_enable_notification_flags(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    dev = pair.device
    dev.disable_notification()
    assert pair.used_flags & VRING_USED_F_NO_NOTIFY
    assert dev.enable_notification() is False
    assert pair.used_flags == 0
    dev.disable_notification()
    _add(pair)
    assert dev.enable_notification() is True  # the re-check found work


def test_disable_enable_notification_event_idx(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=EVENT_IDX)
    dev = pair.device
    for t in range(3):
        _add(pair, token=t)
    assert dev.pop() is not None
    assert pair.avail_event == 1  # pop asks for a kick past what it took
    dev.disable_notification()
    assert pair.used_flags == 0  # flags are not used under EVENT_IDX
    assert dev.pop() is not None
    assert pair.avail_event == 1  # not moved while notifications are off
    assert dev.enable_notification() is True
    assert pair.avail_event == pair.avail_idx == 3
    assert dev.pop() is not None
    assert dev.enable_notification() is False


def test_get_state_set_state(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    dev = pair.device
    dev.set_state(65534, 65530)
    assert dev.get_state() == (65534, 65530)
    dev.set_state(7)
    assert dev.get_state() == (7, 7)
    for bad in (-1, 65536):
        with pytest.raises(CallerError):
            dev.set_state(bad)
    # set_state repairs a broken queue (a vhost-user back end after reset).
    pair.driver.rings.avail16[1] = 100
    with pytest.raises(PeerError):
        dev.pop()
    dev.set_state(100, 100)
    assert dev.broken is None and dev.pop() is None


def test_resume_mid_stream_with_set_state(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    drv = pair.driver
    for t in range(6):
        _add(pair, token=t)
    dev = pair.device
    e0, e1 = dev.pop(), dev.pop()
    assert e0 is not None and e1 is not None
    dev.push(e0.head, 0)
    dev.push(e1.head, 0)
    state = dev.get_state()
    # A new device object (e.g. a restarted back end) resumes from the saved state.
    dev2 = SplitDeviceQueue(RingViews.map(pair.mem, pair.layout), pair.mem)
    dev2.set_state(*state)
    heads = []
    while (e := dev2.pop()) is not None:
        heads.append(e.head)
        dev2.push(e.head, 0)
    assert len(heads) == 4
    assert [drv.get_buf() for _ in range(6)] == [(t, 0) for t in range(6)]


# ------------------------------------------------------------ pop_batch
# Chains by name: (descriptor index, data offset or -1 for unmapped, len, flags, next).
# Good ones use descriptors 8..15, odd or bad ones 0..7 (queue of 16).
_BATCH_CHAINS: dict[str, tuple[int, list[tuple[int, int, int, int, int]]]] = {
    "w": (8, [(8, 0, 16, WRITE, 0)]),
    "r+w": (9, [(9, 16, 16, NEXT, 10), (10, 32, 17, WRITE, 0)]),
    "r+r": (11, [(11, 64, 16, NEXT, 12), (12, 80, 8, 0, 0)]),
    "w+w": (13, [(13, 96, 8, NEXT | WRITE, 14), (14, 104, 8, WRITE, 0)]),
    "r": (15, [(15, 112, 16, 0, 0)]),
    "three": (0, [(0, 0, 8, NEXT, 1), (1, 8, 8, NEXT, 2), (2, 16, 8, WRITE, 0)]),
    "loop": (0, [(0, 0, 8, NEXT, 1), (1, 8, 8, NEXT, 0)]),
    "self-loop": (0, [(0, 0, 8, NEXT, 0)]),
    "next-out-of-range": (0, [(0, 0, 8, NEXT, 16)]),
    "zero-length": (0, [(0, 0, 0, 0, 0)]),
    "zero-length-second": (0, [(0, 0, 8, NEXT, 1), (1, 8, 0, WRITE, 0)]),
    "unmapped": (0, [(0, -1, 8, 0, 0)]),
    "unmapped-second": (0, [(0, 0, 8, NEXT, 1), (1, -1, 8, WRITE, 0)]),
    "past-the-end-second": (0, [(0, 0, 8, NEXT, 1), (1, -2, 8, WRITE, 0)]),
    "readable-after-writable": (0, [(0, 0, 8, NEXT | WRITE, 1), (1, 8, 8, 0, 0)]),
    "indirect-without-feature": (0, [(0, 0, 32, IND, 0)]),
    "direct-then-indirect-without-feature": (0, [(0, 0, 8, NEXT, 1), (1, 192, 32, IND, 0)]),
    "direct-then-indirect": (0, [(0, 0, 8, NEXT, 1), (1, 192, 32, IND, 0)]),
    "w-then-indirect": (0, [(0, 0, 8, WRITE | NEXT, 1), (1, 192, 32, IND, 0)]),
    "head-out-of-range": (16, []),
}
_GOOD = ["w", "r+w", "r+r", "w+w", "r"]


# The "...then-indirect" chains name an indirect table at data offset 192 of a
# readable and a writable buffer ("w-then-indirect" so puts a readable one last).


def _batch_pair(ring_pair: Pair, odd: str, where: int) -> RingPair:
    pair = ring_pair(num=16, features=INDIRECT if odd.endswith("then-indirect") else 0)
    data = pair.buf(256, bytes(range(256)))
    pair.mem.write(data + 192, DESC.pack(data + 40, 8, NEXT, 1) + DESC.pack(data + 48, 8, WRITE, 0))
    end = pair.mem.regions[-1].gpa + pair.mem.regions[-1].size
    heads: list[int] = []
    names = [*_GOOD[:where], odd, *_GOOD[where:]]
    for name in names:
        head, descs = _BATCH_CHAINS[name]
        for i, off, length, flags, nxt in descs:
            addr = {-1: 1 << 40, -2: end - 4}.get(off, data + off)
            write_desc(pair, i, addr, length, flags, nxt)
        heads.append(head)
    publish_heads(pair, *heads)
    return pair


def _drain(pair: RingPair, batched: bool) -> tuple[list[object], object]:
    """Everything popped (as comparable tuples) and the error that ended it."""
    got: list[object] = []
    dev = pair.device
    try:
        while True:
            batch = dev.pop_batch() if batched else [e for e in [dev.pop()] if e is not None]
            if not batch:
                return got, None
            for e in batch:
                # The fast paths give what the general chain walk gives.
                readable: list[memoryview] = []
                writable: list[memoryview] = []
                dev.walk_chain(e.head, readable, writable)
                assert [bytes(v) for v in readable] == [bytes(v) for v in e.readable]
                assert [bytes(v) for v in writable] == [bytes(v) for v in e.writable]
                got.append((e.head, [bytes(v) for v in e.readable],
                            [bytes(v) for v in e.writable],
                            [v.readonly for v in e.readable], [v.readonly for v in e.writable]))
    except PeerError as exc:
        return got, (type(exc), str(exc))


@pytest.mark.parametrize("odd", sorted(_BATCH_CHAINS))
@pytest.mark.parametrize("where", [0, 2, 5])
def test_pop_batch_is_repeated_pop(ring_pair: Pair, odd: str, where: int) -> None:
    scalar = _batch_pair(ring_pair, odd, where)
    batched = _batch_pair(ring_pair, odd, where)
    expect = _drain(scalar, batched=False)
    assert _drain(batched, batched=True) == expect
    assert len(expect[0]) >= where  # the good ones before the odd one always come out
    for attr in ("last_avail_idx", "shadow_avail_idx", "inuse", "broken"):
        assert getattr(batched.device, attr) == getattr(scalar.device, attr), attr
    assert batched.avail_event == scalar.avail_event


@pytest.mark.parametrize("how", ["pop", "pop_head", "pop_batch"])
def test_more_heads_in_flight_than_the_queue_size_break_it(ring_pair: Pair, how: str) -> None:
    # A driver that makes a head available again while the device still holds
    # it: QEMU's virtqueue_split_pop stops at "Virtqueue size exceeded".
    pair = ring_pair(num=4)
    data = pair.buf(64)
    for i in range(4):
        write_desc(pair, i, data + 16 * i, 16, WRITE, 0)
    dev = pair.device

    def pop() -> object:
        if how == "pop_batch":
            batch = dev.pop_batch()
            return batch[0] if batch else None
        return dev.pop() if how == "pop" else dev.pop_head()

    publish_heads(pair, 0, 1, 2)
    if how == "pop_batch":
        assert len(dev.pop_batch()) == 3
    else:
        for _ in range(3):
            assert pop() is not None
    publish_heads(pair, 3, 0, 1)  # head 3 fits; 0 and 1 are still in flight
    if how == "pop_batch":
        assert [e.head for e in dev.pop_batch()] == [3]  # the batch ends before the excess
    else:
        assert pop() is not None
    assert dev.inuse == 4 and dev.broken is None
    with pytest.raises(PeerError, match="size exceeded") as info:
        pop()
    assert type(info.value) is PeerError and dev.broken
    assert dev.inuse == 4 and dev.last_avail_idx == 4
    with pytest.raises(QueueBrokenError):
        pop()


def test_a_full_queue_in_flight_is_fine(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    for t in range(4):
        _add(pair, token=t + 1)
    heads = [e.head for e in pair.device.pop_batch()]
    assert len(heads) == 4 and pair.device.pop() is None
    for h in heads:
        pair.device.push(h, 0)
    assert len(pair.driver.get_bufs()) == 4
    _add(pair, token=9)
    assert pair.device.pop() is not None and not pair.device.broken


def test_pop_batch_limit_and_event_idx(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=EVENT_IDX)
    for i in range(6):
        _add(pair, token=i + 1)
    first = pair.device.pop_batch(4)
    assert [e.head for e in first] == [0, 1, 2, 3]
    assert pair.avail_event == 4 and pair.device.inuse == 4
    rest = pair.device.pop_batch()
    assert [e.head for e in rest] == [4, 5]
    assert pair.device.pop_batch() == [] and pair.device.pop_batch(0) == []
    assert pair.avail_event == 6 and pair.device.get_state() == (6, 0)
