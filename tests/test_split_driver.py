"""Driver side of the split virtqueue (VIRTIO 1.2 §2.7.13, §2.7.7, §2.7.10; Linux virtio_ring.c).

Every test runs the real device object on the other side, or writes the
device's fields straight into ring memory the way a device would.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conftest import EVENT_IDX, INDIRECT, RingPair, publish_heads
from pyvirtio.core.errors import CallerError, PeerError, QueueBrokenError, QueueFull
from pyvirtio.core.layout import DESC, DESC_SIZE
from pyvirtio.core.notify import vring_need_event
from pyvirtio.core.spec import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
)

Pair = Callable[..., RingPair]


def _desc(pair: RingPair, i: int) -> tuple[int, int, int, int]:
    addr, length, flags, nxt = DESC.unpack_from(pair.driver.rings.desc, i * DESC_SIZE)
    return int(addr), int(length), int(flags), int(nxt)


def test_round_trip_with_real_bytes(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    drv, dev = pair.driver, pair.device
    out = pair.buf(5, b"hello")
    inb = pair.buf(16, b"\xee" * 16)
    head = drv.add([(out, 5)], [(inb, 16)], token="req-1")
    assert drv.outstanding == 1 and drv.num_free == 6
    assert pair.avail_idx == 1
    assert drv.kick_prepare() is True
    elem = dev.pop()
    assert elem is not None and elem.head == head
    assert [bytes(v) for v in elem.readable] == [b"hello"]
    assert all(v.readonly for v in elem.readable)
    assert [len(v) for v in elem.writable] == [16]
    assert (elem.readable_len, elem.writable_len) == (5, 16)
    elem.writable[0][:5] = b"HELLO"
    dev.push(elem.head, 5)
    assert pair.used_idx == 1
    assert drv.get_buf() == ("req-1", 5)
    assert drv.get_buf() is None
    assert pair.mem.read(inb, 16) == b"HELLO" + b"\xee" * 11
    assert drv.outstanding == 0 and drv.num_free == 8


def test_chain_descriptors_as_written(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    drv = pair.driver
    segs_out = [(pair.buf(4), 4), (pair.buf(8), 8)]
    segs_in = [(pair.buf(12), 12), (pair.buf(2), 2)]
    head = drv.add(segs_out, segs_in, token=7)
    assert drv.num_free == 4
    # Follow the chain through the table as a device would.
    i, seen = head, []
    while True:
        addr, length, flags, nxt = _desc(pair, i)
        seen.append(((addr, length), flags & VRING_DESC_F_WRITE != 0))
        if not flags & VRING_DESC_F_NEXT:
            break
        i = nxt
    assert seen == [(s, False) for s in segs_out] + [(s, True) for s in segs_in]
    elem = pair.device.pop()
    assert elem is not None
    assert [len(v) for v in elem.readable] == [4, 8]
    assert [len(v) for v in elem.writable] == [12, 2]
    pair.device.push(elem.head, 0)
    assert drv.get_buf() == (7, 0)
    assert drv.num_free == 8


def test_many_buffers_come_back_in_push_order(ring_pair: Pair) -> None:
    pair = ring_pair(num=16)
    drv, dev = pair.driver, pair.device
    for t in range(16):
        drv.add([(pair.buf(8, t.to_bytes(8, "little")), 8)], [], token=t)
    with pytest.raises(QueueFull):
        drv.add([(pair.buf(1), 1)], [], token=99)
    elems = [dev.pop() for _ in range(16)]
    assert dev.pop() is None
    tokens_by_head = {}
    for e in elems:
        assert e is not None
        tokens_by_head[e.head] = int.from_bytes(bytes(e.readable[0]), "little")
    order = [e.head for e in elems if e is not None][::-1]  # push in reverse
    for h in order:
        dev.push(h, 1)
    got = []
    while (r := drv.get_buf()) is not None:
        got.append(r[0])
    assert got == [tokens_by_head[h] for h in order]


def test_add_misuse_is_a_caller_error(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    with pytest.raises(CallerError):
        pair.driver.add([(pair.buf(4), 4)], [], token=None)
    with pytest.raises(CallerError):
        pair.driver.add([], [], token=1)
    with pytest.raises(QueueFull):
        pair.driver.add([(pair.buf(1), 1)] * 5, [], token=1)
    assert pair.driver.num_free == 4 and pair.avail_idx == 0


def test_indirect_descriptors(ring_pair: Pair) -> None:
    pair = ring_pair(num=4, features=INDIRECT, indirect_per_head=4)
    drv, dev = pair.driver, pair.device
    assert drv.use_indirect
    segs_out = [(pair.buf(3, b"abc"), 3), (pair.buf(2, b"de"), 2)]
    segs_in = [(pair.buf(6), 6)]
    head = drv.add(segs_out, segs_in, token="ind")
    assert drv.num_free == 3  # one descriptor for the whole chain
    addr, length, flags, _ = _desc(pair, head)
    assert flags == VRING_DESC_F_INDIRECT and length == 3 * DESC_SIZE
    assert pair.indirect_gpa is not None
    assert pair.indirect_gpa <= addr < pair.indirect_gpa + 4 * 4 * DESC_SIZE
    # A single segment goes in the table directly.
    single = drv.add([(pair.buf(1, b"z"), 1)], [], token="one")
    assert _desc(pair, single)[2] & VRING_DESC_F_INDIRECT == 0
    e1, e2 = dev.pop(), dev.pop()
    assert e1 is not None and e2 is not None
    assert [bytes(v) for v in e1.readable] == [b"abc", b"de"]
    assert [len(v) for v in e1.writable] == [6]
    assert [bytes(v) for v in e2.readable] == [b"z"]
    e1.writable[0][:] = b"result"
    dev.push(e1.head, 6)
    dev.push(e2.head, 0)
    assert drv.get_buf() == ("ind", 6)
    assert drv.get_buf() == ("one", 0)
    assert pair.mem.read(segs_in[0][0], 6) == b"result"
    assert drv.num_free == 4
    with pytest.raises(CallerError):
        drv.add([(pair.buf(1), 1)] * 5, [], token="too-long")


def test_indirect_needs_the_feature_on_the_device(ring_pair: Pair) -> None:
    pair = ring_pair(num=4, features=INDIRECT)
    pair.device.indirect = False  # a device that did not offer INDIRECT_DESC
    pair.driver.add([(pair.buf(1), 1), (pair.buf(1), 1)], [], token=1)
    with pytest.raises(PeerError):
        pair.device.pop()
    assert pair.device.broken


def test_kick_with_flags(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    drv, dev = pair.driver, pair.device
    drv.add([(pair.buf(1), 1)], [], token=1)
    assert drv.kick_prepare() is True
    dev.disable_notification()
    assert pair.used_flags & VRING_USED_F_NO_NOTIFY
    drv.add([(pair.buf(1), 1)], [], token=2)
    assert drv.kick_prepare() is False
    assert dev.enable_notification() is True  # the buffer is already there
    assert not pair.used_flags & VRING_USED_F_NO_NOTIFY
    drv.add([(pair.buf(1), 1)], [], token=3)
    assert drv.kick_prepare() is True


def test_kick_with_event_idx_follows_avail_event(ring_pair: Pair) -> None:
    pair = ring_pair(num=16, features=EVENT_IDX)
    drv = pair.driver
    for avail_event in range(0, 12):
        pair.avail_event = avail_event
        old = pair.avail_idx
        for t in range(3):
            drv.add([(pair.buf(1), 1)], [], token=t + 1)
        new = pair.avail_idx
        assert drv.kick_prepare() == vring_need_event(avail_event, new, old)
        # A second call with nothing added is a no-op: num_added was consumed.
        assert drv.kick_prepare() is False
        drv.detach_unused()
    # The flag is ignored under EVENT_IDX.
    pair.device.rings.used16[0] = VRING_USED_F_NO_NOTIFY
    pair.avail_event = pair.avail_idx
    drv.add([(pair.buf(1), 1)], [], token=1)
    assert drv.kick_prepare() is True


def _cycle_without_kick_prepare(pair: RingPair, count: int) -> None:
    """``count`` buffers through a device that polls (it publishes no avail_event)."""
    drv, dev = pair.driver, pair.device
    buf = pair.buf(1)
    done = 0
    while done < count:
        n = min(pair.num, count - done)
        for _ in range(n):
            drv.add([(buf, 1)], [], token=1)
        while (e := dev.pop()) is not None:
            dev.push(e.head, 0)
        assert len(drv.get_bufs()) == n
        done += n


@pytest.mark.parametrize(("adds", "avail_event", "kick"), [
    # 2**16 adds since the last decision: avail.idx is back where it was, and
    # the 16-bit distance new - old reads 0, so vring_need_event alone says no.
    (65536, 0, True),
    (65536, 0x8000, True),
    (65536 + 7, 7, True),
    (3 * 65536 + 1, 1, True),
    # Up to 65,535 the distance is exact (Linux decides at 65,535 with it).
    (65535, 0, True),
    (65535, 65535, False),
])
def test_kick_not_lost_after_2_16_adds_without_a_decision(ring_pair: Pair, adds: int,
                                                          avail_event: int, kick: bool) -> None:
    pair = ring_pair(num=256, features=EVENT_IDX)
    pair.device.disable_notification()
    pair.avail_event = avail_event
    _cycle_without_kick_prepare(pair, adds)
    assert pair.driver.num_added == adds
    assert pair.avail_idx == adds & 0xFFFF
    assert pair.driver.kick_prepare() is kick
    assert pair.driver.num_added == 0
    assert pair.driver.kick_prepare() is False


def test_get_buf_publishes_used_event(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=EVENT_IDX)
    drv, dev = pair.driver, pair.device
    for t in range(5):
        drv.add([(pair.buf(1), 1)], [], token=t + 1)
    while (e := dev.pop()) is not None:
        dev.push(e.head, 0)
    for n in range(1, 6):
        assert drv.get_buf() is not None
        assert pair.used_event == n == drv.last_used_idx


def test_disable_enable_cb_with_flags(ring_pair: Pair) -> None:
    pair = ring_pair(num=8)
    drv, dev = pair.driver, pair.device
    drv.disable_cb()
    assert pair.avail_flags & VRING_AVAIL_F_NO_INTERRUPT
    drv.add([(pair.buf(1), 1)], [], token=1)
    e = dev.pop()
    assert e is not None
    dev.push(e.head, 0)
    assert dev.should_notify() is False
    # More work arrived while interrupts were off: enable_cb says so.
    assert drv.enable_cb() is True
    assert not pair.avail_flags & VRING_AVAIL_F_NO_INTERRUPT
    assert drv.get_buf() == (1, 0)
    assert drv.enable_cb() is False
    drv.add([(pair.buf(1), 1)], [], token=2)
    e = dev.pop()
    assert e is not None
    dev.push(e.head, 0)
    assert dev.should_notify() is True


def test_disable_enable_cb_with_event_idx(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=EVENT_IDX)
    drv, dev = pair.driver, pair.device
    for t in range(4):
        drv.add([(pair.buf(1), 1)], [], token=t + 1)
    elems = [dev.pop() for _ in range(4)]
    dev.push(elems[0].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is True  # first interrupt always
    assert drv.get_buf() == (1, 0)
    drv.disable_cb()
    assert pair.avail_flags == 0  # flags are not used under EVENT_IDX
    assert pair.used_event == 0
    dev.push(elems[1].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is False
    assert drv.enable_cb() is True  # used entry 1 is waiting
    assert pair.used_event == drv.last_used_idx == 1
    assert drv.get_buf() == (2, 0)
    assert drv.enable_cb() is False
    dev.push(elems[2].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is True


@pytest.mark.parametrize("start", [0, 5, 65533])
def test_disable_cb_with_event_idx_writes_used_event_like_linux(ring_pair: Pair,
                                                                start: int) -> None:
    # Linux virtqueue_disable_cb_split: under EVENT_IDX it writes used_event = 0
    # once, when interrupts go from enabled to disabled, and get_buf leaves
    # used_event alone while they stay disabled.
    pair = ring_pair(num=8, features=EVENT_IDX, start_idx=start)
    drv, dev = pair.driver, pair.device
    for t in range(6):
        drv.add([(pair.buf(1), 1)], [], token=t + 1)
    heads = [e.head for e in dev.pop_batch()]
    dev.push(heads[0], 0)
    assert drv.get_buf() == (1, 0)
    assert pair.used_event == (start + 1) & 0xFFFF
    drv.disable_cb()
    assert pair.used_event == 0 and pair.avail_flags == 0
    pair.used_event = 0x1234  # already disabled: nothing more is written
    drv.disable_cb()
    assert pair.used_event == 0x1234
    dev.push(heads[1], 0)
    assert drv.get_buf() == (2, 0)
    assert pair.used_event == 0x1234
    assert drv.enable_cb() is False
    assert pair.used_event == drv.last_used_idx == (start + 2) & 0xFFFF
    drv.disable_cb()
    assert pair.used_event == 0


def test_enable_cb_delayed(ring_pair: Pair) -> None:
    pair = ring_pair(num=16, features=EVENT_IDX)
    drv, dev = pair.driver, pair.device
    for t in range(8):
        drv.add([(pair.buf(1), 1)], [], token=t + 1)
    elems = [dev.pop() for _ in range(8)]
    dev.push(elems[0].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is True
    drv.disable_cb()
    assert drv.enable_cb_delayed() is False  # 1 used <= 3/4 of 8
    assert pair.used_event == 6
    for e in elems[1:6]:
        dev.push(e.head, 0)  # type: ignore[union-attr]
        assert dev.should_notify() is False  # used.idx 2..6 has not passed used_event 6
    dev.push(elems[6].head, 0)  # type: ignore[union-attr]
    assert dev.should_notify() is True  # used.idx 7 passed it
    # When more than 3/4 are already used, enable_cb_delayed asks to poll.
    dev.push(elems[7].head, 0)  # type: ignore[union-attr]
    assert drv.enable_cb_delayed() is True


def test_peer_errors_from_the_device(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    drv = pair.driver
    drv.add([(pair.buf(1), 1)], [], token=1)
    used32 = pair.device.rings.used32
    used32[1] = 3  # not an outstanding head
    pair.device.rings.used16[1] = 1
    with pytest.raises(PeerError):
        drv.get_buf()
    assert drv.broken
    with pytest.raises(QueueBrokenError):
        drv.get_buf()
    with pytest.raises(QueueBrokenError):
        drv.add([(pair.buf(1), 1)], [], token=2)

    pair = ring_pair(num=4)
    pair.driver.add([(pair.buf(1), 1)], [], token=1)
    pair.device.rings.used32[1] = 4  # out of range
    pair.device.rings.used16[1] = 1
    with pytest.raises(PeerError):
        pair.driver.get_buf()

    pair = ring_pair(num=4)
    pair.device.rings.used16[1] = 5  # more than the queue size ahead
    with pytest.raises(PeerError):
        pair.driver.get_buf()


def test_detach_unused_returns_every_token(ring_pair: Pair) -> None:
    pair = ring_pair(num=8, features=INDIRECT)
    drv = pair.driver
    drv.add([(pair.buf(1), 1)], [(pair.buf(1), 1)], token="a")
    drv.add([(pair.buf(1), 1)], [], token="b")
    drv.add([(pair.buf(1), 1)] * 3, [], token="c")
    assert sorted(drv.detach_unused()) == ["a", "b", "c"]  # type: ignore[type-var]
    assert drv.outstanding == 0 and drv.num_free == 8
    assert drv.detach_unused() == []


@pytest.mark.parametrize("start", [65530, 65535, 0xFFF0])
def test_indices_wrap_at_2_16(ring_pair: Pair, start: int) -> None:
    pair = ring_pair(num=4, features=EVENT_IDX, start_idx=start)
    drv, dev = pair.driver, pair.device
    kicks = irqs = 0
    for t in range(40):
        drv.add([(pair.buf(2, t.to_bytes(2, "little")), 2)], [], token=t)
        kicks += drv.kick_prepare()
        e = dev.pop()
        assert e is not None and int.from_bytes(bytes(e.readable[0]), "little") == t
        dev.push(e.head, 2)
        irqs += dev.should_notify()
        assert drv.get_buf() == (t, 2)
        assert drv.enable_cb() is False
        assert dev.enable_notification() is False
    assert pair.avail_idx == pair.used_idx == (start + 40) & 0xFFFF
    # Each side re-armed after every buffer, so each buffer needed its notification.
    assert kicks == irqs == 40


def test_publish_heads_helper_matches_driver_layout(ring_pair: Pair) -> None:
    pair = ring_pair(num=4)
    publish_heads(pair, 2, 3)
    assert pair.avail_idx == 2
    assert list(pair.driver.rings.avail16[2:4]) == [2, 3]


@pytest.mark.parametrize("n_out", [0, 1, 2])
def test_two_segment_add_writes_one_chain(ring_pair: Pair, n_out: int) -> None:
    pair = ring_pair(num=4)
    drv = pair.driver
    a, b = pair.buf(8), pair.buf(24)
    segs = [(a, 8), (b, 24)]
    head = drv.add(segs[:n_out], segs[n_out:], token="t")
    first, second = _desc(pair, head), _desc(pair, _desc(pair, head)[3])
    w0 = VRING_DESC_F_WRITE if n_out == 0 else 0
    w1 = VRING_DESC_F_WRITE if n_out < 2 else 0
    assert first == (a, 8, w0 | VRING_DESC_F_NEXT, first[3])
    assert second == (b, 24, w1, 0) and first[3] != head
    assert drv.num_free == 2 and pair.avail_idx == 1
    drv.add([(a, 8)], [(b, 24)], token="u")
    with pytest.raises(QueueFull):
        drv.add([(a, 8)], [(b, 24)], token="v")
    pair.device.pop()
    pair.device.push(head, 3)
    assert drv.get_buf() == ("t", 3) and drv.num_free == 2


# Used elements a device writes: (i < 4: the i-th added buffer, else a raw id; length).
_USED_CASES: dict[str, list[tuple[int, int]]] = {
    "good": [(0, 1), (1, 2), (2, 3), (3, 4)],
    "id-out-of-range-first": [(99, 1), (0, 1)],
    "id-out-of-range-later": [(0, 1), (1, 2), (99, 3)],
    "not-outstanding": [(0, 1), (5, 2)],
    "twice": [(0, 1), (1, 2), (0, 3)],
    "too-far-ahead": [(0, 1)] * 9,
}


def _used_pair(ring_pair: Pair, case: str) -> RingPair:
    pair = ring_pair(num=8, features=EVENT_IDX)
    heads = [pair.driver.add([], [(pair.buf(4), 4)], token=f"tok{i}") for i in range(4)]
    used32 = pair.device.rings.used32
    entries = _USED_CASES[case]
    for i, (ident, length) in enumerate(entries):
        slot = i & (pair.num - 1)
        used32[1 + 2 * slot] = heads[ident] if ident < 4 else ident
        used32[2 + 2 * slot] = length
    pair.device.rings.used16[1] = len(entries)
    return pair


@pytest.mark.parametrize("case", sorted(_USED_CASES))
def test_get_bufs_is_repeated_get_buf(ring_pair: Pair, case: str) -> None:
    def drain(pair: RingPair, batched: bool) -> tuple[list[object], object]:
        got: list[object] = []
        try:
            while True:
                bufs = pair.driver.get_bufs() if batched else [
                    b for b in [pair.driver.get_buf()] if b is not None]
                if not bufs:
                    return got, None
                got += bufs
        except PeerError as exc:
            return got, (type(exc), str(exc))

    scalar, batched = _used_pair(ring_pair, case), _used_pair(ring_pair, case)
    expect = drain(scalar, batched=False)
    assert drain(batched, batched=True) == expect
    for attr in ("last_used_idx", "outstanding", "num_free", "broken"):
        assert getattr(batched.driver, attr) == getattr(scalar.driver, attr), attr
    assert batched.used_event == scalar.used_event
    assert sorted(batched.driver._free) == sorted(scalar.driver._free)
